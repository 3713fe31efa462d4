"""What a recipe's `model:` names, made loadable: the from_pretrained arguments checked, the source
resolved (hub id, folder, ${stage}, GGUF file), an adapter's base found, the config read without weights.

Every loader (`loading`, `tokenizers`, `vision.models`, ...) starts from the mapping `model_spec` and
`resolve_spec` return, so validate checks exactly what a run will load.
"""

from __future__ import annotations

import contextvars
import json
import re
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError, unknown_key
from tunelab.core.hub import local_path, looks_like_path, resolve_model
from tunelab.core.refs import REF
from tunelab.models.gguf_files import cached, gguf_config, gguf_file, origin, plain_copy, split_file

# Keyword arguments of `from_pretrained` a recipe's `model:` mapping may carry (checked against
# transformers' signature in tests). `quantization_config` has its own section, `quantization:`.
LOAD_KEYS = (
    "path",
    "revision",
    "dtype",
    "attn_implementation",
    "trust_remote_code",
    "subfolder",
    "device_map",
    "gguf_file",
    "variant",
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "use_safetensors",
    "weights_only",
    "max_memory",
    "offload_folder",
    "offload_buffers",
    "key_mapping",
    "ignore_mismatched_sizes",
    "experts_implementation",
    "use_kernels",
    "tp_plan",
    "tp_size",
    "disable_mmap",
)


REDIRECTED_KEYS = {
    "quantization_config": "use the stage's `quantization:` section (BitsAndBytesConfig fields)",
    "torch_dtype": "it is called `dtype` in transformers 5",
    "pretrained_model_name_or_path": "it is called `path` here",
}


ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "paged|sdpa", "paged|eager")


def model_spec(value: Any, where: str) -> dict[str, Any]:
    """Normalise a `model:` value (string or mapping) and check its keys."""

    spec = {"path": value} if isinstance(value, str) else value
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        raise TunelabError(f"'{where}' must be a model folder, a hub id, ${{stage}}, or a mapping with `path:`")
    for key in spec:
        if key in REDIRECTED_KEYS:
            raise TunelabError(f"'{where}.{key}' is not taken here: {REDIRECTED_KEYS[key]}")
        if key not in LOAD_KEYS:
            raise unknown_key(where, str(key), LOAD_KEYS, "keyword arguments of from_pretrained")
    _check_values(spec, where)
    return split_file(dict(spec))


def _check_values(spec: dict[str, Any], where: str) -> None:
    """Values from_pretrained would only reject after reading the weights."""
    dtype = spec.get("dtype")
    if dtype is not None and dtype != "auto":
        import torch

        if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise TunelabError(
                f"'{where}.dtype' is {dtype!r}: use auto or a torch dtype name (float32, bfloat16, float16)"
            )
    attn = spec.get("attn_implementation")
    if attn is not None and attn not in ATTENTION and not (isinstance(attn, str) and "/" in attn):
        raise TunelabError(
            f"'{where}.attn_implementation' is {attn!r}: use one of {', '.join(ATTENTION)} (or a hub kernel repo id)"
        )


def resolve_spec(mspec: dict[str, Any], where: str, materialize: bool = True) -> dict[str, Any]:
    """`mspec` with a loadable `path`: local folders resolved, hub ids checked, GGUF files checked.

    A GGUF source becomes its plain copy (converted now when `materialize`, else only if already
    cached); while checking it stays {path: folder, gguf_file} so no weights are read.
    """

    mspec = dict(mspec)
    if "gguf_file" not in mspec:
        mspec["path"] = resolve_model(mspec["path"], where)
        check_weights(mspec["path"], where)
        return mspec
    folder = local_path(mspec["path"])
    if folder is None or not folder.is_dir():
        raise TunelabError(f"'{where}.path' is '{mspec['path']}': no such folder holding the GGUF file")
    path = gguf_file(folder, mspec["gguf_file"], where)
    plain = plain_copy(path, mspec["path"]) if materialize else cached(path)
    if plain is None:
        return {**mspec, "path": str(folder), "gguf_file": str(path)}
    mspec.pop("gguf_file")
    return {**mspec, "path": str(plain)}


