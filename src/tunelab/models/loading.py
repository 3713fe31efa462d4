"""Models and tokenizers: load (hub id, folder, or adapter folder), build from a config, merge.

Loading goes through the `Auto*` classes and `from_pretrained`, so the same
recipe that loads a tiny local model in tests loads `Qwen/...` on a GPU.
"""

from __future__ import annotations

import contextvars
import json
import re
import shutil
from pathlib import Path
from typing import Any

from tunelab.core import runs
from tunelab.core.config import check_keys
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
SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>"}


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")


def check_tokenizer(path: str, where: str) -> None:
    """A local model (or adapter and its base) must carry a tokenizer; hub ids are checked on load."""

    if str(path).lower().endswith(".gguf"):
        return
    folders = [path] + ([adapter_base(path)] if is_adapter(path) else [])
    local = [local_path(f) for f in folders]
    if any(p is None for p in local):
        return
    if not any((p / name).exists() for p in local for name in TOKENIZER_FILES):
        raise TunelabError(
            f"'{where}' is '{path}', which has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}): "
            "save the tokenizer beside the model (tokenizer.save_pretrained(folder))"
        )


def load_tokenizer(path: str, **kwargs: Any):
    """The tokenizer of a model or adapter folder (adapter folders may hold their own)."""
    from transformers import AutoTokenizer

    source = path
    if str(path).lower().endswith(".gguf"):  # a GGUF file carries its tokenizer (see tokenizer_origin)
        source, kwargs = str(Path(path).parent), {**kwargs, "gguf_file": Path(path).name}
    elif is_adapter(path) and not Path(path, "tokenizer_config.json").exists():
        source = adapter_base(path)
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"cannot load a tokenizer from '{source}': {' '.join(str(exc).split())[:200]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(spec: dict[str, Any], quantization: Any = None, merge_adapter: bool = True):
    """A causal LM from a folder or hub id; an adapter folder is loaded on its base.

    With `merge_adapter`, an adapter is merged into its base, so a new LoRA can be
    trained on top of the result (SFT after SFT).
    """
    from transformers import AutoModelForCausalLM

    path, kwargs = spec["path"], load_kwargs(spec)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if is_adapter(path):
        from peft import PeftModel

        base_path = adapter_base(path)
        if is_adapter(base_path):  # a LoRA trained on a merged LoRA (DPO after SFT): its base, merged, first
            base = load_causal_lm({**spec, "path": base_path}, quantization, merge_adapter=True)
        else:
            base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        model = PeftModel.from_pretrained(base, path)
        if not merge_adapter:
            return model
        # PeftModel froze the base for inference; the merged model is trained on by later stages.
        merged = model.merge_and_unload().requires_grad_(True)
        # An adapter trained on this model must name this adapter folder as its base, not the model under it.
        merged.name_or_path = str(path)
        return merged
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def prepare_kbit(model: Any, quantization: Any, gradient_checkpointing: bool):
    """For QLoRA: norms and embeddings to fp32, input gradients on (a no-op without quantization)."""
    if quantization is None:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def train_tokenizer(texts, options: dict[str, Any], where: str):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers.

    `options` are the keyword arguments of `tokenizers.trainers.BpeTrainer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    options = dict(options)
    options.setdefault("vocab_size", 1024)
    options.setdefault("min_frequency", 2)
    special = list(dict.fromkeys([*SPECIAL_TOKENS.values(), *options.pop("special_tokens", [])]))
    check_keys(options, _BpeTrainerArgs, where)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, **options
    )
    tokenizer.train_from_iterator(texts, trainer)
    # No chat template: a model pre-trained here is a base model, prompted with plain text (an SFT stage
    # can give it one with `chat_template:`).
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


class _BpeTrainerArgs:
    """The keyword arguments of `tokenizers.trainers.BpeTrainer` (a Rust class with no signature)."""

    def __init__(
        self,
        vocab_size: int = 30000,
        min_frequency: int = 0,
        limit_alphabet: int | None = None,
        continuing_subword_prefix: str | None = None,
        end_of_word_suffix: str | None = None,
        max_token_length: int | None = None,
    ) -> None: ...


MERGE_MARK = "tunelab_merge.json"  # written by `merge` into its output, listing what it wrote


def merge(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None, overwrite: bool = False) -> Path:
    """Merge a LoRA adapter into its base model and save a full model with its tokenizer.

    The base is loaded in full precision (never quantized), so the merged weights
    are exact and the result loads with `AutoModelForCausalLM.from_pretrained`.

    The model is saved into a temporary sibling and renamed into place, with `tunelab_merge.json`
    listing its files: `--overwrite` replaces only such a folder, as the merge wrote it (see
    `_check_merge_target`), never a folder that merely holds a model.
    """
    import tempfile

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not is_adapter(adapter_dir):
        raise TunelabError(f"'{adapter_dir}' is not a LoRA adapter folder (no adapter_config.json)")
    if out_dir.exists() and not out_dir.is_dir():
        raise TunelabError(f"'{out_dir}' is a file: name a folder to write the merged model to")
    _check_merge_target(adapter_dir, out_dir, base)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise TunelabError(f"'{out_dir}' exists and is not empty: choose another folder or pass --overwrite")
    if out_dir.exists() and overwrite:
        _check_replaceable(out_dir)
    try:
        base_spec = resolve_spec(model_spec(base or adapter_base(adapter_dir), "--base"), "base model of the adapter")
    except TunelabError as exc:
        raise TunelabError(f"{exc}; name the base with --base PATH_OR_HUB_ID") from None

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if base is None and is_adapter(base_spec["path"]):  # trained on a merged adapter: merge the chain
        merged = load_causal_lm({"path": str(adapter_dir), "dtype": "float32"}, merge_adapter=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_spec["path"], dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tokenizer = load_tokenizer(str(adapter_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))  # ours alone: removed on failure
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        written = sorted(p.name for p in tmp.iterdir())
        mark = {"tool": "tunelab", "adapter": str(adapter_dir.absolute()), "files": written}
        (tmp / MERGE_MARK).write_text(json.dumps(mark, indent=2) + "\n")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            out_dir.rename(old / "model")
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (both made absolute, links resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_merge_target(adapter_dir: Path, out_dir: Path, base: str | None) -> None:
    """The merged model must not land on what it is made from, nor in a run's stage folders: replacing the
    adapter or its base would leave the adapter on a base that already contains it (or on none), and a
    stage folder is its run's, which replaces it when the stage runs again."""
    record = runs.read_json(adapter_dir / runs.STAGE_FILE)
    if runs.is_stage_record(record) and record["status"] != "completed":
        raise TunelabError(
            f"'{adapter_dir}' is a stage that has not finished (status: {record['status']}): its files may be half "
            "saved; finish it with `tunelab run RECIPE --resume`, then merge"
        )
    if _inside(out_dir, adapter_dir) or _inside(adapter_dir, out_dir):
        raise TunelabError(f"'{out_dir}' is the adapter's folder, or holds it: write the merged model elsewhere")
    try:
        base_path = local_path(base or adapter_base(adapter_dir))
    except (TunelabError, OSError, ValueError):
        base_path = None
    if base_path is not None and (_inside(out_dir, base_path) or _inside(base_path, out_dir)):
        raise TunelabError(
            f"'{out_dir}' is the adapter's base model '{base_path}', or holds it: the adapter would then sit on a "
            "base that already contains it; write the merged model elsewhere"
        )
    stage = runs.stage_folder_of(out_dir)
    if stage is not None or runs.holds_stage_folder(out_dir):
        where = f"inside stage folder '{stage}'" if stage is not None else "a run folder, or holds a stage folder"
        raise TunelabError(
            f"'{out_dir}' is {where} of a tunelab run, which replaces it when the stage runs again: "
            "write the merged model outside run folders"
        )


def _check_replaceable(out_dir: Path) -> None:
    """`--overwrite` replaces an empty folder, or one a merge wrote and nobody added to; nothing else."""
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    try:
        mark = json.loads((out_dir / MERGE_MARK).read_text())
    except (OSError, ValueError):
        mark = None
    if not isinstance(mark, dict) or not isinstance(mark.get("files"), list):
        raise TunelabError(
            f"'{out_dir}' is not a model folder that `tunelab merge` wrote (no {MERGE_MARK}): it is left alone; "
            "choose another folder"
        )
    extra = [name for name in entries if name not in set(mark["files"]) | {MERGE_MARK}]
    if extra:
        raise TunelabError(
            f"'{out_dir}' holds '{extra[0]}', which `tunelab merge` did not write there: move it out, or choose "
            "another folder"
        )


def load_sequence_classifier(spec: dict[str, Any], num_labels: int = 1, quantization: Any = None):
    """A sequence classifier (a reward model when `num_labels=1`) from a model, adapter or classifier folder.

    A causal LM (or an SFT adapter on one) gets a new, seeded score head on its
    backbone: the usual start of a reward model. A classifier adapter (task type
    SEQ_CLS, saved with its head) is loaded on its base; merged unless quantized.
    """
    from transformers import AutoModelForSequenceClassification

    path, kwargs = spec["path"], load_kwargs(spec)
    if is_adapter(path) and _adapter_task(path) == "SEQ_CLS":
        from peft import PeftModel

        base = load_sequence_classifier({**spec, "path": adapter_base(path)}, num_labels, quantization)
        model = PeftModel.from_pretrained(base, path)
        return model if quantization is not None else model.merge_and_unload()
    if is_adapter(path):
        return _classifier_on_adapter(spec, num_labels, quantization)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    return _with_pad(model, path)


def _adapter_task(path: str | Path) -> str | None:
    return json.loads(Path(path, "adapter_config.json").read_text()).get("task_type")


def _classifier_on_adapter(spec: dict[str, Any], num_labels: int, quantization: Any):
    """A classifier whose backbone is a causal LM adapter merged into its base."""
    import tempfile

    from transformers import AutoModelForSequenceClassification

    causal = load_causal_lm({**spec, "path": spec["path"]})
    if quantization is not None:
        # Quantization happens at load time: materialise the merged model, then load it quantized.
        with tempfile.TemporaryDirectory(prefix="tunelab-merged-") as tmp:
            causal.save_pretrained(tmp)
            del causal
            kwargs = {**load_kwargs(spec), "quantization_config": quantization}
            model = AutoModelForSequenceClassification.from_pretrained(tmp, num_labels=num_labels, **kwargs)
    else:
        config = causal.config
        config.num_labels = num_labels
        model = AutoModelForSequenceClassification.from_config(config, dtype=causal.dtype)
        prefix = causal.base_model_prefix
        getattr(model, prefix).load_state_dict(getattr(causal, prefix).state_dict())
    model.config.name_or_path = str(spec["path"])
    return _with_pad(model, spec["path"])


def _with_pad(model: Any, path: str):
    """Classifiers find each sequence's last token through pad_token_id; take the tokenizer's."""
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    return model


def reward_scores(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 32) -> list[float]:
    """A reward model's score of each full text (prompt + answer).

    Texts end with the EOS token, as `trl.RewardTrainer` trains on them and as
    PPO scores a response that stopped at EOS.
    """
    import torch

    tokenizer.padding_side = "right"
    eos = tokenizer.eos_token or ""
    out: list[float] = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        batch = [t if t.endswith(eos) else t + eos for t in texts[start : start + batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out += model(**enc).logits[:, 0].float().tolist()
    return out


def tokenizer_origin(value: Any, ctx: Any, where: str) -> str:
    """Where the tokenizer of the model `value` names comes from: a folder or hub id, or the stage that makes it.

    Lets a pipeline compare two models' tokenizers before the stages that make them have run.
    """

    spec = model_spec(value, where)
    match = REF.match(spec["path"].strip())
    if match and ctx.is_pending(spec["path"]):
        return ctx.tokenizers.get(match.group(1), f"stage '{match.group(1)}'")
    spec = resolve_spec({**spec, "path": ctx.resolve_ref(spec["path"])}, where, materialize=False)
    if "gguf_file" in spec:
        return spec["gguf_file"]  # the file path; load_tokenizer reads the tokenizer inside it
    path = spec["path"]
    if is_adapter(path) and not Path(path, "tokenizer_config.json").exists():
        path = adapter_base(path)
    return path


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two tokenizer origins (see `tokenizer_origin`) give the same token ids."""
    if a == b:
        return True
    if a.startswith("stage '") or b.startswith("stage '"):
        return False
    first, second = load_tokenizer(a), load_tokenizer(b)
    return first.get_vocab() == second.get_vocab() and first.pad_token_id == second.pad_token_id


DTYPES = ("float32", "float16", "bfloat16")


def parse_dtype(value: Any, where: str):
    """`float16` -> torch.float16, for the few dtypes weights are loaded in."""
    import torch

    if value not in DTYPES:
        raise TunelabError(f"'{where}' is {value!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, value)
