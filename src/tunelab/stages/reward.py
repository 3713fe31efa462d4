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

from tunelab.errors import TunelabError
from tunelab.stages import Context, StageResult, StageSpec

PRODUCES_MODEL = True
RANKS = "all"  # trains on every process of a distributed run (the Trainer shards the data)
SECTIONS = {
    "model": "starting model: usually ${sft}; a causal LM (or adapter) gets a new score head",
    "data": "preference pairs: chosen and rejected columns, optional prompt (datasets.load_dataset arguments)",
    "eval_data": "held-out pairs (default split: test); pairwise accuracy before and after training",
    "training": "trl.RewardConfig fields (learning_rate, max_steps, max_length, center_rewards_coefficient, ...)",
    "lora": "peft.LoraConfig fields (task type SEQ_CLS); omit for full fine-tuning",
    "quantization": "transformers.BitsAndBytesConfig fields: train a LoRA reward model on a 4/8-bit base",
    "chat_template": "prompts through the model's chat template: true (default, when it has one), false, or a template",
    "system": "system prompt for chat-templated prompts",
}


def _args(spec: StageSpec, ctx: Context):
    from trl import RewardConfig

    from tunelab.training import training_args

    values = {"eval_strategy": "no", **(spec.cfg.get("training") or {})}
    return training_args(RewardConfig, values, f"{spec.where}.training", spec.out_dir, ctx.seed)


def _lora(spec: StageSpec):
    from tunelab.stages.sft import _lora

    return _lora(spec.cfg.get("lora"), f"{spec.where}.lora", task_type="SEQ_CLS")


def _quantization(spec: StageSpec):
    from tunelab.stages.sft import _quantization

    return _quantization(spec)


def preference_data(spec: StageSpec):
    """(train, eval) preference datasets, with their columns checked."""
    from tunelab.data import load_split, require_preferences

    if "data" not in spec.cfg:
        raise TunelabError(f"'{spec.where}' has no `data:`: name preference pairs (chosen and rejected columns)")
    train = load_split(spec.cfg["data"], f"{spec.where}.data", "train")
    require_preferences(train, f"{spec.where}.data")
    evaluation = None
    if spec.cfg.get("eval_data") is not None:
        evaluation = load_split(spec.cfg["eval_data"], f"{spec.where}.eval_data", "test")
        require_preferences(evaluation, f"{spec.where}.eval_data")
    return train, evaluation


def check(spec: StageSpec, ctx: Context) -> None:
    from tunelab.chat import check_chat_data, setting, system_prompt
    from tunelab.models import stage_model
    from tunelab.preflight import check_model, check_training

    check_training(_args(spec, ctx), spec)
    lora = _lora(spec)
    setting(spec.cfg, spec.where), system_prompt(spec.cfg, spec.where)
    _quantization(spec)
    stage_model(spec, ctx)
    check_model(spec, ctx, lora, task="SEQ_CLS")
    check_chat_data(preference_data(spec)[0], ("prompt", "chosen", "rejected"), spec, ctx)


def chat_pairs(spec: StageSpec, tokenizer: Any, *datasets: Any) -> list[Any]:
    """Plain-text pairs as chats when the tokenizer has a chat template (see `tunelab.chat.conversational`)."""
    from tunelab.chat import conversational, setting, system_prompt

    value, system = setting(spec.cfg, spec.where), system_prompt(spec.cfg, spec.where)
    return [
        None if ds is None else conversational(ds, tokenizer, value, system, answers=("chosen", "rejected"))
        for ds in datasets
    ]


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
    from tunelab.models import reward_scores

    chosen, rejected = _texts(ds, tokenizer)
    good = reward_scores(model, tokenizer, chosen, batch_size)
    bad = reward_scores(model, tokenizer, rejected, batch_size)
    wins = [g > b for g, b in zip(good, bad, strict=True)]
    return {
        "pairwise_accuracy": sum(wins) / len(wins),
        "margin": sum(g - b for g, b in zip(good, bad, strict=True)) / len(wins),
        "pairs": float(len(wins)),
    }


def run(spec: StageSpec, ctx: Context) -> StageResult:
    from transformers import set_seed
    from trl import RewardTrainer

    from tunelab.data import fingerprint
    from tunelab.models import load_sequence_classifier, load_tokenizer, prepare_kbit, stage_model
    from tunelab.training import train

    args = _args(spec, ctx)
    peft_config = _lora(spec)
    quant = _quantization(spec)
    mspec = stage_model(spec, ctx)
    train_ds, eval_ds = preference_data(spec)
    tokenizer = load_tokenizer(mspec["path"])
    train_ds, eval_ds = chat_pairs(spec, tokenizer, train_ds, eval_ds)
    set_seed(ctx.seed)  # the new score head's initial weights
    model = load_sequence_classifier(mspec, num_labels=1, quantization=quant)
    model = prepare_kbit(model, quant, args.gradient_checkpointing)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if quant is not None:
        # TRL casts every trainable parameter to bf16 for QLoRA; the new score head then meets the fp32
        # hidden states (norms are fp32 after kbit preparation) outside autocast: a dtype error. Keep it fp32.
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.data = param.data.float()
    metrics: dict[str, Any] = {}
    if eval_ds is not None:
        before = pairwise_accuracy(trainer.model, tokenizer, eval_ds, args.per_device_eval_batch_size)
        metrics["untrained_pairwise_accuracy"] = before["pairwise_accuracy"]
    trained = train(trainer, spec.out_dir, ctx.resume)
    # RewardTrainer's running averages over the last logging window; the exact held-out figures follow.
    for key in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        if key in trained:
            trained[f"train_{key}"] = trained.pop(key)
    metrics.update(trained)
    model = trainer.model
    if peft_config is not None and quant is None:
        model = model.merge_and_unload()  # a plain classifier: PPO, GRPO and eval load it as is
    if eval_ds is not None:
        metrics.update(pairwise_accuracy(model, tokenizer, eval_ds, args.per_device_eval_batch_size))
    if trainer.args.should_save:  # the main process
        model.save_pretrained(str(spec.out_dir))
        tokenizer.save_pretrained(str(spec.out_dir))
    prints = {"data": fingerprint(train_ds)} | ({"eval_data": fingerprint(eval_ds)} if eval_ds is not None else {})
    return StageResult(metrics=metrics, model=spec.out_dir, fingerprints=prints)


def plan(spec: StageSpec, ctx: Context):
    """Memory plan: the classifier costs what its causal LM backbone costs (the score head is tiny)."""
    from tunelab.plan import policy_plan

    return policy_plan(spec, ctx, _args(spec, ctx))
