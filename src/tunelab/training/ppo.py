"""tunelab's PPO trainer: RLHF's policy optimisation against a reward model, on transformers' Trainer.

The algorithm is PPO as RLHF applies it to language models (Ziegler et al. 2019; Ouyang et al. 2022),
with the choices of the "N implementation details of RLHF with PPO" reference (Huang et al. 2024), which
TRL 1.12's `PPOTrainer` also made, so a run reproduces TRL 1.12's numbers (tests/test_ppo_parity.py
replays a trajectory recorded with it). Each update:

1. **Rollout.** The policy samples a response of at most `response_length` tokens to each prompt at
   `temperature` (nothing else shapes the distribution: no top-k, no top-p), in chunks of
   `local_rollout_forward_batch_size`. The log-probability of each sampled token is the one it was
   sampled with. With a stop token (`stop_token: eos` or `stop_token_id`) a response ends at its first
   stop token: what follows is padding, and generation stops once every row has stopped.
2. **Scoring.** The reference model (a frozen copy of the starting policy, or with `lora:` the policy
   with its adapter switched off) gives each token's log-probability; the value model gives a value at
   every position; the reward model scores prompt + response at the response's last token. A response
   without EOS loses `missing_eos_penalty`.
3. **Rewards.** Every token is penalised by `kl_coef` x its KL estimate to the reference (`k1`: the
   log-ratio; `k3`: (r - 1) - log r), and the score is added one position after the response's last
   token: at the value of the state that ends the episode (at the last token when the response fills
   `response_length`). `whiten_rewards` scales them to unit variance.
4. **Advantages.** GAE(`gamma`, `lam`) over the response, returns = advantages + values; advantages
   are whitened over the response tokens.
5. **Optimisation.** `num_ppo_epochs` passes over the batch, each shuffled into `num_mini_batches`
   mini-batches; one optimizer step per mini-batch, its gradient accumulated over forward passes of
   `per_device_train_batch_size` rows. Loss = clipped policy loss (`cliprange`) + `vf_coef` x clipped
   value loss (`cliprange_value`), the value loss over the response plus the ending state.

Padding: in prompts the collator's attention mask tells it from tokens; in responses the pad id is
padding, as in TRL's loop. Where the tokenizer's pad is its EOS (SmolLM2), the EOS therefore counts as
padding after the response's last token, and the score is read at the token before it, which is where
such a reward model's own pooling (its last non-pad token) reads it.

Where it differs from TRL 1.12's loop (none of it in the recorded cases, which match bit for bit):
- a prompt's own tokens with the pad id stay visible (a chat template's EOS where pad = EOS); TRL masked
  them as padding;
- with both `num_mini_batches` > 1 and `gradient_accumulation_steps` > 1, one optimizer step per
  mini-batch; TRL stepped every `gradient_accumulation_steps` forward passes across mini-batch bounds
  (and averaged zeros into its statistics);
- `gradient_checkpointing`, `max_grad_norm` and `bf16`/`fp16` mixed precision are taken (TRL's loop
  ignored the first two, and took mixed precision from `accelerate launch` only);
- sampling uses these settings alone, not what a model's generation_config.json adds (repetition_penalty,
  ...: TRL's loop on transformers 5 applied it, and its log-probabilities then were not the policy's);
  log-probabilities of bf16/fp16 logits are normalised in float32;
- `val/num_eos_tokens` counts every rank's responses, not the main process's.

The policy and the value model train together (one optimizer, one DDP module); under N processes
(`tunelab launch`) each rank answers its own slice of every prompt batch and samples with its own seed
(seed + rank), and DDP averages the gradients. Prompts follow a schedule fixed by (seed, epoch): update
u reads global batch u of it (`prompt_indices`), so a resumed run answers the same prompts as an
uninterrupted one. A checkpoint holds the policy (or its adapter), the value model (`value_model/`),
optimizer, scheduler, every rank's RNG states and the trainer state; `train(resume_from_checkpoint=...)`
restores all of it and continues with the next update, exactly.

Logged every update (the names of TRL's loop, which reports and tests read): `objective/scores`,
`objective/kl` (sum over the response of the KL estimate, batch mean), `objective/entropy` (sum of the
sampled tokens' -log p), `objective/non_score_reward`, `objective/rlhf_reward`, the PPO statistics
`loss/policy_avg`, `loss/value_avg`, `policy/entropy_avg` (the full distribution's entropy),
`policy/approxkl_avg`, `policy/clipfrac_avg`, `val/clipfrac_avg`, `val/ratio`, `val/ratio_var`, and
`val/num_eos_tokens`, `lr`, `episode`, `eps`. The statistics of the PPO epochs are means over every
response position, as TRL's were (positions after the end count with a ratio of 1 and a KL of 0).

Not supported, refused by the ppo stage at validate: DeepSpeed and FSDP (the rollout generates with
the whole policy on each rank), sample tables (`num_sample_generations`), several adapters
(`model_adapter_name`/`ref_adapter_name`).
"""

