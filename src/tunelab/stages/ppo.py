"""RLHF's third step: optimise the policy against a reward model with PPO, in tunelab's own trainer
(`tunelab.training.ppo.PPOTrainer`; TRL removed its PPO in 1.13).

The policy starts from `model` (usually `${sft}`; an adapter is merged first); the reference is a
frozen copy of it (with `lora:`, the policy with its adapter switched off); `reward_model` is a
reward stage's classifier (`${reward}`); the value model starts from `value_model`, by default
the reward model. Prompts come from `data` (`prompt_column`), tokenized and left-padded for
generation. `training` is `tunelab.training.ppo_config.PPOConfig`: TRL 1.12's `PPOConfig` fields,
names and meanings (recipes written for it run unchanged); tunelab sets `stop_token: eos` unless the
recipe says otherwise, so responses end where the policy stops, as the reward model was trained.

The trainer is PPO as the "N implementation details of RLHF with PPO" describe it, step for step what
TRL 1.12's loop computed (tests/test_ppo_parity.py replays a trajectory recorded with TRL 1.12: the
same logs and weights, bit for bit on the CPU that recorded it). Its checkpoints hold the value model
too, its prompt order is fixed by the seed, so `--resume` continues from the newest checkpoint exactly; it runs on every
process of `tunelab launch` (each rank answers its slice of every rollout batch, with its own sampling
seed). Settings it does not take are one line at validate: TRL's sample tables, several adapters,
DeepSpeed/FSDP, `max_steps` (PPO's length is `total_episodes`), evaluation during training, and the
sizes TRL computed.

Every step logs the reward-model score, KL to the reference, entropy and value loss (also in
`log_history.json`, plotted in report.md). A NaN/inf loss or score, or KL past `kl_limit`, stops
the run with one line naming the step and the last good checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.data.datasets import require_columns
from tunelab.models.chat_templates import conversational
from tunelab.models.loading import load_causal_lm
from tunelab.models.plan import model_structure, optimizer_bytes, policy_plan
from tunelab.models.reward_functions import reward_model_spec
from tunelab.models.reward_models import load_sequence_classifier
from tunelab.models.spec import model_config
from tunelab.models.tokenizers import same_tokenizer, tokenizer_origin
from tunelab.stages import Context, Metrics, StageSpec
from tunelab.stages.base import Settings, TrainerStage, sections
from tunelab.training.distributed import world
from tunelab.training.tokenized import prompt_tokens

COMPUTED = "is computed by the trainer from per_device_train_batch_size, gradient_accumulation_steps, " + (
    "num_mini_batches and the number of processes: remove it"
)
ONE_ADAPTER = "names one of several adapters; the ppo stage trains one (`lora:`) and its reference is the policy "
ONE_ADAPTER += "with it switched off: remove it"
NOT_DDP = "tunelab's PPO runs on one process or several under DDP (`tunelab launch --num-processes N`): remove it"
# PPOConfig fields (TRL 1.12's) that tunelab's trainer does not take: (the values it accepts, why and what to do).
NOT_TAKEN: dict[str, tuple[tuple[Any, ...], str]] = {
    "sft_model_path": ((), "is not used by the trainer: set the stage's `model:`/`reward_model:`"),
    "reward_model_path": ((), "is not used by the trainer: set the stage's `model:`/`reward_model:`"),
    "model_adapter_name": ((None,), ONE_ADAPTER),
    "ref_adapter_name": ((None,), ONE_ADAPTER),
    "dataset_num_proc": ((None,), "is not used: the stage tokenizes the prompts itself; remove it"),
    "num_sample_generations": (
        (0,),
        "asks for tables of sample completions, which tunelab's PPO does not print (an eval stage after it "
        "scores the policy's answers): remove it",
    ),
    "ds3_gather_for_generation": ((True,), "applies to DeepSpeed ZeRO-3 only; " + NOT_DDP),
    "deepspeed": ((None,), NOT_DDP),
    "fsdp": ((None, False, "", []), NOT_DDP),
    "max_steps": (
        (-1,),
        "is not PPO's length: set total_episodes (prompts answered; updates = total_episodes / batch)",
    ),
    "eval_strategy": (
        ("no", False),  # YAML reads `no` as False
        "asks for evaluation during training, which PPO does not run: remove it and add an eval stage after it",
    ),
    "use_liger_kernel": ((False,), "is not used by tunelab's PPO (it computes its own log-probabilities): remove it"),
    **{key: ((None,), COMPUTED) for key in ("world_size", "num_total_batches", "micro_batch_size", "local_batch_size")},
    **{key: ((None,), COMPUTED) for key in ("batch_size", "local_mini_batch_size", "mini_batch_size")},
}
SIGNALS = {
    "objective/scores": "score",
    "objective/kl": "kl",
    "objective/entropy": "entropy",
    "loss/value_avg": "value_loss",
}


def _check_tokenizers(spec: StageSpec, ctx: Context) -> None:
    policy = tokenizer_origin(spec.cfg["model"], ctx, f"{spec.where}.model")
    for key in ("reward_model", "value_model"):
        if key in spec.cfg:
            other = tokenizer_origin(spec.cfg[key], ctx, f"{spec.where}.{key}")
            if not same_tokenizer(policy, other):
                raise TunelabError(
                    f"'{spec.where}.{key}' uses a different tokenizer ({other}) from the policy ({policy}): PPO "
                    "scores the policy's token ids with it, so both need the same one; train the reward model "
                    "from the policy's model (reward stage `model: ${sft}`)"
                )


def _check_batches(spec: StageSpec, args: Any, n: int) -> None:
    """The batch arithmetic TRL checks only once the models are loaded, and an empty epoch it never checks."""
    size = world()[1]
    local = args.per_device_train_batch_size * args.gradient_accumulation_steps
    where = f"{spec.where}.training"
    if local % args.num_mini_batches:
        raise TunelabError(
            f"'{where}': per_device_train_batch_size x gradient_accumulation_steps = {local} is not a multiple "
            f"of num_mini_batches={args.num_mini_batches}"
        )
    if args.whiten_rewards and local // args.num_mini_batches < 8:
        raise TunelabError(
            f"'{where}.whiten_rewards' needs mini-batches of 8 or more rows per process, not "
            f"{local // args.num_mini_batches}: raise per_device_train_batch_size x gradient_accumulation_steps "
            "or lower num_mini_batches"
        )
    accelerate = {k: os.environ.get(f"ACCELERATE_USE_{k}", "").lower() in ("1", "true") for k in ("DEEPSPEED", "FSDP")}
    if any(accelerate.values()):
        kind = "DeepSpeed" if accelerate["DEEPSPEED"] else "FSDP"
        raise TunelabError(
            f"'{spec.where}' is launched with {kind}, which tunelab's PPO does not run under (each rank generates "
            "with the whole policy): launch it with --num-processes N and no --config-file (DDP)"
        )
    batch = local * size
    if n < batch:
        on = f" x {size} processes" if size > 1 else ""
        raise TunelabError(
            f"'{spec.where}.data' has {n} prompts, fewer than one rollout batch of {batch} "
            f"(per_device_train_batch_size x gradient_accumulation_steps{on}): add prompts or lower the batch size"
        )


def _tokenized(ds, column: str, tokenizer):
    """Prompts as `input_ids` only, which is what the trainer's collator pads."""

    def encode(row):
        prompt = row[column]
        if isinstance(prompt, list):  # chat messages
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            return {"input_ids": ids["input_ids"] if isinstance(ids, Mapping) else ids}  # transformers 5: a dict
        return {"input_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"]}

    return ds.map(encode, remove_columns=ds.column_names)


