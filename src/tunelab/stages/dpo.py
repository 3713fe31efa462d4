"""Direct preference optimisation with `trl.DPOTrainer`: the policy learns from preference pairs
directly, without a reward model or sampling.

`training` is `trl.DPOConfig` (`beta`, `loss_type`, `max_length`, ...), `lora` is
`peft.LoraConfig`, `quantization` is `BitsAndBytesConfig`. Data are the same preference pairs as
the reward stage. The reference model is the starting model: with LoRA, the base with the
adapter switched off (no second copy in memory); without, a frozen copy loaded from the same
folder. (TRL would otherwise rebuild it from `config._name_or_path`, which for a merged SFT
adapter names the pre-SFT base.)
"""

from __future__ import annotations

from typing import Any

from tunelab.stages import Context, StageResult, StageSpec

PRODUCES_MODEL = True
RANKS = "all"  # trains on every process of a distributed run (the Trainer shards the data)
SECTIONS = {
    "model": "policy to train: usually ${sft} (adapter folders are merged first)",
    "data": "preference pairs: prompt, chosen, rejected (datasets.load_dataset arguments)",
    "eval_data": "held-out pairs (default split: test); DPO's eval reward accuracy is reported",
    "training": "trl.DPOConfig fields (beta, loss_type, learning_rate, max_steps, max_length, ...)",
    "lora": "peft.LoraConfig fields; omit for full fine-tuning against a frozen copy",
    "quantization": "transformers.BitsAndBytesConfig fields: DPO with QLoRA",
    "chat_template": "prompts through the model's chat template: true (default, when it has one), false, or a template",
    "system": "system prompt for chat-templated prompts",
}


def _args(spec: StageSpec, ctx: Context):
    from trl import DPOConfig

    from tunelab.training import training_args

    return training_args(DPOConfig, spec.cfg.get("training"), f"{spec.where}.training", spec.out_dir, ctx.seed)


def check(spec: StageSpec, ctx: Context) -> None:
    from tunelab.chat import check_chat_data, setting, system_prompt
    from tunelab.models import stage_model
    from tunelab.preflight import check_model, check_training
    from tunelab.stages import reward, sft

    check_training(_args(spec, ctx), spec)
    lora = sft._lora(spec.cfg.get("lora"), f"{spec.where}.lora")
    sft._quantization(spec)
    stage_model(spec, ctx)
    check_model(spec, ctx, lora)
    setting(spec.cfg, spec.where), system_prompt(spec.cfg, spec.where)
    check_chat_data(reward.preference_data(spec)[0], ("prompt", "chosen", "rejected"), spec, ctx)


def run(spec: StageSpec, ctx: Context) -> StageResult:
    from trl import DPOTrainer

    from tunelab.data import fingerprint
    from tunelab.models import load_causal_lm, load_tokenizer, prepare_kbit, stage_model
    from tunelab.stages import reward, sft
    from tunelab.training import guarded_train

    args = _args(spec, ctx)
    peft_config = sft._lora(spec.cfg.get("lora"), f"{spec.where}.lora")
    quant = sft._quantization(spec)
    mspec = stage_model(spec, ctx)
    train_ds, eval_ds = reward.preference_data(spec)
    tokenizer = load_tokenizer(mspec["path"])
    train_ds, eval_ds = reward.chat_pairs(spec, tokenizer, train_ds, eval_ds)
    model = prepare_kbit(load_causal_lm(mspec, quantization=quant), quant, args.gradient_checkpointing)
    ref_model = None if peft_config is not None else load_causal_lm(mspec)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    metrics: dict[str, Any] = guarded_train(trainer, spec, ctx.resume)
    if eval_ds is not None:
        out = trainer.evaluate()
        keep = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
        metrics.update({k: float(v) for k, v in out.items() if k in keep})
    trainer.save_model(str(spec.out_dir))
    if trainer.args.should_save:  # the main process (several write the same files otherwise)
        tokenizer.save_pretrained(str(spec.out_dir))
    prints = {"data": fingerprint(train_ds)} | ({"eval_data": fingerprint(eval_ds)} if eval_ds is not None else {})
    return StageResult(metrics=metrics, model=spec.out_dir, fingerprints=prints)


def plan(spec: StageSpec, ctx: Context):
    """Memory plan of the policy's training (approximate: chosen and rejected share a batch; without
    LoRA the frozen reference adds one more copy of the weights)."""
    from tunelab.plan import policy_plan

    return policy_plan(spec, ctx, _args(spec, ctx))
