"""What `tunelab serve MODEL --adapter NAME=PATH` serves: one base and the adapters over it, each by name.

Everything here is decided from files (configs, `adapter_config.json`, `run.json`) before any weights load, so a
bad command line is one line and exit code 2 at once: a model that does not exist, an adapter spec that is not
NAME=PATH, an adapter trained on another base than the one served. Loading goes through the code `tunelab chat`
uses (`tunelab.models.chat.model_source`, `tunelab.models.loading.load_causal_lm`, `load_tokenizer`, `quant`), with
adapters kept apart (not merged) so that each request picks its own.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError, check_path
from tunelab.core.hub import MODEL_FILES, local_path, resolve_model
from tunelab.core.runs import is_tunelab_run, read_json, stage_folder_of
from tunelab.models.chat import model_source
from tunelab.models.spec import adapter_base, is_adapter

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,199}")


@dataclass
class Plan:
    """The served names: the base (from_pretrained arguments, name) and each adapter's folder by name."""

    base: dict[str, Any]
    base_name: str
    adapters: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a run folder holds but is not served, and why

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]


def plan(model: str, adapters: list[str] | dict[str, str] | None = None) -> Plan:
    """What `model` (hub id, folder, GGUF file, adapter, stage or run folder) and `adapters` serve."""
    check_path(model, "MODEL")
    folder = local_path(model)
    if folder is not None and folder.is_dir() and is_tunelab_run(read_json(folder / "run.json")):
        served = run_plan(folder)
    elif folder is not None and folder.is_dir() and is_adapter(folder):
        base = adapter_base(folder)
        served = Plan(source(base, "the base model of the adapter"), base_name(base, folder), {})
        served.adapters[served_name(model, folder)] = str(folder)
    else:
        served = Plan(source(model, "MODEL"), served_name(model, folder))
    for name, path in parse_adapters(adapters).items():
        add_adapter(served, name, path)
    return served


def source(ref: str, where: str) -> dict[str, Any]:
    """from_pretrained arguments for `ref`, as `tunelab chat` resolves them (a GGUF file: its plain copy)."""
    return model_source(ref, where)


def served_name(ref: str, folder: Path | None) -> str:
    """A stage folder is served by its stage's name (`sft`); anything else by what the command line said."""
    if folder is not None and folder.is_dir() and stage_folder_of(folder) == Path(os.path.abspath(folder)):
        return folder.name
    return ref


def base_name(base: str, adapter: Path) -> str:
    """An adapter stage's base is named as its stage when it is a stage folder of the same run (`pretrain`)."""
    path = local_path(base)
    if path is not None and path.resolve().parent == adapter.resolve().parent:
        return served_name(str(path), path)
    return base


def run_plan(run: Path) -> Plan:
    """A run folder: its final model, and each adapter stage trained on the same base, by stage name."""
    manifest = read_json(run / "run.json") or {}
    stages = [s for s, record in (manifest.get("stages") or {}).items() if _completed(record)]
    models = [s for s in stages if any((run / s / name).exists() for name in MODEL_FILES if name != "model_index.json")]
    if not models:
        raise TunelabError(f"run '{run}' has no completed stage that trained a model: name a model folder instead")
    final = run / models[-1]
    base = adapter_base(final) if is_adapter(final) else str(final)
    served = Plan(
        source(base, f"the base model of '{final}'"), base_name(base, final) if is_adapter(final) else final.name
    )
    for stage in models:
        folder = run / stage
        if not is_adapter(folder):
            if not same(str(folder), base):
                served.notes.append(f"{stage} (a full model; serve it with: tunelab serve {folder})")
            continue
        if same(adapter_base(folder), base):
            served.adapters[stage] = str(folder)
        else:
            served.notes.append(f"{stage} (trained on another base: serve it with: tunelab serve {folder})")
    return served


def _completed(record: Any) -> bool:
    return isinstance(record, dict) and record.get("status") == "completed"


def parse_adapters(adapters: list[str] | dict[str, str] | None) -> dict[str, str]:
    """`--adapter NAME=PATH` values (or the API's {name: path}) as {name: path}, each checked."""
    if adapters is None:
        return {}
    pairs: list[tuple[str, str]] = []
    if isinstance(adapters, dict):
        pairs = [(str(k), str(v)) for k, v in adapters.items()]
    else:
        for spec in adapters:
            name, sep, path = str(spec).partition("=")
            if not sep or not name.strip() or not path.strip():
                raise TunelabError(
                    f"--adapter '{spec}' is not NAME=PATH: give the name requests use and the adapter's folder, "
                    "e.g. --adapter math=runs/quickstart/sft"
                )
            pairs.append((name.strip(), path.strip()))
    out: dict[str, str] = {}
    for name, path in pairs:
        if not NAME.fullmatch(name):
            raise TunelabError(
                f"--adapter name '{name}' is not a model name: use letters, digits and _ . : / - (at most 200)"
            )
        if name in out:
            raise TunelabError(f"--adapter '{name}' is given twice: give each adapter its own name")
        out[name] = path
    return out


def add_adapter(served: Plan, name: str, path: str) -> None:
    check_path(path, f"--adapter {name}")
    folder = local_path(path)
    if folder is None or not folder.is_dir():
        raise TunelabError(f"--adapter {name}={path}: no such folder; name a LoRA adapter's folder")
    if not is_adapter(folder):
        raise TunelabError(
            f"--adapter {name}={path} is not a LoRA adapter (no adapter_config.json): serve a full model on its own "
            f"(tunelab serve {path})"
        )
    if name in served.names:
        raise TunelabError(f"--adapter '{name}' is already a served name ({', '.join(served.names)}): choose another")
    base = adapter_base(folder)
    if not same(base, served.base["path"]):
        raise TunelabError(
            f"--adapter {name}={path} was trained on '{base}', not on the served base '{served.base['path']}': "
            f"serve it on its own (tunelab serve {path}) or name its base as MODEL"
        )
    served.adapters[name] = str(folder)


def same(a: str, b: str) -> bool:
    """Whether two model references name the same model (folders compared as resolved paths)."""
    left, right = local_path(a), local_path(b)
    if left is not None and right is not None:
        return left.resolve() == right.resolve()
    try:
        return resolve_model(a, "model") == resolve_model(b, "model")
    except TunelabError:
        return a == b


# --- loading ---------------------------------------------------------------------------------------------


def load(served: Plan, quantization: dict[str, Any] | None = None):
    """(model, {name: tokenizer}): the base with every adapter loaded beside it (a PeftModel when any)."""
    from tunelab.models.loading import load_causal_lm
    from tunelab.models.quant import quant_config
    from tunelab.models.tokenizers import load_tokenizer

    quant = quant_config(quantization, "quantization")
    tokenizers = {served.base_name: load_tokenizer(served.base["path"])}
    try:
        model = load_causal_lm(served.base, quantization=quant, merge_adapter=True)
        if served.adapters:
            from peft import PeftModel

            names = list(served.adapters)
            model = PeftModel.from_pretrained(model, served.adapters[names[0]], adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(served.adapters[name], adapter_name=name)
    except TunelabError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise TunelabError(
            f"the model does not load: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        ) from None
    for name, path in served.adapters.items():
        tokenizers[name] = load_tokenizer(path)
    return model.eval(), tokenizers