@dataclass(kw_only=True)
class PPOSettings(Settings):
    """The models PPO scores with and the column it reads prompts from."""

    reward_model: dict[str, Any] | None
    """from_pretrained arguments of `reward_model:` (None while checking, when an earlier stage makes it)."""
    value_model: dict[str, Any] | None
    """Where the value model starts: `value_model:`, by default the reward model."""
    prompt_column: str


class PPO(TrainerStage):
    config_class = "tunelab.training.ppo_config:PPOConfig"
    trainer_class = "tunelab.training.ppo:PPOTrainer"
    ranks = "all"  # every process rolls out and trains on its slice of each batch
    defaults = {"stop_token": "eos"}  # responses end at EOS, as the reward model saw them
    model_hint = "the policy to optimise (usually ${sft})"
    data_hint = "name a dataset of prompts for the policy to answer"
    data_target = "prompt"
    kl_keys = ("objective/kl",)
    metrics = Metrics(
        summary=("first_score", "last_score", "last_kl"),
        progress=SIGNALS,
        trend={"objective/scores": "score", "objective/kl": "kl", "loss/value_avg": "value_loss"},
        throttle=True,  # the loop logs every step, whatever logging_steps says
    )
    sections = sections(
        {
            "model": "policy to optimise: usually ${sft} (adapter folders are merged first)",
            "reward_model": "reward model: ${reward} or a folder/hub id of a classifier with num_labels=1",
            "value_model": "where the value model starts (default: the reward model)",
            "data": "prompts: datasets.load_dataset arguments",
            "prompt_column": "column holding the prompts (default: prompt); plain text or chat messages",
            "training": "tunelab.training.ppo_config.PPOConfig fields, TRL 1.12's PPOConfig names (learning_rate, "
            "total_episodes, kl_coef, response_length, ...)",
            "lora": "peft.LoraConfig fields: train a LoRA policy (the reference is the policy without its adapter)",
            "kl_limit": "stop when the KL to the reference passes this value (objective/kl); NaN always stops",
        },
        common=("lora", "chat_template", "system"),
    )

    def training_values(self, spec: StageSpec, ctx: Context) -> dict[str, Any]:
        values = super().training_values(spec, ctx)
        for key, (accepted, why) in NOT_TAKEN.items():
            if key in values and values[key] not in accepted:
                raise TunelabError(f"'{spec.where}.training.{key}' {why}")
        own = spec.cfg.get("training") or {}
        if own.get("stop_token_id") is not None and "stop_token" not in own:
            values.pop("stop_token")  # the recipe's stop token replaces tunelab's default (EOS)
        if values.get("stop_token") is not None and values.get("stop_token_id") is not None:
            raise TunelabError(
                f"'{spec.where}.training' sets both stop_token and stop_token_id: keep one "
                "(stop_token: eos ends responses at the tokenizer's EOS)"
            )
        return values

    def settings(self, spec: StageSpec, ctx: Context) -> PPOSettings:
        common = super().settings(spec, ctx)
        if "reward_model" not in spec.cfg:
            raise TunelabError(
                f"'{spec.where}' has no `reward_model:`: PPO optimises a reward model's score; "
                "add a `reward` stage and set `reward_model: ${reward}`"
            )
        reward = reward_model_spec(spec.cfg["reward_model"], ctx, f"{spec.where}.reward_model")
        value = (
            reward_model_spec(spec.cfg["value_model"], ctx, f"{spec.where}.value_model")
            if "value_model" in spec.cfg
            else reward
        )
        _check_tokenizers(spec, ctx)
        column = spec.cfg.get("prompt_column", "prompt")
        common.chat_columns = (column,)
        return PPOSettings(**vars(common), reward_model=reward, value_model=value, prompt_column=column)

    def data(self, spec: StageSpec, ctx: Context, s: PPOSettings) -> tuple[Any, Any]:
        column = s.prompt_column
        ds = self.load(spec, ctx, "data", (column,) if column != "prompt" else ())
        require_columns(ds, [column], f"{spec.where}.data", "prompts; set prompt_column", "turns", empty=False)
        return ds, None

    def check_more(self, spec: StageSpec, ctx: Context, s: Settings, train: Any, evaluation: Any) -> None:
        _check_batches(spec, s.args, len(train))

    def tokenizer(self, spec: StageSpec, ctx: Context, s: Settings, train: Any) -> Any:
        tokenizer = super().tokenizer(spec, ctx, s, train)  # TokenizerPending while an earlier stage makes it
        tokenizer.padding_side = "left"  # responses are appended after the prompts
        return tokenizer

    def prepare(self, spec: StageSpec, ctx: Context, s: PPOSettings, tokenizer: Any, train: Any, evaluation: Any):
        column = s.prompt_column
        return _tokenized(conversational(train, tokenizer, s.chat, s.system, column), column, tokenizer), None

    def model(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any) -> Any:
        return load_causal_lm(s.model)

    def trainer_kwargs(self, spec, ctx, s, model, tokenizer, train, evaluation) -> dict[str, Any]:
        return {
            "args": s.args,
            "processing_class": tokenizer,
            "model": model,
            "ref_model": None if s.lora is not None else load_causal_lm(s.model),
            "reward_model": load_sequence_classifier(s.reward_model, num_labels=1),
            "value_model": load_sequence_classifier(s.value_model, num_labels=1),
            "train_dataset": train,
            "peft_config": s.lora,
        }

    def after(self, spec, ctx, s, trainer, tokenizer, evaluation) -> dict[str, Any]:
        out = super().after(spec, ctx, s, trainer, tokenizer, None)
        steps = [h for h in trainer.state.log_history if "objective/entropy" in h]
        if steps:
            out["objective/entropy"] = steps[-1]["objective/entropy"]
        return out

    def save(self, spec: StageSpec, ctx: Context, s: Settings, trainer: Any, tokenizer: Any) -> None:
        tokenizer.padding_side = "right"  # as every other stage saves it
        super().save(spec, ctx, s, trainer, tokenizer)

    def plan(self, spec: StageSpec, ctx: Context):
        """Memory plan of PPO: the policy's training, plus the value model trained in full (weights,
        gradients, optimizer states, all saved in every checkpoint), the frozen reward model and, without
        LoRA, the frozen reference. Approximate: rollouts are short, so activations are the policy's."""

        args = self.args(spec, ctx)
        args.max_length = args.response_length + 128
        plan = policy_plan(spec, ctx, args)
        if plan is None:
            return None
        if args.total_episodes:  # PPO's updates, for the checkpoints the disk check counts
            batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world()[1]
            plan.steps = -(-args.total_episodes // batch)
        reward_config = model_config(spec.cfg["reward_model"], ctx, f"{spec.where}.reward_model")
        value_config = (
            model_config(spec.cfg["value_model"], ctx, f"{spec.where}.value_model")
            if "value_model" in spec.cfg
            else reward_config
        )
        if reward_config is None or value_config is None:
            return plan  # a reward stage not planned yet: the policy's part
        value = model_structure(value_config)[1]
        plan.parts["value_model"] = value * 4.0
        plan.parts["gradients"] = plan.parts.get("gradients", 0.0) + value * 4.0
        plan.parts["optimizer"] = plan.parts.get("optimizer", 0.0) + optimizer_bytes(args.optim, value, 4, [])
        plan.parts["reward_model"] = model_structure(reward_config)[1] * 4.0
        if "lora" not in spec.cfg:
            plan.parts["reference"] = plan.parts["weights"]
        plan.notes.append("value model trained in full in fp32; reward model (and reference) frozen")
        return plan

    def tokens(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, shown: int):
        """The prompts as the policy reads them (tokenized by `prepare`); the answers are sampled while training."""
        return prompt_tokens(train, tokenizer, s.args, shown, "PPOTrainer")
