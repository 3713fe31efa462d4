"""Kahneman-Tversky optimisation with `trl.KTOTrainer`: the policy learns from answers marked good or bad
one at a time, without pairs, against a frozen reference (Ethayarajh et al. 2024).

Data are TRL's unpaired preference format: `prompt`, `completion` and a boolean `label` (True: a desirable
answer). Paired data (`prompt`, `chosen`, `rejected`, as the reward and dpo stages read) is unpaired here:
each pair gives one desirable and one undesirable row, shuffled with the recipe's seed so that batches mix
both (KTO's KL estimate and `rewards/margins` need both in a batch). `training` is `trl.KTOConfig`
(`beta`, `desirable_weight`, `undesirable_weight`, `loss_type`, ...). The reference is the starting model:
with LoRA, the base with the adapter switched off; without, a frozen copy loaded from the same folder.
"""

from __future__ import annotations

from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.data.datasets import require_preferences, require_values
from tunelab.models.chat_templates import conversational
from tunelab.stages import TRAINING, Context, Metrics, StageSpec
from tunelab.stages.base import PREFERENCE_PROGRESS, PreferenceStage, Settings, sections
from tunelab.training.tokenized import kto_tokens

UNPAIRED = ("prompt", "completion", "label")
PAIRED = ("chosen", "rejected")


def _check_rows(ds: Any, where: str) -> str:
    """'paired' or 'unpaired', from the columns; one line when neither."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = ds.column_names
    if all(c in columns for c in UNPAIRED):
        labels = ds.data.column("label") if getattr(ds, "_indices", None) is None else ds.with_format("arrow")["label"]
        if not pa.types.is_boolean(labels.type) or labels.null_count:  # every row, from the Arrow schema
            shown = next((v for v in ds["label"] if not isinstance(v, bool)), None)
            raise TunelabError(
                f"'{where}': column 'label' holds {type(shown).__name__} values ({shown!r}): KTO labels are true "
                "(a desirable completion) or false (an undesirable one)"
            )
        require_values(ds, "prompt", where, "turns")
        require_values(ds, "completion", where, "turns", empty=False)
        if not pc.any(pc.invert(labels)).as_py():
            raise TunelabError(
                f"'{where}': every 'label' is true: KTO learns from desirable and undesirable completions together "
                "(its KL estimate and margins need both); add rows labelled false, or use the sft stage"
            )
        return "unpaired"
    if all(c in columns for c in PAIRED):
        require_preferences(ds, where)
        return "paired"
    raise TunelabError(
        f"'{where}' is not KTO data: it needs prompt, completion and label (true/false) columns, or preference "
        f"pairs (chosen and rejected), which are unpaired for it; its columns are {', '.join(columns)}"
    )


class KTO(PreferenceStage):
    config_class = "trl:KTOConfig"
    trainer_class = "trl:KTOTrainer"
    reference = True
    chat_columns = ("prompt", "completion", "chosen", "rejected")
    data_hint = "name prompt/completion/label rows, or preference pairs (chosen and rejected columns)"
    data_target = "kto"
    metrics = Metrics(summary=(*TRAINING, "eval_rewards/margins"), progress={**PREFERENCE_PROGRESS, "kl": "kl"})
    eval_keys = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_kl")
    sections = sections(
        {
            "model": "policy to train: usually ${sft} (adapter folders are merged first)",
            "data": "prompt/completion/label rows, or preference pairs (prompt, chosen, rejected), unpaired here",
            "eval_data": "held-out rows of either form (default split: test); eval rewards and KL are reported",
            "training": "trl.KTOConfig fields (beta, desirable_weight, undesirable_weight, loss_type, ...)",
            "lora": "peft.LoraConfig fields; omit for full fine-tuning against a frozen copy",
        }
    )

    def data(self, spec: StageSpec, ctx: Context, s: Settings) -> tuple[Any, Any]:
        train = self.load(spec, ctx, "data")
        _check_rows(train, f"{spec.where}.data")
        evaluation = None
        if spec.cfg.get("eval_data") is not None:
            evaluation = self.load(spec, ctx, "eval_data")
            _check_rows(evaluation, f"{spec.where}.eval_data")
        return train, evaluation

    def check_more(self, spec: StageSpec, ctx: Context, s: Settings, train: Any, evaluation: Any) -> None:
        where = f"{spec.where}.training"
        if s.args.loss_type == "kto" and s.args.per_device_train_batch_size < 2:
            raise TunelabError(
                f"'{where}.per_device_train_batch_size' is 1: KTO estimates its KL term from the other rows of a "
                "batch; use 2 or more (or loss_type: apo_zero_unpaired)"
            )

    def prepare(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, evaluation: Any):
        return [None if ds is None else self._unpaired(ds, tokenizer, s, ctx.seed) for ds in (train, evaluation)]

    def _unpaired(self, ds: Any, tokenizer: Any, s: Settings, seed: int) -> Any:
        from trl import unpair_preference_dataset

        if "label" not in ds.column_names:
            ds = conversational(ds, tokenizer, s.chat, s.system, answers=PAIRED)
            return unpair_preference_dataset(ds).shuffle(seed=seed)  # good and bad answers in every batch
        return conversational(ds, tokenizer, s.chat, s.system, answers=("completion",))

    def tokens(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, shown: int):
        """Rows as KTOTrainer tokenizes them: the prompt, then the completion (the marked tokens)."""
        return kto_tokens(train, tokenizer, s.args, shown)
