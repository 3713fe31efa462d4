"""Checks that make `validate` build what `run` builds, minus the weights.

The library classes check their own fields (`TrainingArguments.__post_init__`, `LoraConfig`), but
some mistakes only surface once the model is loaded or training starts: an evaluation schedule
with nothing to evaluate, a logger that is not installed, LoRA target modules that match nothing.
These functions catch them from the configs alone: the model is built on PyTorch's meta device
(no memory, no weights) and the LoRA config applied to it, exactly as peft will apply it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.models.quant import check_cpu_shapes
from tunelab.models.spec import model_config

# report_to names and the module each needs.
INTEGRATIONS = {
    "wandb": "wandb",
    "mlflow": "mlflow",
    "trackio": "trackio",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "neptune": "neptune",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "tensorboard": "tensorboard",
    "codecarbon": "codecarbon",
    "azure_ml": "azureml",
    "flyte": "flytekit",
}


# Token limits of the trainers' configs (None: no limit).
LENGTH_KEYS = ("max_length", "max_prompt_length", "max_completion_length", "max_seq_length", "max_new_tokens")


def check_training(args: Any, spec: Any) -> None:
    """What a Trainer would only refuse after loading the model."""
    where = f"{spec.where}.training"
    strategy = str(getattr(args, "eval_strategy", "no")).split(".")[-1].lower()
    if strategy != "no" and spec.cfg.get("eval_data") is None:
        raise TunelabError(
            f"'{where}.eval_strategy' is {strategy}, but '{spec.where}' has no `eval_data:`: add held-out data "
            "or set eval_strategy: no"
        )
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, key, 1)
        if isinstance(value, int) and value < 1:
            raise TunelabError(f"'{where}.{key}' is {value}: it must be at least 1")
    for key in LENGTH_KEYS:  # None means no limit; 0 truncates every example to nothing
        value = getattr(args, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise TunelabError(
                f"'{where}.{key}' is {value}: every example would be cut to nothing; set a positive number of tokens "
                "(or remove it for the default)"
            )
    beta = getattr(args, "beta", None)
    if isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta < 0:
        raise TunelabError(
            f"'{where}.beta' is {beta}: a negative beta inverts the objective (it rewards moving toward the "
            "rejected answers, or away from the reference); set it to 0 or more (0.1 is usual)"
        )
    if getattr(args, "seed", 0) < 0:
        raise TunelabError(f"'{where}.seed' is {args.seed}: seeds are non-negative integers")
    for name in getattr(args, "report_to", None) or []:
        module = INTEGRATIONS.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            raise TunelabError(
                f"'{where}.report_to' names {name}, which is not installed: pip install {module.replace('_', '-')}, "
                "or use report_to: tensorboard (works offline)"
            )
    if getattr(args, "push_to_hub", False):
        from tunelab.core.hub import hub_reachable

        if not hub_reachable():
            raise TunelabError(f"'{where}.push_to_hub' is set, but the Hub is unreachable (offline): set it to false")


def check_lora(config: Any, lora: Any, where: str, task: str = "CAUSAL_LM") -> None:
    """Apply the LoRA config to the model skeleton on the meta device: what peft would refuse, said first."""
    if lora is None or config is None:
        return
    for key in ("r", "lora_alpha"):
        value = getattr(lora, key, 1)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise TunelabError(f"'{where}.{key}' is {value!r}: it must be a positive number (r: 8 to 64 is usual)")
    model = skeleton(config, task, where)
    widths = [min(m.in_features, m.out_features) for m in model.modules() if hasattr(m, "in_features")]
    if widths and lora.r > max(widths):
        raise TunelabError(
            f"'{where}.r' is {lora.r}, more than any layer's width ({max(widths)}): the adapter would be larger "
            "than the layers it adapts; use a rank well below that (8 to 64 is usual)"
        )
    import copy

    from peft import get_peft_model

    try:
        get_peft_model(model, copy.deepcopy(lora))
    except (ValueError, TypeError, KeyError) as exc:
        names = sorted({name.split(".")[-1] for name, m in model.named_modules() if hasattr(m, "in_features")})
        message = " ".join(str(exc).split())[:200]
        raise TunelabError(
            f"'{where}': peft cannot apply it to this model ({message}); its linear layers: "
            f"{', '.join(names[:12])} (or all-linear)"
        ) from None
    missing = [
        m for m in (lora.modules_to_save or []) if not any(n.split(".")[-1] == m for n, _ in model.named_modules())
    ]
    if missing:
        raise TunelabError(f"'{where}.modules_to_save' names {', '.join(missing)}, which this model does not have")


def skeleton(config: Any, task: str, where: str):
    """The model `config` describes, on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForCausalLM
    try:
        with init_empty_weights():
            return cls.from_config(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise TunelabError(
            f"'{where}': cannot build the model from its config: {' '.join(str(exc).split())[:200]}"
        ) from None


def check_model(spec: Any, ctx: Any, lora: Any = None, task: str = "CAUSAL_LM", key: str = "model") -> Any:
    """The stage's model from its config alone: it can be built, 4-bit CPU shapes fit, the LoRA config applies.

    Returns the config (None for a model an earlier stage has yet to make and whose shape is unknown).
    """

    if key not in spec.cfg:
        return None
    config = model_config(spec.cfg[key], ctx, f"{spec.where}.{key}")
    if task == "CAUSAL_LM":
        check_language_model(spec.cfg[key], ctx, f"{spec.where}.{key}", f"the {spec.kind} stage trains", config)
    if config is None:
        return None
    if spec.cfg.get("quantization") is not None:
        check_cpu_shapes(config, spec.cfg["quantization"], f"{spec.where}.quantization")
    check_lora(config, lora, f"{spec.where}.lora", task)
    return config


# Heads that make a model a classifier: a causal-LM stage would build a new language-model head on its backbone.
CLASSIFIER_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
# Stages whose output is a classifier, and those whose output reads images as well as text.
CLASSIFIER_STAGES = {"reward", "classify"}
IMAGE_TEXT_STAGES = {"vlm_build", "vlm_sft"}


def check_language_model(value: Any, ctx: Any, where: str, role: str, config: Any = None) -> None:
    """A text-only causal LM, from its config (or the kind of the stage that makes it): no weights load.

    transformers builds a causal LM from any config: a reward model's (LlamaForSequenceClassification) loads
    its backbone under a new, untrained LM head, and an image+text model's loads its language half, so
    training either would go on without a word while throwing away what made the model what it is.
    `role` says what the model is for ("the kto stage trains", "the teacher of a distill stage is"); `config`
    is the model's config when the caller has read it already.
    """
    from tunelab.core.refs import ref_name

    path = value.get("path") if isinstance(value, dict) else value
    ref = ref_name(path)
    if ref is not None and ctx.is_pending(path):
        kind = ctx.kinds.get(ref)
        if kind in CLASSIFIER_STAGES:
            raise TunelabError(
                f"'{where}' is ${{{ref}}}, a `{kind}` stage, which makes a classifier, not a causal LM: {role} a "
                "language model; name the causal LM the classifier starts from (an sft stage or the base)"
            )
        if kind in IMAGE_TEXT_STAGES:
            raise TunelabError(
                f"'{where}' is ${{{ref}}}, a `{kind}` stage, which makes an image+text model: {role} a text-only "
                "causal LM; use its language model's source instead (or vlm_sft to train the image+text model)"
            )
        return
    config = config if config is not None else model_config(value, ctx, where)
    if config is None:
        return
    arch = next(iter(getattr(config, "architectures", None) or []), None) or config.model_type
    if getattr(config, "vision_config", None) is not None:
        raise TunelabError(
            f"'{where}' is an image+text model ({arch}): {role} a text-only causal LM; name a text model (the one "
            "its language model came from)" + (", or train this one with a vlm_sft stage" if "trains" in role else "")
        )
    if str(arch).endswith(CLASSIFIER_HEADS):
        raise TunelabError(
            f"'{where}' is a classifier ({arch}, like a reward model), not a causal LM: {role} a language model, "
            "and this one would load as its backbone under an untrained language-model head; name a causal LM "
            "(the one the classifier was trained from)"
        )


def check_vllm(args: Any, where: str) -> None:
    """`use_vllm: true` (GRPO, RLOO) needs a CUDA GPU and vLLM installed; in `server` mode, a reachable
    `trl vllm-serve`. TRL would find out after the model has loaded, or hang waiting for the server."""
    if not getattr(args, "use_vllm", False):
        return
    import torch

    if not torch.cuda.is_available():
        raise TunelabError(
            f"'{where}.use_vllm' is true, but this machine has no CUDA GPU: vLLM generates on GPUs only; "
            "set use_vllm: false (the trainer then generates with transformers)"
        )
    if importlib.util.find_spec("vllm") is None:
        raise TunelabError(
            f"'{where}.use_vllm' is true, but vLLM is not installed: pip install 'trl[vllm]' (the vLLM version "
            "TRL supports), or set use_vllm: false"
        )
    if getattr(args, "vllm_mode", "colocate") == "server":
        import socket
        from urllib.parse import urlparse

        url = getattr(args, "vllm_server_base_url", None)
        parsed = urlparse(url) if url else None
        host, port = (parsed.hostname, parsed.port) if parsed else (args.vllm_server_host, args.vllm_server_port)
        try:
            socket.create_connection((host, port or 8000), timeout=2).close()
        except OSError:
            raise TunelabError(
                f"'{where}.vllm_mode' is server, but no vLLM server answers at {host}:{port}: start one with "
                "`trl vllm-serve --model MODEL` on the GPUs left for generation, or use vllm_mode: colocate"
            ) from None
