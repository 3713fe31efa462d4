"""What TRL changed between 1.12 (tunelab's pin until TRL dropped PPO in 1.13) and 1.16 that a recipe can
name, refused at validate in one line that gives the new spelling, so an old recipe fails clearly instead of
training differently.

The `training:` fields of the configs tunelab's stages use (SFT, DPO, KTO, Reward, GRPO, RLOO, Distillation,
CPO, ORPO) kept their names: none was renamed or removed (compared field by field, 1.12 against 1.16). What
changed are values, and what the trainers accept once they start (the README's "TRL versions" has the table):

- `loss_type: chunked_nll` (SFTConfig: sft, pretrain, vlm_sft), 1.12's default, is a deprecated alias of `nll`
  in 1.16, whose loss goes through the fused LM head anyway: refused, use `nll`.
- `use_liger_kernel` (the fused-LM-head trainers: SFT, DPO, KTO, GRPO, RLOO) is deprecated; Liger's fused
  losses gave way to the fused LM head, and TRL names from_pretrained's `use_kernels` instead: refused, with
  `model: {path: ..., use_kernels: true}`.
- `router_aux_loss_coef` (same trainers): 1.12 defaulted it to 0.001 and dense models ignored it; 1.16 takes
  the model config's, and a non-zero value on a model without router logits fails as the trainer starts:
  refused at validate.
- LoRA on `lm_head` (same trainers): the fused head reads `lm_head.weight`, so 1.16 refuses an adapter there
  (1.12: SFT only): refused at validate.
- `loss_type` of DPO and GRPO: TRL checks it only when it computes the loss (GRPO: after the first
  generation): an unknown value is refused at validate, with the known ones.
- `pad_to_multiple_of` defaults to "auto" (128 on Neuron, else none), `label_smoothing_factor` in SFT is
  deprecated (an extra forward a step): both accepted.
- The experimental BCO, Nash-MD, XPO, MiniLLM, PRM, GSPO-token, SSD, replay-buffer GRPO and PPO trainers are
  gone: no stage used them (ppo is tunelab's own).

KTO's and CPO's `loss_type` are checked against the `choices` their configs declare
(`tunelab.core.config.check_keys`); DPO's and GRPO's configs declare none, and SFT's list the deprecated alias,
so their lists are here (tests/test_trl_versions.py holds them to TRL's code).
"""

from __future__ import annotations

from typing import Any

from tunelab.core.errors import TunelabError

# Configs whose trainers patch the model with TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`).
FUSED_HEAD_CONFIGS = ("SFTConfig", "DPOConfig", "KTOConfig", "GRPOConfig", "RLOOConfig")

# (config class name, field, value) -> what to write instead.
RENAMED_VALUES: dict[tuple[str, str, Any], str] = {
    ("SFTConfig", "loss_type", "chunked_nll"): (
        "TRL 1.16 made it a deprecated alias of nll, which computes the same loss through the fused LM head: "
        "use loss_type: nll (the default)"
    ),
}

# (config class names, field) -> (the value that is fine, what to write instead).
RENAMED_FIELDS: dict[tuple[tuple[str, ...], str], tuple[Any, str]] = {
    (FUSED_HEAD_CONFIGS, "use_liger_kernel"): (
        False,
        "TRL 1.16 deprecates it (Liger's fused loss gave way to TRL's fused LM head): remove it, and for Hub "
        "kernels set `use_kernels: true` in the stage's `model:` (model: {path: ..., use_kernels: true})",
    ),
}

# Loss types the trainers know where the config's `choices` are missing (DPO, GRPO) or list a deprecated
# alias (SFT), from TRL 1.16's docstrings and loss code. KTO's and CPO's `choices` are exact.
LOSS_TYPES: dict[str, tuple[str, ...]] = {
    "SFTConfig": ("nll", "dft"),
    "DPOConfig": (
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "sigmoid_norm",
    ),
    "GRPOConfig": ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
}


def check_values(cls: type, values: dict[str, Any], where: str) -> None:
    """Refuse, in one line with the new spelling, a `training:` value TRL 1.16 renamed, deprecated away or
    does not know (see the module's table). `values` is the section as the recipe wrote it."""
    name = cls.__name__
    for key, value in values.items():
        hint = RENAMED_VALUES.get((name, key, value)) if isinstance(value, (str, int, float, bool)) else None
        if hint:
            raise TunelabError(f"'{where}.{key}' is {value!r}: {hint}")
        for (names, field), (fine, fix) in RENAMED_FIELDS.items():
            if key == field and name in names and value != fine:
                raise TunelabError(f"'{where}.{key}' is {value!r}: {fix}")
    known = LOSS_TYPES.get(name)
    if known and "loss_type" in values:
        given = values["loss_type"]
        for loss in given if isinstance(given, list) else [given]:
            if loss not in known:
                raise TunelabError(
                    f"'{where}.loss_type' is {loss!r}, which TRL {_trl_version()} does not know: use one of "
                    f"{', '.join(known)}"
                )


def check_model_fit(args: Any, config: Any, lora: Any, where: str) -> None:
    """What TRL 1.16's fused-LM-head trainers refuse once the model is loaded, from its config alone:
    `router_aux_loss_coef` on a model without router logits, and a LoRA adapter on the LM head (the head's
    weight is read directly, so the adapter would never train). `config` is None while an earlier stage
    has yet to make the model; the LoRA check then goes by the module name `lm_head`."""
    if type(args).__name__ not in FUSED_HEAD_CONFIGS:
        return
    coef = getattr(args, "router_aux_loss_coef", None)
    if coef and config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if not hasattr(text, "output_router_logits"):
            arch = next(iter(getattr(config, "architectures", None) or []), None) or config.model_type
            raise TunelabError(
                f"'{where}.training.router_aux_loss_coef' is {coef}, but {arch} is not a mixture-of-experts model "
                "(it has no router logits), and TRL 1.16 refuses the coefficient there: remove it"
            )
    if lora is not None and targets_lm_head(lora, config):
        raise TunelabError(
            f"'{where}.lora' puts an adapter on the LM head, which TRL 1.16's fused LM head bypasses (it reads "
            "`lm_head.weight` directly), so it would never train: leave lm_head out of target_modules "
            "(all-linear does), or train the head with modules_to_save: [lm_head]"
        )


def targets_lm_head(lora: Any, config: Any) -> bool:
    """Whether peft would put a LoRA layer on the output embeddings: applied to the model's skeleton on the
    meta device when `config` is a text model's, else by the name `lm_head` in `target_modules`."""
    if config is not None and getattr(config, "vision_config", None) is None:
        import copy

        from peft import get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        from tunelab.models.preflight import skeleton

        try:
            model = get_peft_model(skeleton(config, "CAUSAL_LM", "model"), copy.deepcopy(lora))
        except (ValueError, TypeError, KeyError):
            return False  # check_lora has said what peft refuses
        return isinstance(model.get_output_embeddings(), BaseTunerLayer)
    targets = lora.target_modules
    if isinstance(targets, str):
        return targets != "all-linear" and "lm_head" in targets
    return any(str(t).split(".")[-1] == "lm_head" for t in targets or ())


def _trl_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("trl")