from __future__ import annotations

import copy
import gc
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig, Trainer, TrainerState, set_seed
from transformers.trainer_utils import TrainOutput

from tunelab.training.ppo_config import PPOConfig

VALUE_DIR = "value_model"  # inside each checkpoint: the value model's weights
LOGPROB_PAD = 0.0  # log-prob written past a response's end, in the policy's and the reference's alike


def prompt_indices(n: int, batch_size: int, seed: int, update: int, rank: int, local: int) -> list[int]:
    """Row indices of the prompts that `rank` answers at `update` (0-based).

    Each epoch is a permutation of the n prompts drawn from `seed + epoch` alone, cut into global
    batches of `batch_size` (the remainder is dropped); rank r takes the r-th `local` rows of the
    batch. Nothing depends on what ran before, so skipping ahead is exact.
    """
    per_epoch = n // batch_size
    epoch, k = divmod(update, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    start = k * batch_size + rank * local
    return order[start : start + local].tolist()


# --- tensors -------------------------------------------------------------------------------------------


def first_index(flags: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the first True; the row length where there is none."""
    width = flags.shape[-1]
    positions = torch.arange(width, device=flags.device).expand_as(flags)
    return torch.where(flags, positions, width).min(dim=-1).values


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`x` scaled to unit variance over `mask` (unbiased), centred unless `shift_mean` is False."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    if n == 0:
        raise ValueError("nothing to whiten: every response of the batch is empty")
    variance = masked_mean((x - mean) ** 2, mask) * (n / (n - 1))
    out = (x - mean) * torch.rsqrt(variance + 1e-8)
    return out + mean if not shift_mean else out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under `logits` [..., vocab], without a second [..., vocab] tensor in float32."""
    if logits.dtype in (torch.float16, torch.bfloat16):  # normalise in float32, one row at a time
        rows = zip(logits, tokens, strict=True)
        return torch.stack([row.float().log_softmax(-1).gather(-1, t.unsqueeze(-1)).squeeze(-1) for row, t in rows])
    norms = torch.stack([row.logsumexp(-1) for row in logits])  # row by row: logsumexp makes a full temporary
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - norms


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates over the last dimension (the value after the last position is 0)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    steps = rewards.shape[1]
    for t in range(steps - 1, -1, -1):
        following = values[:, t + 1] if t + 1 < steps else 0.0
        running = rewards[:, t] + gamma * following - values[:, t] + gamma * lam * running
        advantages[:, t] = running
    return advantages


def model_inputs(tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """`tokens` as a model takes them, `mask` marking the real ones: positions count real tokens only (a
    left-padded prompt starts at 0), padding ids replaced by 0 (a pad id may lie outside the embedding)."""
    return {
        "input_ids": tokens.masked_fill(~mask, 0),
        "attention_mask": mask,
        "position_ids": mask.cumsum(1) - mask.long(),
    }


def position_scores(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A sequence classifier's score at every position [batch, length, labels]: its backbone's last hidden
    state through its `score` head (its own forward keeps only the last token's)."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    return model.score(hidden)


def no_dropout(model: nn.Module) -> None:
    """Sampling and scoring must see the function that is trained: dropout off everywhere."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class PolicyAndValue(nn.Module):
    """The two trained models as one module: one optimizer and one DDP wrapper for both."""

    def __init__(self, policy: nn.Module, value_model: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.config = policy.config  # what callbacks (TensorBoard) and model cards read

    def forward(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        logits = self.policy(**inputs, use_cache=False).logits
        return logits, position_scores(self.value_model, inputs)[..., 0]


@dataclass
class PPOState(TrainerState):
    """Trainer state plus the number of prompts answered so far."""

    episode: int = 0


@dataclass
class Rollout:
    """One batch of experience on this process, response positions along dimension 1."""

    context_length: int
    query_responses: torch.Tensor  # prompt + response as sampled (padding after a stop is pad)
    attention_mask: torch.Tensor  # the prompt's real tokens, and the response's tokens that are not pad
    responses: torch.Tensor
    logprobs: torch.Tensor  # at sampling; LOGPROB_PAD past the end
    values: torch.Tensor  # 0 past the ending state
    scores: torch.Tensor
    kl: torch.Tensor
    non_score_reward: torch.Tensor
    in_response: torch.Tensor  # True on the response's tokens (up to and including its stop token)
    in_values: torch.Tensor  # ... and on the state after its last token
    advantages: torch.Tensor
    returns: torch.Tensor


class PPOTrainer(Trainer):
    """PPO for language models (see the module doc). `train(resume_from_checkpoint)` answers a `TrainOutput`
    like every transformers Trainer, so tunelab's training wrapper (signals, atomic checkpoints, rank
    checks) runs it as it runs the others."""

    def __init__(
        self,
        args: PPOConfig,
        processing_class: Any,
        model: nn.Module,
        ref_model: nn.Module | None,
        reward_model: nn.Module,
        train_dataset: Any,
        value_model: nn.Module,
        data_collator: Any = None,
        callbacks: list | None = None,
        peft_config: Any = None,
    ) -> None:
        if ref_model is not None and ref_model is model:
            raise ValueError("`ref_model` must be a copy of `model` (or None with a LoRA policy), not the model")
        if args.stop_token and args.stop_token_id is not None:
            raise ValueError("set `stop_token` or `stop_token_id`, not both")
        if args.num_sample_generations:
            raise ValueError("tunelab's PPO prints no sample generations: set num_sample_generations to 0")
        if args.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', not {args.kl_estimator!r}")
        if peft_config is not None:  # before anything else draws: LoRA's A matrices come from the caller's RNG
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        self.is_peft_model = hasattr(model, "disable_adapter")
        if ref_model is None and not self.is_peft_model:
            ref_model = copy.deepcopy(model)
        for module in (model, ref_model, reward_model, value_model):
            if module is not None:
                no_dropout(module)
        for frozen in (ref_model, reward_model):
            if frozen is not None:
                frozen.eval().requires_grad_(False)
        stop = processing_class.eos_token_id if args.stop_token == "eos" else args.stop_token_id
        self.stop_token_id: int | None = stop
        model.generation_config.eos_token_id = stop  # the saved policy stops where it learned to

        super().__init__(
            model=PolicyAndValue(model, value_model),
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
        )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("tunelab's PPO runs on one or several processes with DDP, not DeepSpeed or FSDP")
        self.ref_model = ref_model.to(self.args.device) if ref_model is not None else None
        self.reward_model = reward_model.to(self.args.device)
        self._batch_sizes()
        self.create_optimizer_and_scheduler(num_training_steps=args.num_total_batches)
        self.model_wrapped, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = self.optimizer, self.lr_scheduler

    # --- set-up --------------------------------------------------------------------------------------

    def _batch_sizes(self) -> None:
        """Fill the computed fields of `args` (a rollout batch, its mini-batches, the number of updates)."""
        args, n = self.args, len(self.train_dataset)
        if args.total_episodes is None:
            args.total_episodes = int(args.num_train_epochs * n)
        args.world_size = self.accelerator.num_processes
        args.local_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps
        args.micro_batch_size = args.per_device_train_batch_size * args.world_size
        args.batch_size = args.local_batch_size * args.world_size
        if args.local_batch_size % args.num_mini_batches:
            raise ValueError(
                f"per_device_train_batch_size x gradient_accumulation_steps = {args.local_batch_size} is not a "
                f"multiple of num_mini_batches={args.num_mini_batches}"
            )
        args.local_mini_batch_size = args.local_batch_size // args.num_mini_batches
        args.mini_batch_size = args.batch_size // args.num_mini_batches
        if args.whiten_rewards and args.local_mini_batch_size < 8:
            raise ValueError(f"whiten_rewards needs mini-batches of 8 or more rows, not {args.local_mini_batch_size}")
        args.num_total_batches = math.ceil(args.total_episodes / args.batch_size)
        if n < args.batch_size:
            raise ValueError(f"{n} prompts are fewer than one rollout batch of {args.batch_size}")

    def _parts(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model_wrapped)

    def _reference_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.ref_model is not None:
            return self.ref_model(**inputs, use_cache=False).logits
        with self._parts().policy.disable_adapter():  # LoRA: the reference is the policy without its adapter
            return self._parts().policy(**inputs, use_cache=False).logits

    def _generation_config(self) -> GenerationConfig:
        """Plain sampling at `temperature`: the processed scores are then the sampled distribution."""
        args = self.args
        return GenerationConfig(
            max_new_tokens=args.response_length,
            do_sample=True,
            temperature=args.temperature + 1e-7,  # 0 would divide by zero
            top_k=0,
            top_p=1.0,
            eos_token_id=self.stop_token_id,
            pad_token_id=self.processing_class.pad_token_id,
            return_dict_in_generate=True,
            output_scores=True,
        )

    # --- checkpoints ---------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The policy alone (its adapter with LoRA), loadable with from_pretrained, and the tokenizer."""
        wrapper = self.model
        self.model = self._parts().policy
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self.model = wrapper

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:  # before trainer_state.json, which marks a checkpoint complete
            self._parts().value_model.save_pretrained(folder / VALUE_DIR)
        super()._save_checkpoint(model, trial)

    def _resume(self, checkpoint: str) -> None:
        """Policy (or adapter), value model, optimizer, scheduler and trainer state from `checkpoint`."""
        from transformers.trainer import TRAINER_STATE_NAME

        parts = self._parts()
        self._load_from_checkpoint(checkpoint, model=parts.policy)
        self._load_from_checkpoint(os.path.join(checkpoint, VALUE_DIR), model=parts.value_model)
        self._load_optimizer_and_scheduler(checkpoint)
        state = PPOState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        state.is_local_process_zero = self.is_local_process_zero()
        state.is_world_process_zero = self.is_world_process_zero()
        self.state = state

    # --- the loop ------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | None = None, **_: Any) -> TrainOutput:
        args = self.args
        set_seed(args.seed + self.accelerator.process_index)  # each rank samples its own responses
        self._activation_checkpointing()
        self.model_wrapped.train()
        self.is_in_train = True
        self.state = PPOState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=self.state.stateful_callbacks,
        )
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
        self.state.max_steps = args.num_total_batches
        self.state.num_train_epochs = args.total_episodes / len(self.train_dataset)
        for name in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(args, name)
            if value is not None:
                setattr(self.state, name, math.ceil(self.state.max_steps * value) if value < 1 else value)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        self._load_rng_state(resume_from_checkpoint)  # last: nothing above may draw from the restored RNGs

        start_time, start_episode = time.time(), self.state.episode
        for update in range(self.state.global_step, args.num_total_batches):
            self.state.episode += args.batch_size
            rollout = self._rollout(*self._prompts(update))
            stats = self._optimise(rollout)
            self._log_update(rollout, stats, (self.state.episode - start_episode) / (time.time() - start_time))
            del rollout, stats
            self.lr_scheduler.step()
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)
            if self.control.should_save:
                self._save_checkpoint(self.model, trial=None)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
            if self.accelerator.device.type != "cpu":  # hands device memory back; a full collection costs ~0.3 s
                gc.collect()
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
            if self.control.should_training_stop:
                break

        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        if self.control.should_save:
            self._save_checkpoint(self.model, trial=None)
            self.control = self.callback_handler.on_save(args, self.state, self.control)
        self.is_in_train = False
        metrics = {"train_runtime": time.time() - start_time, "episodes": float(self.state.episode)}
        return TrainOutput(self.state.global_step, 0.0, metrics)

    def _activation_checkpointing(self) -> None:
        """Recompute the policy's activations in the backward pass when the recipe asks (saves memory)."""
        args = self.args
        if not (getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing):
            return
        policy = self._parts().policy
        base = policy.get_base_model() if self.is_peft_model else policy
        kwargs = getattr(args, "activation_checkpointing_kwargs", None) or args.gradient_checkpointing_kwargs
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or {"use_reentrant": False})

    def _prompts(self, update: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's prompts of `update`, left-padded, and their attention mask (the collator's: a prompt's own
        pad-id tokens, as a chat template's EOS where pad = EOS, stay visible)."""
        args = self.args
        rows = prompt_indices(
            len(self.train_dataset),
            args.batch_size,
            args.seed,
            update,
            self.accelerator.process_index,
            args.local_batch_size,
        )
        batch = self.data_collator([self.train_dataset[i] for i in rows])
        device = self.accelerator.device
        return batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()

    @torch.no_grad()
    def _sample(self, queries: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Responses [rows, length] and the log-probabilities they were sampled with, chunk by chunk.

        The policy's own generation_config is set aside meanwhile: generate() would fill what ours leaves
        at transformers' defaults (top_p, repetition_penalty, ...) from it, and every such processor
        would make the sampling distribution differ from the one PPO's ratio divides by."""
        args, pad = self.args, self.processing_class.pad_token_id
        policy = self._parts().policy
        holder = policy.get_base_model() if self.is_peft_model else policy
        config, own = self._generation_config(), holder.generation_config
        chunk, width = args.local_rollout_forward_batch_size, queries.shape[1]
        responses, logprobs = [], []
        holder.generation_config = config
        try:
            for start in range(0, len(queries), chunk):
                inputs = model_inputs(queries[start : start + chunk], prompt_mask[start : start + chunk])
                out = policy.generate(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], generation_config=config
                )
                tokens = out.sequences[:, width:]
                responses.append(tokens)
                logprobs.append(token_logprobs(torch.stack(out.scores, 1), tokens))
        finally:
            holder.generation_config = own
        length = max(r.shape[1] for r in responses)  # chunks that all stopped early are shorter
        responses = [nn.functional.pad(r, (0, length - r.shape[1]), value=pad) for r in responses]
        logprobs = [nn.functional.pad(lp, (0, length - lp.shape[1]), value=LOGPROB_PAD) for lp in logprobs]
        return torch.cat(responses), torch.cat(logprobs)

    @torch.no_grad()
    def _rollout(self, queries: torch.Tensor, prompt_mask: torch.Tensor) -> Rollout:
        """Sample, score and turn one batch of prompts into advantages and returns (steps 1-4 of the module doc)."""
        args, tok = self.args, self.processing_class
        pad, temperature = tok.pad_token_id, args.temperature + 1e-7
        context = queries.shape[1]
        responses, logprobs = self._sample(queries, prompt_mask)
        query_responses = torch.cat([queries, responses], 1)
        attention = torch.cat([prompt_mask, responses != pad], 1)
        # A response ends at its first stop token; what follows it is padding.
        ended = responses
        if self.stop_token_id is not None:
            after_stop = torch.arange(responses.shape[1], device=responses.device) > first_index(
                responses == self.stop_token_id
            ).unsqueeze(1)
            ended = responses.masked_fill(after_stop, pad)
        last = first_index(ended == pad) - 1  # the response's last token (-1: empty)

        ref_logprobs, values, scores = [], [], []
        for start in range(0, len(queries), args.local_rollout_forward_batch_size):
            rows = slice(start, start + args.local_rollout_forward_batch_size)
            inputs = model_inputs(query_responses[rows], attention[rows])
            logits = self._reference_logits(inputs)[:, context - 1 : -1] / temperature
            ref_logprobs.append(token_logprobs(logits, responses[rows]))
            del logits
            values.append(position_scores(self._parts().value_model, inputs)[:, context - 1 : -1, 0])
            scored = model_inputs(
                torch.cat([queries[rows], ended[rows]], 1), torch.cat([prompt_mask[rows], ended[rows] != pad], 1)
            )
            final = position_scores(self.reward_model, scored)
            scores.append(final[torch.arange(len(final)), context + last[rows], 0])
        ref_logprobs, values, scores = torch.cat(ref_logprobs), torch.cat(values), torch.cat(scores)

        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * (~(ended == tok.eos_token_id).any(1)).float()
        positions = torch.arange(responses.shape[1], device=responses.device).unsqueeze(0)
        in_response = positions <= last.unsqueeze(1)
        in_values = positions <= last.unsqueeze(1) + 1
        logprobs = logprobs.masked_fill(~in_response, LOGPROB_PAD)
        ref_logprobs = ref_logprobs.masked_fill(~in_response, LOGPROB_PAD)
        values = values.masked_fill(~in_values, 0)

        log_ratio = logprobs - ref_logprobs  # log pi/pi_ref of each sampled token
        kl = log_ratio if args.kl_estimator == "k1" else (torch.exp(-log_ratio) - 1) + log_ratio
        non_score_reward = -args.kl_coef * kl
        rewards = non_score_reward.clone()
        ending = torch.where(last + 1 < responses.shape[1], last + 1, last)  # the state after the last token
        rewards[torch.arange(len(rewards)), ending] += scores
        if args.whiten_rewards:
            rewards = whiten(rewards, in_values, shift_mean=False).masked_fill(~in_values, 0)
        advantages = gae(rewards, values, args.gamma, args.lam)
        returns = advantages + values
        advantages = whiten(advantages, in_response).masked_fill(~in_response, 0)
        return Rollout(
            context_length=context,
            query_responses=query_responses,
            attention_mask=attention,
            responses=responses,
            logprobs=logprobs,
            values=values,
            scores=scores,
            kl=kl,
            non_score_reward=non_score_reward,
            in_response=in_response,
            in_values=in_values,
            advantages=advantages,
            returns=returns,
        )

    def _optimise(self, r: Rollout) -> dict[str, torch.Tensor]:
        """`num_ppo_epochs` shuffled passes, one optimizer step per mini-batch (step 5 of the module doc)."""
        args, accelerator, model = self.args, self.accelerator, self.model_wrapped
        temperature, context = args.temperature + 1e-7, r.context_length
        mini, micro = args.local_mini_batch_size, args.per_device_train_batch_size
        micro_starts = range(0, mini, micro)
        names = ("approxkl", "pg_clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")
        shape = (args.num_ppo_epochs, args.num_mini_batches, len(micro_starts))
        stats = {name: torch.zeros(shape, device=accelerator.device) for name in names}
        for epoch in range(args.num_ppo_epochs):
            order = np.random.permutation(args.local_batch_size)
            for m in range(args.num_mini_batches):
                batch = order[m * mini : (m + 1) * mini]
                for k, start in enumerate(micro_starts):
                    rows = batch[start : start + micro]
                    last_micro = k == len(micro_starts) - 1
                    with nullcontext() if last_micro else accelerator.no_sync(model):
                        logits, vpred = model(**model_inputs(r.query_responses[rows], r.attention_mask[rows]))
                        logits = logits[:, context - 1 : -1] / temperature
                        vpred = vpred[:, context - 1 : -1]
                        in_response, in_values = r.in_response[rows], r.in_values[rows]
                        new_logprobs = token_logprobs(logits, r.responses[rows]).masked_fill(~in_response, LOGPROB_PAD)
                        vpred = vpred.masked_fill(~in_values, 0)
                        # Value loss: the larger of the plain and the clipped (around the rollout's value) error.
                        old_values, returns = r.values[rows], r.returns[rows]
                        vclipped = torch.clamp(
                            vpred, old_values - args.cliprange_value, old_values + args.cliprange_value
                        )
                        vf_plain, vf_clipped = (vpred - returns) ** 2, (vclipped - returns) ** 2
                        vf_loss = 0.5 * masked_mean(torch.max(vf_plain, vf_clipped), in_values)
                        # Policy loss: the pessimistic one of the plain and the clipped ratio times the advantage.
                        log_ratio = new_logprobs - r.logprobs[rows]
                        ratio = torch.exp(log_ratio)
                        advantages = r.advantages[rows]
                        pg_plain = -advantages * ratio
                        pg_clipped = -advantages * torch.clamp(ratio, 1.0 - args.cliprange, 1.0 + args.cliprange)
                        pg_loss = masked_mean(torch.max(pg_plain, pg_clipped), in_response)
                        loss = pg_loss + args.vf_coef * vf_loss
                        accelerator.backward(loss / len(micro_starts) if len(micro_starts) > 1 else loss)
                    with torch.no_grad():
                        at = (epoch, m, k)
                        probs = torch.softmax(logits, -1)
                        stats["entropy"][at] = (torch.logsumexp(logits, -1) - (probs * logits).sum(-1)).mean()
                        stats["approxkl"][at] = 0.5 * (log_ratio**2).mean()
                        stats["pg_clipfrac"][at] = masked_mean((pg_clipped > pg_plain).float(), in_response)
                        stats["pg_loss"][at] = pg_loss
                        stats["vf_loss"][at] = vf_loss
                        stats["vf_clipfrac"][at] = masked_mean((vf_clipped > vf_plain).float(), in_values)
                        stats["ratio"][at] = ratio.mean()
                    del logits, vpred, probs, loss
                if args.max_grad_norm and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
        return stats

    @torch.no_grad()
    def _log_update(self, r: Rollout, stats: dict[str, torch.Tensor], episodes_per_second: float) -> None:
        """One log entry per update, each value averaged over the processes."""
        gather = self.accelerator.gather

        def mean(t: torch.Tensor) -> float:
            return gather(t.reshape(-1)).mean().item()

        non_score = r.non_score_reward.sum(1).mean()
        metrics: dict[str, float] = {"eps": int(episodes_per_second)}
        metrics["objective/kl"] = mean(r.kl.sum(1).mean())
        metrics["objective/entropy"] = mean((-r.logprobs * r.in_response).sum(1).mean())
        metrics["objective/non_score_reward"] = mean(non_score)
        metrics["objective/rlhf_reward"] = mean(non_score + r.scores.mean())
        metrics["objective/scores"] = mean(r.scores.mean())
        metrics["policy/approxkl_avg"] = mean(stats["approxkl"])
        metrics["policy/clipfrac_avg"] = mean(stats["pg_clipfrac"])
        metrics["loss/policy_avg"] = mean(stats["pg_loss"])
        metrics["loss/value_avg"] = mean(stats["vf_loss"])
        metrics["val/clipfrac_avg"] = mean(stats["vf_clipfrac"])
        metrics["policy/entropy_avg"] = mean(stats["entropy"])
        metrics["val/ratio"] = mean(stats["ratio"])
        metrics["val/ratio_var"] = gather(stats["ratio"].reshape(-1)).var().item()
        eos = (r.responses == self.processing_class.eos_token_id).sum().reshape(1)
        metrics["val/num_eos_tokens"] = int(gather(eos).sum().item())
        metrics["lr"] = self.lr_scheduler.get_last_lr()[0]
        metrics["episode"] = self.state.episode
        self.state.epoch = self.state.episode / len(self.train_dataset)
        self.state.global_step += 1
        self.log(metrics)
