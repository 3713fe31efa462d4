"""tunelab's PPO loop: TRL 1.12's `PPOTrainer` with a `train()` that resumes and runs on N processes.

TRL's `PPOTrainer.train()` (trl.experimental.ppo, the last TRL that ships it) always starts at
update 1, takes its prompt order from the global RNG of that moment, saves checkpoints without
the value model, has no `resume_from_checkpoint`, and reaches for `model.policy` through DDP's
wrapper (so LoRA PPO fails on two processes). This subclass keeps TRL's set-up (models,
optimizer, schedule, Accelerate) and its algorithm: the rollout, the k1/k3 KL penalty, GAE and
the clipped policy and value losses are TRL's code, step for step (Apache-2.0, the TRL authors).
What changes is what an interrupted or distributed run needs:

- prompts follow a schedule fixed by (seed, epoch): update u reads global batch u of it and rank r
  the r-th slice of that batch, so a resumed run, and a run on any number of processes with the
  same global batch, answers the same prompts at every update (`prompt_indices`);
- a checkpoint holds the policy (or its adapter), the value model (`value_model/`), optimizer,
  scheduler, each rank's RNG states and the trainer state (update, episode, log history), and
  `train(resume_from_checkpoint=...)` restores all of it and continues with the next update;
- one garbage collection per update on GPUs, to hand memory back, and none on CPU (TRL runs two
  per update everywhere, about 0.3 s each in a process holding four models and datasets);
- a callback that sets `should_training_stop` (tunelab's signal handler) ends the loop after the
  checkpoint it asked for;
- rank r seeds torch, numpy and `random` with seed + r when training begins (TRL seeded torch
  alone, and numpy's minibatch shuffles not at all), so ranks sample different responses and every
  run with the same seed is the same run.

It answers `train(resume_from_checkpoint)` with a `TrainOutput`, like transformers' Trainer, so
`tunelab.training.trainer.train` runs it as it runs every other trainer (signals, atomic checkpoints,
rank checks).
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, set_seed
from transformers.trainer_utils import TrainOutput
from trl.experimental.ppo.ppo_trainer import (
    INVALID_LOGPROB,
    OnlineTrainerState,
    PPOTrainer,
    batch_generation,
    forward,
    masked_mean,
    masked_whiten,
    truncate_response,
)
from trl.experimental.utils import empty_cache, first_true_indices, get_reward
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import selective_log_softmax

VALUE_DIR = "value_model"  # inside each checkpoint: the value model, which TRL's checkpoints leave out


def prompt_indices(n: int, batch_size: int, seed: int, update: int, rank: int, local: int) -> list[int]:
    """Row indices of the prompts that `rank` answers at `update` (0-based).

    Each epoch is a permutation of the n prompts drawn from `seed + epoch` alone, cut into global
    batches of `batch_size` (the remainder is dropped, as TRL's loader does); rank r takes the r-th
    `local` rows of the batch. Nothing depends on what ran before, so skipping ahead is exact.
    """
    per_epoch = n // batch_size
    epoch, k = divmod(update, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    start = k * batch_size + rank * local
    return order[start : start + local].tolist()


class ResumablePPOTrainer(PPOTrainer):
    """`PPOTrainer` whose `train` can start from a checkpoint and runs correctly under DDP (see module doc)."""

    # Read by transformers' Trainer helpers (save on rank > 0, load a checkpoint), which TRL's
    # __init__ never sets because it does not run Trainer.__init__.
    is_fsdp_xla_v1_enabled = False
    is_distributed_loading_by_transformers = False

    def _unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)  # PolicyAndValueWrapper

    @contextmanager
    def null_ref_context(self):
        """The reference policy = the policy with its adapter off (TRL's version reads `.policy` through DDP)."""
        policy = self._unwrapped().policy
        off = policy.disable_adapter() if self.is_peft_model and not self.ref_adapter_name else nullcontext()
        with off:
            if self.ref_adapter_name:
                policy.set_adapter(self.ref_adapter_name)
            yield
            if self.ref_adapter_name:
                policy.set_adapter(self.model_adapter_name or "default")

    @contextmanager
    def _model_unwrapped(self):
        """`self.model` without DDP's wrapper, for TRL code that reads `.policy` or `.config` from it."""
        wrapped = self.model
        self.model = self._unwrapped()
        try:
            yield
        finally:
            self.model = wrapped

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the policy only; TRL finds it on the unwrapped model (under DDP it saved the wrapper's state)."""
        with self._model_unwrapped():
            super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:  # before trainer_state.json, which marks a checkpoint complete
            self._unwrapped().value_model.save_pretrained(folder / VALUE_DIR)
        with self._model_unwrapped():  # TRL's model card reads `.config`
            super()._save_checkpoint(model, trial)

    def _resume(self, checkpoint: str) -> None:
        """Policy (or adapter), value model, optimizer, scheduler and trainer state from `checkpoint`."""
        from transformers.trainer import TRAINER_STATE_NAME

        unwrapped = self._unwrapped()
        self._load_from_checkpoint(checkpoint, model=unwrapped.policy)
        self._load_from_checkpoint(os.path.join(checkpoint, VALUE_DIR), model=unwrapped.value_model)
        self._load_optimizer_and_scheduler(checkpoint)
        state = OnlineTrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        state.is_local_process_zero = self.is_local_process_zero()
        state.is_world_process_zero = self.is_world_process_zero()
        self.state = state

    def _prompts(self, update: int) -> torch.Tensor:
        args = self.args
        rows = prompt_indices(
            self.train_dataset_len,
            args.batch_size,
            args.seed,
            update,
            self.accelerator.process_index,
            args.local_batch_size,
        )
        return self.data_collator([self.train_dataset[i] for i in rows])["input_ids"].to(self.accelerator.device)

    def train(self, resume_from_checkpoint: str | None = None) -> TrainOutput:
        args = self.args
        if self.train_dataset_len < args.batch_size:
            raise ValueError(f"{self.train_dataset_len} prompts are fewer than one rollout batch of {args.batch_size}")
        set_seed(args.seed + self.accelerator.process_index)
        self.model.train()
        self.state = OnlineTrainerState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=self.state.stateful_callbacks,
        )
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
        self.state.max_steps = args.num_total_batches
        self.state.num_train_epochs = args.total_episodes / self.train_dataset_len
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(args, name)
            if value is not None:
                setattr(self.state, name, int(np.ceil(self.state.max_steps * value)) if value < 1 else value)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        if self.is_deepspeed_enabled:
            self.deepspeed = self.model_wrapped = self.model
        self._load_rng_state(resume_from_checkpoint)  # last: nothing above may draw from the restored RNGs

        start_time, start_episode = time.time(), self.state.episode
        first = self.state.global_step + 1
        for update in range(first, args.num_total_batches + 1):
            self.state.episode += args.batch_size
            rollout = self._rollout(self._prompts(update - 1))
            stats = self._optimize(rollout)
            self._log(rollout, stats, (self.state.episode - start_episode) / (time.time() - start_time))
            del rollout, stats
            self.lr_scheduler.step()
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_save:
                self._save_checkpoint(self.model, trial=None)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            if self.accelerator.device.type != "cpu":  # a full collection costs ~0.3 s; it only frees device memory
                gc.collect()
                empty_cache()
            if self.control.should_training_stop:
                break

        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        if self.control.should_save:
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(args, self.state, self.control)
        seconds = time.time() - start_time
        metrics = {"train_runtime": seconds, "episodes": float(self.state.episode)}
        return TrainOutput(self.state.global_step, 0.0, metrics)

    @torch.no_grad()
    def _rollout(self, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """Responses, log-probs (policy and reference), values, scores, rewards and advantages for one batch."""
        args, tok = self.args, self.processing_class
        accelerator, model, ref_policy = self.accelerator, self.model, self.ref_model
        generation_kwargs = {
            "max_new_tokens": args.response_length,
            "temperature": (args.temperature + 1e-7),
            "top_k": 0.0,
            "top_p": 1.0,
            "do_sample": True,
        }
        context_length = queries.shape[1]
        responses, postprocessed_responses, logprobs, ref_logprobs, scores, sequence_lengths, values = (
            [] for _ in range(7)
        )
        with unwrap_model_for_generation(
            model,
            accelerator,
            gather_deepspeed3_params=args.ds3_gather_for_generation,
            generation_kwargs=generation_kwargs,
        ) as unwrapped_model:
            query_responses, logitss = batch_generation(
                unwrapped_model.policy,
                queries,
                args.local_rollout_forward_batch_size,
                tok.pad_token_id,
                GenerationConfig(**generation_kwargs),
            )
        unwrapped = self._unwrapped()
        for i in range(0, queries.shape[0], args.local_rollout_forward_batch_size):
            query = queries[i : i + args.local_rollout_forward_batch_size]
            query_response = query_responses[i : i + args.local_rollout_forward_batch_size]
            response = query_response[:, context_length:]
            logits = logitss[i : i + args.local_rollout_forward_batch_size]
            logprob = selective_log_softmax(logits, response)
            del logits
            if ref_policy is None:
                with self.null_ref_context():
                    ref_output = forward(unwrapped.policy, query_response, tok.pad_token_id)
            else:
                ref_output = forward(ref_policy, query_response, tok.pad_token_id)
            ref_logits = ref_output.logits[:, context_length - 1 : -1]
            ref_logits /= args.temperature + 1e-7
            ref_logprob = selective_log_softmax(ref_logits, response)
            del ref_output, ref_logits
            # 1. truncate the response after the first stop token
            postprocessed_response = response
            if self.stop_token_id is not None:
                postprocessed_response = truncate_response(self.stop_token_id, tok.pad_token_id, response)
            # 2. score the truncated response; value of every position of the full one
            postprocessed_query_response = torch.cat((query, postprocessed_response), 1)
            sequence_length = first_true_indices(postprocessed_response == tok.pad_token_id) - 1
            full_value, _, _ = get_reward(unwrapped.value_model, query_response, tok.pad_token_id, context_length)
            value = full_value[:, context_length - 1 : -1].squeeze(-1)
            _, score, _ = get_reward(self.reward_model, postprocessed_query_response, tok.pad_token_id, context_length)
            responses.append(response)
            postprocessed_responses.append(postprocessed_response)
            logprobs.append(logprob)
            ref_logprobs.append(ref_logprob)
            sequence_lengths.append(sequence_length)
            scores.append(score)
            values.append(value)
        responses = torch.cat(responses, 0)
        postprocessed_responses = torch.cat(postprocessed_responses, 0)
        logprobs = torch.cat(logprobs, 0)
        ref_logprobs = torch.cat(ref_logprobs, 0)
        sequence_lengths = torch.cat(sequence_lengths, 0)
        scores = torch.cat(scores, 0)
        values = torch.cat(values, 0)
        empty_cache()

        # 3. a response without the stop token may be penalised
        contain_eos_token = torch.any(postprocessed_responses == tok.eos_token_id, dim=-1)
        if args.missing_eos_penalty is not None:
            scores[~contain_eos_token] -= args.missing_eos_penalty
        response_idxs = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)
        padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
        logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
        ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
        sequence_lengths_p1 = sequence_lengths + 1
        padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
        values = torch.masked_fill(values, padding_mask_p1, 0)

        # 4. rewards: the KL penalty at every token, the score at the last (k1 or k3 estimator)
        logr = ref_logprobs - logprobs
        kl = -logr if args.kl_estimator == "k1" else (logr.exp() - 1) - logr
        non_score_reward = -args.kl_coef * kl
        rewards = non_score_reward.clone()
        actual_start = torch.arange(rewards.size(0), device=rewards.device)
        actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
        rewards[actual_start, actual_end] += scores
        # 5. whiten rewards
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
            rewards = torch.masked_fill(rewards, padding_mask_p1, 0)
        # 6. advantages (GAE) and returns
        lastgaelam = 0
        advantages_reversed = []
        gen_length = responses.shape[1]
        for t in reversed(range(gen_length)):
            nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
            delta = rewards[:, t] + args.gamma * nextvalues - values[:, t]
            lastgaelam = delta + args.gamma * args.lam * lastgaelam
            advantages_reversed.append(lastgaelam)
        advantages = torch.stack(advantages_reversed[::-1], axis=1)
        returns = advantages + values
        advantages = masked_whiten(advantages, ~padding_mask)
        advantages = torch.masked_fill(advantages, padding_mask, 0)
        empty_cache()
        return {
            "context_length": context_length,
            "query_responses": query_responses,
            "responses": responses,
            "logprobs": logprobs,
            "values": values,
            "scores": scores,
            "kl": kl,
            "non_score_reward": non_score_reward,
            "padding_mask": padding_mask,
            "padding_mask_p1": padding_mask_p1,
            "advantages": advantages,
            "returns": returns,
        }

    def _optimize(self, r: dict[str, Any]) -> dict[str, torch.Tensor]:
        """`num_ppo_epochs` passes over the batch in shuffled mini-batches: clipped policy + value loss."""
        args, accelerator, model, optimizer = self.args, self.accelerator, self.model, self.optimizer
        shape = (args.num_ppo_epochs, args.num_mini_batches, args.gradient_accumulation_steps)
        names = ("approxkl", "pg_clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")
        stats = {name: torch.zeros(shape, device=accelerator.device) for name in names}
        context_length, padding_mask, padding_mask_p1 = r["context_length"], r["padding_mask"], r["padding_mask_p1"]
        pad_id = self.processing_class.pad_token_id
        for ppo_epoch_idx in range(args.num_ppo_epochs):
            b_inds = np.random.permutation(args.local_batch_size)
            mini_starts = range(0, args.local_batch_size, args.local_mini_batch_size)
            for minibatch_idx, mini_batch_start in enumerate(mini_starts):
                mini_batch_inds = b_inds[mini_batch_start : mini_batch_start + args.local_mini_batch_size]
                micro_starts = range(0, args.local_mini_batch_size, args.per_device_train_batch_size)
                for ga_idx, micro_batch_start in enumerate(micro_starts):
                    with accelerator.accumulate(model):
                        inds = mini_batch_inds[micro_batch_start : micro_batch_start + args.per_device_train_batch_size]
                        mb_advantage = r["advantages"][inds]
                        mb_responses = r["responses"][inds]
                        mb_logprobs = r["logprobs"][inds]
                        mb_return = r["returns"][inds]
                        mb_values = r["values"][inds]
                        output, vpred_temp = forward(model, r["query_responses"][inds], pad_id)
                        logits = output.logits[:, context_length - 1 : -1]
                        logits /= args.temperature + 1e-7
                        new_logprobs = selective_log_softmax(logits, mb_responses)
                        new_logprobs = torch.masked_fill(new_logprobs, padding_mask[inds], INVALID_LOGPROB)
                        vpred = vpred_temp[:, context_length - 1 : -1].squeeze(-1)
                        vpred = torch.masked_fill(vpred, padding_mask_p1[inds], 0)
                        vpredclipped = torch.clamp(
                            vpred, mb_values - args.cliprange_value, mb_values + args.cliprange_value
                        )
                        vf_losses1 = torch.square(vpred - mb_return)
                        vf_losses2 = torch.square(vpredclipped - mb_return)
                        vf_loss_max = torch.max(vf_losses1, vf_losses2)
                        vf_loss = 0.5 * masked_mean(vf_loss_max, ~padding_mask_p1[inds])
                        vf_clipfrac = masked_mean((vf_losses2 > vf_losses1).float(), ~padding_mask_p1[inds])
                        logprobs_diff = new_logprobs - mb_logprobs
                        ratio = torch.exp(logprobs_diff)
                        pg_losses = -mb_advantage * ratio
                        pg_losses2 = -mb_advantage * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
                        pg_loss_max = torch.max(pg_losses, pg_losses2)
                        pg_loss = masked_mean(pg_loss_max, ~padding_mask[inds])
                        loss = pg_loss + args.vf_coef * vf_loss
                        accelerator.backward(loss)
                        optimizer.step()
                        optimizer.zero_grad()
                        with torch.no_grad():
                            at = (ppo_epoch_idx, minibatch_idx, ga_idx)
                            prob_dist = torch.nn.functional.softmax(logits, dim=-1)
                            entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
                            stats["approxkl"][at] = 0.5 * (logprobs_diff**2).mean()
                            clipped = (pg_losses2 > pg_losses).float()
                            stats["pg_clipfrac"][at] = masked_mean(clipped, ~padding_mask[inds])
                            stats["pg_loss"][at] = pg_loss
                            stats["vf_loss"][at] = vf_loss
                            stats["vf_clipfrac"][at] = vf_clipfrac
                            stats["entropy"][at] = entropy.mean()
                            stats["ratio"][at] = ratio.mean()
                    del output, vpred_temp, logits, new_logprobs, vpred, vpredclipped, loss
                empty_cache()
        return stats

    @torch.no_grad()
    def _log(self, r: dict[str, Any], stats: dict[str, torch.Tensor], episodes_per_second: float) -> None:
        """TRL's per-update metrics, averaged over ranks."""
        mean = lambda t: self.accelerator.gather_for_metrics(t).mean().item()  # noqa: E731
        padding_mask, kl, scores = r["padding_mask"], r["kl"], r["scores"]
        mean_kl = kl.sum(1).mean()
        # Padding positions hold INVALID_LOGPROB; masked, or they would drag the entropy negative.
        mean_entropy = ((-r["logprobs"]) * (~padding_mask).float()).sum(1).mean()
        mean_non_score_reward = r["non_score_reward"].sum(1).mean()
        rlhf_reward = mean_non_score_reward + scores.mean()
        metrics: dict[str, float] = {"eps": int(episodes_per_second)}
        metrics["objective/kl"] = mean(mean_kl)
        metrics["objective/entropy"] = mean(mean_entropy)
        metrics["objective/non_score_reward"] = mean(mean_non_score_reward)
        metrics["objective/rlhf_reward"] = mean(rlhf_reward)
        metrics["objective/scores"] = mean(scores.mean())
        metrics["policy/approxkl_avg"] = mean(stats["approxkl"])
        metrics["policy/clipfrac_avg"] = mean(stats["pg_clipfrac"])
        metrics["loss/policy_avg"] = mean(stats["pg_loss"])
        metrics["loss/value_avg"] = mean(stats["vf_loss"])
        metrics["val/clipfrac_avg"] = mean(stats["vf_clipfrac"])
        metrics["policy/entropy_avg"] = mean(stats["entropy"])
        metrics["val/ratio"] = mean(stats["ratio"])
        metrics["val/ratio_var"] = self.accelerator.gather_for_metrics(stats["ratio"]).var().item()
        metrics["val/num_eos_tokens"] = (r["responses"] == self.processing_class.eos_token_id).sum().item()
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        metrics["episode"] = self.state.episode
        self.state.epoch = self.state.episode / self.train_dataset_len  # used by self.log
        self.state.global_step += 1
        self.log(metrics)
