"""RLHF's third step: optimise the policy against a reward model with PPO (`trl.experimental.ppo`,
TRL 1.12; pinned until tunelab owns its PPO).

The policy starts from `model` (usually `${sft}`; an adapter is merged first); the reference is a
frozen copy of it (with `lora:`, the policy with its adapter switched off); `reward_model` is a
reward stage's classifier (`${reward}`); the value model starts from `value_model`, by default
the reward model. Prompts come from `data` (`prompt_column`), tokenized and left-padded for
generation. `training` is TRL's `PPOConfig`; tunelab sets `stop_token: eos` unless the recipe
says otherwise, so responses end where the policy stops, as the reward model was trained, and
`num_sample_generations: 0` (TRL prints ten tables of samples otherwise).

Every step logs the reward-model score, KL to the reference, entropy and value loss (also in
`log_history.json`, plotted in report.md). A NaN/inf loss or score, or KL past `kl_limit`, stops
the run with one line naming the step and the last good checkpoint.

The loop is `tunelab.training.ppo_trainer.ResumablePPOTrainer`: TRL's algorithm with checkpoints that
hold the value model too, a prompt order fixed by the seed, and `--resume` that continues from the
newest checkpoint; it runs on every process of `tunelab launch` (each rank answers its slice of
every rollout batch, with its own sampling seed).
"""

from __future__ import annotations

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
from tunelab.models.tokenizers import load_tokenizer, same_tokenizer, tokenizer_origin
from tunelab.stages import Context, Metrics, StageSpec
from tunelab.stages.base import Settings, TrainerStage, sections
from tunelab.training.distributed import world
from tunelab.training.tokenized import prompt_tokens

# PPOConfig fields used by TRL's example script, not by the trainer: the recipe names these models.
NOT_TRAINER_KEYS = ("sft_model_path", "reward_model_path")
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
    batch = local * size
    if n < batch:
        on = f" x {size} processes" if size > 1 else ""
        raise TunelabError(
            f"'{spec.where}.data' has {n} prompts, fewer than one rollout batch of {batch} "
            f"(per_device_train_batch_size x gradient_accumulation_steps{on}): add prompts or lower the batch size"
        )


def _tokenized(ds, column: str, tokenizer):
    """Prompts as `input_ids` only, which is what PPOTrainer's collator pads."""

    def encode(row):
        prompt = row[column]
        if isinstance(prompt, list):  # chat messages
            return {"input_ids": tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)}
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
    config_class = "trl.experimental.ppo:PPOConfig"
    trainer_class = "tunelab.training.ppo_trainer:ResumablePPOTrainer"
    ranks = "all"  # every process rolls out and trains on its slice of each batch
    # Responses end at EOS, as the reward model saw them; TRL's 10 sample tables per run would flood the console.
    defaults = {"stop_token": "eos", "num_sample_generations": 0}
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
            "training": "trl.experimental.ppo.PPOConfig fields (learning_rate, total_episodes, kl_coef, "
            "response_length, ...)",
            "lora": "peft.LoraConfig fields: train a LoRA policy (the reference is the policy without its adapter)",
            "kl_limit": "stop when the KL to the reference passes this value (objective/kl); NaN always stops",
        },
        common=("lora", "chat_template", "system"),
    )

    def training_values(self, spec: StageSpec, ctx: Context) -> dict[str, Any]:
        values = super().training_values(spec, ctx)
        for key in NOT_TRAINER_KEYS:
            if key in values:
                raise TunelabError(
                    f"'{spec.where}.training.{key}' is not used by the trainer: set the stage's "
                    "`model:`/`reward_model:`"
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
        tokenizer = load_tokenizer(s.model["path"])
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
            "eval_dataset": train.select(range(min(len(train), s.args.per_device_eval_batch_size))),
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
