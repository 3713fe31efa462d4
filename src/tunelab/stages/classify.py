"""Text classification with an encoder and a new head: `AutoModelForSequenceClassification` and the
transformers `Trainer`, full or LoRA.

`training` is `transformers.TrainingArguments`; `lora` is `peft.LoraConfig` (task type SEQ_CLS: the
new head trains with the adapter and is saved with it). Before training, the untrained head is
scored on `eval_data`, so the report shows what fine-tuning added. Metrics are tunelab's offline
`accuracy` and `f1` (macro) modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.core.runs import write_json
from tunelab.data.datasets import load_split, require_columns
from tunelab.metrics import load as load_metric
from tunelab.models.spec import load_kwargs
from tunelab.stages import TRAINING, Context, Metrics, StageSpec
from tunelab.stages.base import Settings, TrainerStage, sections


def _score_untrained(model, dataset, collator, batch_size: int, device, compute_metrics) -> dict[str, float]:
    """Accuracy and F1 of the model before training, in plain forward passes on this process.

    Not `Trainer.evaluate`: under several processes an evaluation before `train` leaves the ranks
    training apart (transformers 5.23; caught by `training.check_ranks_in_sync`).
    """
    import numpy as np
    import torch
    from transformers import EvalPrediction

    model.to(device).eval()
    logits, labels = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            labels.append(batch.pop("labels").numpy())
            logits.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy())
    model.train()
    out = compute_metrics(EvalPrediction(predictions=np.concatenate(logits), label_ids=np.concatenate(labels)))
    return {k: float(v) for k, v in out.items() if k in ("accuracy", "f1")}


def _score(trainer, dataset) -> dict[str, float]:
    out = trainer.evaluate(dataset)
    return {k.removeprefix("eval_"): float(v) for k, v in out.items() if k in ("eval_accuracy", "eval_f1")}


def _confusion(trainer, dataset, names: list[str], out_dir) -> None:
    """Counts of (true label, predicted label) on the held-out data, for the report's confusion matrix."""

    out = trainer.predict(dataset)
    matrix = [[0] * len(names) for _ in names]
    for true, pred in zip(out.label_ids.tolist(), out.predictions.argmax(-1).tolist(), strict=True):
        matrix[true][pred] += 1
    if trainer.args.should_save:  # predict gathers from every rank; one of them writes
        write_json(out_dir / "confusion.json", {"labels": names, "matrix": matrix})


@dataclass(kw_only=True)
class ClassifySettings(Settings):
    """The columns classify reads and the class names the recipe gives."""

    text_column: str
    label_column: str
    labels: list[str] | None
    """Class names in label order (`labels:`); None: the label numbers."""


