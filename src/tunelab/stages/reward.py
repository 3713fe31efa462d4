"""Reward modelling with `trl.RewardTrainer`: a sequence classifier with one output, trained on
preference pairs so that it scores the chosen answer above the rejected one.

`training` is `trl.RewardConfig`; `lora` is `peft.LoraConfig` (task type SEQ_CLS: the new score
head trains and is saved with the adapter); `quantization` is `BitsAndBytesConfig`. Data are
TRL's preference format: `chosen`/`rejected` with or without a `prompt` column, plain text or
conversational. The model usually starts from the SFT stage (`model: ${sft}`): a causal LM, or
an adapter on one, gets a new score head on its backbone.

The stage folder holds a full `AutoModelForSequenceClassification` (`num_labels=1`; a LoRA adapter
is merged so PPO, GRPO and eval load it directly) and the tokenizer. With quantization the
adapter is saved instead. Pairwise accuracy on `eval_data` is measured exactly (every held-out
pair scored), before and after training.
"""

from __future__ import annotations

from typing import Any

from tunelab.models.loading import prepare_kbit
from tunelab.models.reward_models import load_sequence_classifier, reward_scores
from tunelab.stages import TRAINING, Context, Metrics, StageSpec
from tunelab.stages.base import PreferenceStage, Settings, sections
from tunelab.training.tokenized import reward_tokens


def _texts(ds, tokenizer) -> tuple[list[str], list[str]]:
    """Chosen and rejected full texts as the reward model reads them (chat template for messages)."""

    def render(prompt: Any, answer: Any) -> str:
        if isinstance(answer, list):  # conversational
            return tokenizer.apply_chat_template((prompt or []) + answer, tokenize=False)
        return (prompt or "") + answer

    prompts = ds["prompt"] if "prompt" in ds.column_names else [None] * len(ds)
    chosen = [render(p, c) for p, c in zip(prompts, ds["chosen"], strict=True)]
    rejected = [render(p, r) for p, r in zip(prompts, ds["rejected"], strict=True)]
    return chosen, rejected


def pairwise_accuracy(model, tokenizer, ds, batch_size: int = 32) -> dict[str, float]:
    """Share of pairs whose chosen text scores above the rejected one, and the mean margin."""
    chosen, rejected = _texts(ds, tokenizer)
    good = reward_scores(model, tokenizer, chosen, batch_size)
    bad = reward_scores(model, tokenizer, rejected, batch_size)
    wins = [g > b for g, b in zip(good, bad, strict=True)]
    return {
        "pairwise_accuracy": sum(wins) / len(wins),
        "margin": sum(g - b for g, b in zip(good, bad, strict=True)) / len(wins),
        "pairs": float(len(wins)),
    }


class Reward(PreferenceStage):
    config_class = "trl:RewardConfig"
    trainer_class = "trl:RewardTrainer"
    task_type = "SEQ_CLS"
    defaults = {"eval_strategy": "no"}  # held-out pairs are scored exactly, before and after training
    metrics = Metrics(
        summary=(*TRAINING, "untrained_pairwise_accuracy", "pairwise_accuracy"),
        progress={"accuracy": "pref_acc", "margin": "margin"},
    )
    sections = sections(
        {
            "model": "starting model: usually ${sft}; a causal LM (or adapter) gets a new score head",
            "data": "preference pairs: chosen and rejected columns, optional prompt (datasets.load_dataset arguments)",
            "eval_data": "held-out pairs (default split: test); pairwise accuracy before and after training",
            "training": "trl.RewardConfig fields (learning_rate, max_steps, max_length, "
            "center_rewards_coefficient, ...)",
            "lora": "peft.LoraConfig fields (task type SEQ_CLS); omit for full fine-tuning",
            "quantization": "transformers.BitsAndBytesConfig fields: train a LoRA reward model on a 4/8-bit base",
        }
    )

    def model(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any) -> Any:
        from transformers import set_seed

        set_seed(ctx.seed)  # the new score head's initial weights
        model = load_sequence_classifier(s.model, num_labels=1, quantization=s.quantization)
        return prepare_kbit(model, s.quantization, s.args.gradient_checkpointing)

    def before(self, spec, ctx, s, trainer, tokenizer, evaluation) -> dict[str, Any]:
        if s.quantization is not None:
            # TRL casts every trainable parameter to bf16 for QLoRA; the new score head then meets the fp32
            # hidden states (norms are fp32 after kbit preparation) outside autocast: a dtype error. Keep it fp32.
            for name, param in trainer.model.named_parameters():
                if param.requires_grad and "lora_" not in name:
                    param.data = param.data.float()
        if evaluation is None:
            return {}
        before = pairwise_accuracy(trainer.model, tokenizer, evaluation, s.args.per_device_eval_batch_size)
        return {"untrained_pairwise_accuracy": before["pairwise_accuracy"]}

    def train(self, spec: StageSpec, ctx: Context, s: Settings, trainer: Any) -> dict[str, Any]:
        trained = super().train(spec, ctx, s, trainer)
        # RewardTrainer's running averages over the last logging window; the exact held-out figures follow.
        for key in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
            if key in trained:
                trained[f"train_{key}"] = trained.pop(key)
        if s.lora is not None and s.quantization is None:
            trainer.model = trainer.model.merge_and_unload()  # a plain classifier: PPO, GRPO and eval load it as is
        return trained

    def after(self, spec, ctx, s, trainer, tokenizer, evaluation) -> dict[str, Any]:
        if evaluation is None:
            return {}
        return pairwise_accuracy(trainer.model, tokenizer, evaluation, s.args.per_device_eval_batch_size)

    def tokens(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, shown: int):
        """Pairs as RewardTrainer tokenizes them: each whole sequence, scored at its last token."""
        return reward_tokens(train, tokenizer, s.args, shown)

    def save(self, spec: StageSpec, ctx: Context, s: Settings, trainer: Any, tokenizer: Any) -> None:
        if trainer.args.should_save:  # the main process
            trainer.model.save_pretrained(str(spec.out_dir))
            tokenizer.save_pretrained(str(spec.out_dir))