def labelled_models(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """An evaluating stage's models as {label: model}: `model:` (labelled `model`) or `models:`."""
    if ("model" in cfg) == ("models" in cfg):
        raise TunelabError(f"'{where}' needs exactly one of `model:` or `models: {{label: model}}`")
    if "model" in cfg:
        return {"model": cfg["model"]}
    if not isinstance(cfg["models"], dict) or not cfg["models"]:
        raise TunelabError(f"'{where}.models' must map labels to models, e.g. {{before: ${{pretrain}}}}")
    for label in cfg["models"]:
        check_label(label, f"{where}.models")
    return dict(cfg["models"])


LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_label(label: Any, where: str) -> None:
    """A model's label names its files (`predictions-LABEL.jsonl` in the stage folder): it must be a plain
    file-name part, or `../x` would write outside the run folder."""
    text = str(label) if isinstance(label, int) and not isinstance(label, bool) else label
    if not (isinstance(text, str) and LABEL.fullmatch(text)):
        raise TunelabError(
            f"'{where}' has the label {label!r}, which names its predictions file: use letters, digits, '_', "
            "'-' or '.' (starting with a letter or digit, at most 100 characters), e.g. after_sft"
        )


def stage_model(spec: Any, ctx: Any, hint: str = "a hub id, a folder, or an earlier stage (${name})", key="model"):
    """A stage's `model:` (or another `key`) as from_pretrained arguments with a loadable path.

    None while checking a pipeline whose earlier stage, named by `${stage}`, has not run yet.
    """
    if key not in spec.cfg:
        raise TunelabError(f"'{spec.where}' has no `{key}:`: name {hint}")
    mspec = model_spec(spec.cfg[key], f"{spec.where}.{key}")
    if ctx.checking and ctx.is_pending(mspec["path"]):
        return None
    mspec["path"] = ctx.resolve_ref(mspec["path"])
    return resolve_spec(mspec, f"{spec.where}.{key}", materialize=not ctx.checking)


def is_adapter(path: str | Path) -> bool:
    return Path(path, "adapter_config.json").is_file()


# `tunelab plan` reads configs only (a 70B plan from a folder holding just config.json is fine);
# validate and run need the weights to be there.
WEIGHTS_NEEDED: contextvars.ContextVar[bool] = contextvars.ContextVar("weights_needed", default=True)


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def check_weights(path: str, where: str) -> None:
    """A local model folder holds weight files (an adapter, a pipeline or a hub id is checked on load)."""
    folder = Path(path)
    if not WEIGHTS_NEEDED.get() or not folder.is_dir() or not (folder / "config.json").is_file() or is_adapter(folder):
        return
    if (folder / "model_index.json").is_file():
        return
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise TunelabError(
            f"'{where}' is '{path}', which has a config.json but no weight files (*.safetensors, *.bin): "
            "the model was not saved there (save_pretrained writes both)"
        )


BASE_FILE = "tunelab_base.json"


def adapter_base(path: str | Path) -> str:
    """The base model an adapter folder was trained on.

    When the base was a GGUF file's plain copy and the copy is gone (a cleared cache, another
    machine), it is made again from the GGUF file recorded in `tunelab_base.json`.
    """
    config = json.loads(Path(path, "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise TunelabError(f"adapter '{path}' does not record its base model (base_model_name_or_path)")
    recorded = Path(path, BASE_FILE)
    if not Path(base).exists() and recorded.is_file():
        source = json.loads(recorded.read_text())
        spec = {"path": str(Path(source["gguf_file"]).parent), "gguf_file": Path(source["gguf_file"]).name}
        return resolve_spec(spec, f"base model of '{path}'")["path"]
    if looks_like_path(base) and local_path(base) is None:
        # A folder that is gone: said as such, not as the Hub's "Repo id must be in the form ..." later.
        raise TunelabError(
            f"adapter '{path}' was trained on the base model in '{base}', a folder that no longer exists: put the "
            f"base back there, or set base_model_name_or_path in {Path(path, 'adapter_config.json')} to where it is"
        )
    return base


def record_base(folder: str | Path) -> None:
    """Beside an adapter trained on a GGUF plain copy, write where that GGUF file is (see `adapter_base`)."""

    if not is_adapter(folder):
        return
    base = json.loads(Path(folder, "adapter_config.json").read_text()).get("base_model_name_or_path")
    found = origin(base) if base else None
    if found is not None:
        text = json.dumps({**found, "plain_copy": base}, indent=2) + "\n"
        Path(folder, BASE_FILE).write_text(text)


def model_config(value: Any, ctx: Any, where: str):
    """The transformers config of the model `value` names, without loading weights.

    For `${stage}` references to a model not built yet, the config that stage
    plans to build (None when it cannot be known before it runs).
    """
    from transformers import AutoConfig

    spec = model_spec(value, where)
    match = REF.match(spec["path"].strip())
    if match and ctx.is_pending(spec["path"]):
        return ctx.configs.get(match.group(1))
    spec = resolve_spec({**spec, "path": ctx.resolve_ref(spec["path"])}, where, materialize=False)
    path = spec["path"]
    if "gguf_file" in spec:
        return gguf_config(Path(path, spec["gguf_file"]))
    while is_adapter(path):  # an adapter's base may be an adapter too (LoRA on a merged LoRA)
        path = resolve_model(adapter_base(path), f"{where} (base model of the adapter)")
    try:
        return AutoConfig.from_pretrained(
            path, revision=spec.get("revision"), trust_remote_code=spec.get("trust_remote_code", False)
        )
    except (OSError, ValueError) as exc:
        raise TunelabError(
            f"'{where}': cannot read the config of '{path}': {' '.join(str(exc).split())[:200]}"
        ) from None


def load_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in spec.items() if k != "path"}
    if isinstance(kwargs.get("dtype"), str) and kwargs["dtype"] != "auto":
        import torch

        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    return kwargs


DTYPES = ("float32", "float16", "bfloat16")


def parse_dtype(value: Any, where: str):
    """`float16` -> torch.float16, for the few dtypes weights are loaded in."""
    import torch

    if value not in DTYPES:
        raise TunelabError(f"'{where}' is {value!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, value)