class Classify(TrainerStage):
    config_class = "transformers:TrainingArguments"
    trainer_class = "transformers:Trainer"
    task_type = "SEQ_CLS"
    chat_columns = ()  # encoders read text, not chats
    model_hint = "an encoder (folder, hub id or pkg:PACKAGE/folder)"
    data_hint = "name a labelled dataset (text and label columns)"
    metrics = Metrics(summary=(*TRAINING, "untrained_accuracy", "accuracy", "f1"))
    sections = sections(
        {
            "model": "encoder to fine-tune: folder, hub id, pkg:PACKAGE/folder, ${stage}, or {path, ...}",
            "data": "labelled training data: datasets.load_dataset arguments",
            "eval_data": "held-out labelled data (default split: test); accuracy and F1 before and after",
            "text_column": "column with the text (default: text)",
            "label_column": "column with integer class labels 0..n-1 (default: label)",
            "labels": "class names in label order (default: the label numbers)",
            "training": "transformers.TrainingArguments fields (learning_rate, num_train_epochs, ...)",
            "lora": "peft.LoraConfig fields; omit for full fine-tuning",
        },
        common=("lora",),
    )

    def training_values(self, spec: StageSpec, ctx: Context) -> dict[str, Any]:
        return {"eval_strategy": "epoch" if spec.cfg.get("eval_data") else "no", **super().training_values(spec, ctx)}

    def settings(self, spec: StageSpec, ctx: Context) -> ClassifySettings:
        return ClassifySettings(
            **vars(super().settings(spec, ctx)),
            text_column=spec.cfg.get("text_column", "text"),
            label_column=spec.cfg.get("label_column", "label"),
            labels=spec.cfg.get("labels"),
        )

    def data(self, spec: StageSpec, ctx: Context, s: ClassifySettings) -> tuple[Any, Any]:
        """(train, eval), the label column a `datasets.ClassLabel` naming the classes (the model's head
        and the confusion matrix read the names from it)."""
        from datasets import ClassLabel

        text, label = s.text_column, s.label_column
        train = load_split(self.require_data(spec), f"{spec.where}.data", "train")
        require_columns(train, [text], f"{spec.where}.data", "text to classify; set text_column")
        require_columns(train, [label], f"{spec.where}.data", "class labels; set label_column")
        evaluation = None
        if spec.cfg.get("eval_data") is not None:
            evaluation = load_split(spec.cfg["eval_data"], f"{spec.where}.eval_data", "test")
            require_columns(evaluation, [text, label], f"{spec.where}.eval_data", "held-out text and labels")
        values = set(train[label]) | (set(evaluation[label]) if evaluation is not None else set())
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TunelabError(f"'{spec.where}.data': column '{label}' must hold integer class labels 0..n-1")
        n = max(values) + 1
        names = s.labels or [str(i) for i in range(n)]
        if len(names) < n:
            raise TunelabError(
                f"'{spec.where}.labels' names {len(names)} classes but the data has labels up to {n - 1}"
            )
        classes = ClassLabel(names=[str(name) for name in names])
        train = train.cast_column(label, classes)
        return train, None if evaluation is None else evaluation.cast_column(label, classes)

    def prepare(self, spec: StageSpec, ctx: Context, s: ClassifySettings, tokenizer: Any, train: Any, evaluation: Any):
        text, label = s.text_column, s.label_column

        def encode(batch):
            return tokenizer(batch[text], truncation=True, max_length=getattr(tokenizer, "model_max_length", 512))

        def encoded(ds: Any) -> Any:
            columns = [c for c in ds.column_names if c != label]
            return ds.map(encode, batched=True, remove_columns=columns).rename_column(label, "labels")

        return encoded(train), None if evaluation is None else encoded(evaluation)

    def model(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any) -> Any:
        """An encoder with a new head of one output per class (the names of the data's `ClassLabel`)."""
        from transformers import AutoModelForSequenceClassification, set_seed

        names = train.features["labels"].names
        set_seed(ctx.seed)  # the new head's initial weights
        model = AutoModelForSequenceClassification.from_pretrained(
            s.model["path"],
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            **load_kwargs(s.model),
        )
        if s.lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, s.lora)  # transformers' Trainer takes no peft_config
        return model

    def trainer_kwargs(self, spec, ctx, s, model, tokenizer, train, evaluation) -> dict[str, Any]:
        from transformers import DataCollatorWithPadding

        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        accuracy, f1 = load_metric("accuracy"), load_metric("f1")

        def compute_metrics(pred):
            predictions = pred.predictions.argmax(-1)
            return {
                **accuracy.compute(predictions=predictions, references=pred.label_ids),
                "f1": f1.compute(predictions=predictions, references=pred.label_ids, average="macro")["f1"],
            }

        return {
            "model": model,
            "args": s.args,
            "train_dataset": train,
            "eval_dataset": evaluation,
            "data_collator": DataCollatorWithPadding(tokenizer),
            "compute_metrics": compute_metrics,
        }

    def before(self, spec, ctx, s, trainer, tokenizer, evaluation) -> dict[str, Any]:
        if evaluation is None:
            return {}
        untrained = _score_untrained(
            trainer.model,
            evaluation,
            trainer.data_collator,
            s.args.per_device_eval_batch_size,
            s.args.device,
            trainer.compute_metrics,
        )
        return {f"untrained_{k}": v for k, v in untrained.items()}

    def after(self, spec, ctx, s, trainer, tokenizer, evaluation) -> dict[str, Any]:
        if evaluation is None:
            return {}
        scores = _score(trainer, evaluation)
        _confusion(trainer, evaluation, evaluation.features["labels"].names, spec.out_dir)
        return scores

    def plan(self, spec: StageSpec, ctx: Context):
        return None  # the planner covers causal LMs; encoders of this size fit anywhere
