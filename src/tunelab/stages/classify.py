"""Text classification with an encoder and a new head: `AutoModelForSequenceClassification` and the
transformers `Trainer`, full or LoRA.

`training` is `transformers.TrainingArguments`; `lora` is `peft.LoraConfig` (task type SEQ_CLS: the
new head trains with the adapter and is saved with it). Before training, the untrained head is
scored on `eval_data`, so the report shows what fine-tuning added. Metrics are tunelab's offline
`accuracy` and `f1` (macro) modules.
"""

from __future__ import annotations

from typing import Any

from tunelab.adapters import lora_config
from tunelab.data import fingerprint, load_split, require_columns
from tunelab.errors import TunelabError
from tunelab.metrics import load as load_metric
from tunelab.models import load_kwargs, load_tokenizer, stage_model
from tunelab.preflight import check_model, check_training
from tunelab.runs import write_json
from tunelab.stages import TRAINING, Context, Metrics, StageResult, StageSpec
from tunelab.training import train, training_args

PRODUCES_MODEL = True
METRICS = Metrics(summary=(*TRAINING, "untrained_accuracy", "accuracy", "f1"))
RANKS = "all"  # trains on every process of a distributed run (the Trainer shards the data)
SECTIONS = {
    "model": "encoder to fine-tune: folder, hub id, pkg:PACKAGE/folder, ${stage}, or {path, ...}",
    "data": "labelled training data: datasets.load_dataset arguments",
    "eval_data": "held-out labelled data (default split: test); accuracy and F1 before and after",
    "text_column": "column with the text (default: text)",
    "label_column": "column with integer class labels 0..n-1 (default: label)",
    "labels": "class names in label order (default: the label numbers)",
    "training": "transformers.TrainingArguments fields (learning_rate, num_train_epochs, ...)",
    "lora": "peft.LoraConfig fields; omit for full fine-tuning",
}


def _columns(spec: StageSpec) -> tuple[str, str]:
    return spec.cfg.get("text_column", "text"), spec.cfg.get("label_column", "label")


def _args(spec: StageSpec, ctx: Context):
    from transformers import TrainingArguments

    values = {"eval_strategy": "epoch" if spec.cfg.get("eval_data") else "no", **(spec.cfg.get("training") or {})}
    return training_args(TrainingArguments, values, f"{spec.where}.training", spec.out_dir, ctx.seed)


def _data(spec: StageSpec):

    text, label = _columns(spec)
    if "data" not in spec.cfg:
        raise TunelabError(f"'{spec.where}' has no `data:`: name a labelled dataset (text and label columns)")
    train = load_split(spec.cfg["data"], f"{spec.where}.data", "train")
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
    names = spec.cfg.get("labels") or [str(i) for i in range(n)]
    if len(names) < n:
        raise TunelabError(f"'{spec.where}.labels' names {len(names)} classes but the data has labels up to {n - 1}")
    return train, evaluation, list(names)


def _model_path(spec: StageSpec, ctx: Context) -> dict[str, Any] | None:

    return stage_model(spec, ctx, "an encoder (folder, hub id or pkg:PACKAGE/folder)")


def _lora(spec: StageSpec):

    return lora_config(spec.cfg.get("lora"), f"{spec.where}.lora", task_type="SEQ_CLS")


def check(spec: StageSpec, ctx: Context) -> None:

    check_training(_args(spec, ctx), spec)
    lora = _lora(spec)
    _model_path(spec, ctx)
    check_model(spec, ctx, lora, task="SEQ_CLS")
    _data(spec)


def plan(spec: StageSpec, ctx: Context):
    return None  # the planner covers causal LMs; encoders of this size fit anywhere


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


def run(spec: StageSpec, ctx: Context) -> StageResult:
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, set_seed

    args = _args(spec, ctx)
    train_ds, eval_ds, names = _data(spec)
    mspec = _model_path(spec, ctx)
    text, label = _columns(spec)
    tokenizer = load_tokenizer(mspec["path"])
    set_seed(ctx.seed)  # the new head's initial weights
    model = AutoModelForSequenceClassification.from_pretrained(
        mspec["path"],
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        **load_kwargs(mspec),
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = _lora(spec)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)

    def encode(batch):
        return tokenizer(batch[text], truncation=True, max_length=getattr(tokenizer, "model_max_length", 512))

    columns = [c for c in train_ds.column_names if c != label]
    train_enc = train_ds.map(encode, batched=True, remove_columns=columns).rename_column(label, "labels")
    eval_enc = None
    if eval_ds is not None:
        eval_cols = [c for c in eval_ds.column_names if c != label]
        eval_enc = eval_ds.map(encode, batched=True, remove_columns=eval_cols).rename_column(label, "labels")
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def compute_metrics(pred):
        predictions = pred.predictions.argmax(-1)
        return {
            **accuracy.compute(predictions=predictions, references=pred.label_ids),
            "f1": f1.compute(predictions=predictions, references=pred.label_ids, average="macro")["f1"],
        }

    collator = DataCollatorWithPadding(tokenizer)
    metrics: dict[str, Any] = {}
    if eval_enc is not None:
        untrained = _score_untrained(
            model, eval_enc, collator, args.per_device_eval_batch_size, args.device, compute_metrics
        )
        metrics.update({f"untrained_{k}": v for k, v in untrained.items()})
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_enc,
        eval_dataset=eval_enc,
        data_collator=collator,
        compute_metrics=compute_metrics,
    )
    metrics.update(train(trainer, spec.out_dir, ctx.resume))
    if eval_enc is not None:
        metrics.update(_score(trainer, eval_enc))
        _confusion(trainer, eval_enc, names, spec.out_dir)
    trainer.save_model(str(spec.out_dir))
    if trainer.args.should_save:  # the main process (several write the same files otherwise)
        tokenizer.save_pretrained(str(spec.out_dir))
    prints = {"data": fingerprint(train_ds)} | ({"eval_data": fingerprint(eval_ds)} if eval_ds is not None else {})
    return StageResult(metrics=metrics, model=spec.out_dir, fingerprints=prints)
