"""`tunelab merge`: a LoRA adapter merged into its base and saved as a full model with its tokenizer,
written so that it never replaces what it is made from, a run's stage folder, or a folder it did not write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tunelab.core import runs
from tunelab.core.errors import TunelabError
from tunelab.core.hub import local_path
from tunelab.models.loading import load_causal_lm
from tunelab.models.spec import adapter_base, is_adapter, model_spec, resolve_spec
from tunelab.models.tokenizers import load_tokenizer

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
