"""`tunelab export`: any model tunelab can name, written as one GGUF file and read back.

The steps, in order:

1. `check` (no weights load): what MODEL names (a model, adapter, stage or run folder, hub id or
   GGUF file), its architecture, its tokenizer, the chat template when `--ollama` is asked for, the
   output path, and the disk space the file needs (estimated from the parameter count). Every problem
   is one line (`TunelabError`) before anything heavy happens;
2. load the model in float32 (an adapter merged into its base, as `tunelab merge` does; a GGUF source
   dequantized through its plain copy) and compute its logits on the round trip's prompts;
3. write the file to a temporary name beside OUT (`tunelab.exporting.writer`);
4. read it back through transformers' GGUF loader and compare (`tunelab.exporting.roundtrip`);
5. rename it to OUT: OUT never holds a partial or unchecked file, and the old OUT (with --overwrite)
   stays until the new one is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.core import runs
from tunelab.core.errors import TunelabError, check_path
from tunelab.core.hub import MODEL_FILES, local_path
from tunelab.core.paths import refuse_special
from tunelab.exporting import ollama
from tunelab.exporting.architectures import Architecture, architecture
from tunelab.exporting.roundtrip import WRITTEN_TOLERANCE
from tunelab.exporting.types import GGUFType, estimate_bytes, gguf_type
from tunelab.exporting.vocab import Vocab, read_vocab
from tunelab.models.gguf_files import MAGIC
from tunelab.models.spec import is_adapter, model_config, model_spec, resolve_spec
from tunelab.models.tokenizers import load_tokenizer

Say = Callable[[str], None]
log = logging.getLogger(__name__)  # under `tunelab`: the CLI prints its INFO lines


@dataclass
class Plan:
    """Everything `check` learnt, so the export itself re-derives nothing."""

    spec: dict[str, Any]  # from_pretrained arguments of the source (a GGUF source not yet converted)
    label: str  # how the source is named in messages and in the file's general.name
    config: Any
    arch: Architecture
    kind: GGUFType
    vocab: Vocab
    out: Path
    estimate: int
    overwrite: bool
    modelfile: tuple[Path, str] | None = None  # (path, text) with --ollama
    notes: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    """What `export` wrote and what the round trip measured."""

    path: Path
    type: str
    params: int
    bytes: int
    seconds: float
    figures: dict[str, Any]
    tensor_types: dict[str, int]
    notes: list[str]
    modelfile: Path | None = None
    scores: dict[str, dict[str, Any]] | None = None
    """With `eval_data`: the eval's metrics of the source and of the file, by label (`source`, the type)."""

    def metrics(self) -> dict[str, Any]:
        """The numbers for metrics.json (the export stage) and the benchmark."""
        return {
            **self.figures,
            "type": self.type,
            "file_mb": self.bytes / 1e6,
            "params": self.params,
            "bits_per_param": 8 * self.bytes / max(self.params, 1),
            "export_seconds": self.seconds,
        }


def check(
    model: str | dict[str, Any],
    out: str | os.PathLike,
    type: str = "f16",
    overwrite: bool = False,
    ollama_file: bool = False,
    system: str | None = None,
    in_stage: bool = False,
) -> Plan:
    """Check an export without loading weights; one line (TunelabError) for the first problem.

    `in_stage`: OUT lies in the export stage's own folder, which its run replaces as a whole.
    """
    kind = gguf_type(type)
    out = _check_out(Path(out), overwrite, in_stage)
    spec, label, notes = _source(model)
    where = label
    config = model_config(spec if "gguf_file" not in spec else {**spec}, _CONTEXT, where)
    arch = architecture(config, where)
    if "gguf_file" in spec and Path(spec["gguf_file"]).resolve() == out.resolve():
        raise TunelabError(f"'{out}' is the GGUF file being exported: write the new file under another name")
    tokenizer = load_tokenizer(spec.get("gguf_file") or spec["path"])
    vocab = read_vocab(tokenizer, int(config.vocab_size), where)
    params, output_params = _param_count(config)
    plan = Plan(
        spec,
        label,
        config,
        arch,
        kind,
        vocab,
        out,
        estimate_bytes(params, output_params, kind, len(vocab.tokens)),
        overwrite,
        notes=notes,
    )
    if ollama_file:
        fam = ollama.family(vocab.chat_template, where)
        target = out.parent / "Modelfile"
        ollama.check_target(target, overwrite or in_stage)
        shown = system if system is not None else ollama.default_system(tokenizer, fam)
        plan.modelfile = (target, ollama.modelfile(out.name, fam, shown))
    _check_disk(plan)
    return plan


class _NoStages:
    """model_config's view of the run around MODEL: there is none (a stage resolves `${name}` before calling)."""

    configs: dict[str, Any] = {}

    def is_pending(self, value: Any) -> bool:
        return False

    def resolve_ref(self, value: Any) -> Any:
        return value


_CONTEXT = _NoStages()


def _check_out(out: Path, overwrite: bool, in_stage: bool) -> Path:
    check_path(out, "OUT")
    refuse_special(out, "OUT")
    if out.is_dir():
        raise TunelabError(f"OUT '{out}' is a folder: name the file to write, e.g. '{out / 'model.gguf'}'")
    if out.suffix.lower() != ".gguf":
        raise TunelabError(
            f"OUT '{out}' does not end in .gguf: name the file to write, e.g. '{out.with_suffix('.gguf')}'"
        )
    base = runs.existing_ancestor(out.parent)
    if not base.is_dir():
        raise TunelabError(f"OUT '{out}': '{base}' is a file, not a folder; choose another path")
    if not in_stage:
        stage = runs.stage_folder_of(out.parent)
        if stage is not None:
            raise TunelabError(
                f"OUT '{out}' is inside stage folder '{stage}' of a tunelab run, which replaces it when the stage runs "
                "again: write the file outside run folders (or add a `stage: export` to the recipe)"
            )
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise TunelabError(f"OUT '{out}' exists: pass --overwrite to replace it, or choose another name")
        if not _is_gguf(out):
            raise TunelabError(
                f"OUT '{out}' exists and is not a GGUF file: --overwrite replaces only a GGUF file; choose another name"
            )
    return out


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return path.is_file() and fh.read(4) == MAGIC
    except OSError:
        return False


def _source(model: str | dict[str, Any]) -> tuple[dict[str, Any], str, list[str]]:
    """(from_pretrained arguments, label, notes) for what MODEL names; a run folder means its last model."""
    spec = model_spec(model, "MODEL")
    label = str(model if isinstance(model, str) else spec["path"])
    notes = []
    folder = local_path(spec["path"]) if "gguf_file" not in spec else None
    if folder is not None and folder.is_dir() and runs.is_tunelab_run(runs.read_json(folder / "run.json")):
        stage = _last_model_stage(folder)
        notes.append(f"'{label}' is a run folder: exporting its last model, stage '{stage.name}'")
        spec["path"], folder = str(stage), stage
    if folder is not None and folder.is_dir() and (folder / runs.STAGE_FILE).is_file():
        record = runs.read_json(folder / runs.STAGE_FILE)
        if runs.is_stage_record(record) and record["status"] != "completed":
            raise TunelabError(
                f"'{label}' is a stage that has not finished (status: {record['status']}): finish it with "
                "`tunelab run RECIPE --resume`, then export"
            )
        if not any((folder / name).exists() for name in MODEL_FILES):
            raise TunelabError(
                f"'{label}' is a stage folder without a model (an eval or export stage?): name the folder of a stage "
                "that trains one (sft, dpo, grpo, pretrain, ...)"
            )
    resolved = resolve_spec(spec, "MODEL", materialize=False)
    if "gguf_file" in resolved or Path(resolved["path"]).joinpath("tunelab_gguf.json").is_file():
        notes.append(
            f"'{label}' is a GGUF file: its tensors are dequantized to float32 first, then written again "
            "(a quantized source keeps its rounding, and a new quantized type adds its own)"
        )
    if is_adapter(resolved["path"]):
        notes.append(f"'{label}' is a LoRA adapter: merged into its base first (as `tunelab merge` does)")
    return resolved, label, notes


def _last_model_stage(run_dir: Path) -> Path:
    manifest = runs.read_json(run_dir / "run.json") or {}
    found = None
    for name in manifest.get("stages") or {}:
        record = runs.read_json(run_dir / name / runs.STAGE_FILE)
        if runs.is_stage_record(record) and record.get("status") == "completed" and record.get("model"):
            found = run_dir / name
    if found is None:
        raise TunelabError(
            f"run folder '{run_dir}' has no finished stage that made a model: name a stage folder, "
            f"e.g. '{run_dir / 'sft'}'"
        )
    return found


def _param_count(config: Any) -> tuple[int, int]:
    """(all parameters, those of the output matrix) from the config, on the meta device: no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in meta.parameters())  # a tied matrix counts once
    head = meta.get_output_embeddings()
    return params, int(head.weight.numel()) if head is not None else 0


def _check_disk(plan: Plan) -> None:
    base = runs.existing_ancestor(plan.out.parent)
    free = shutil.disk_usage(base).free
    if plan.estimate * 1.05 > free:
        raise TunelabError(
            f"OUT '{plan.out}': the {plan.kind.name} file needs about {runs.fmt_size(plan.estimate)}, but "
            f"'{base}' has {runs.fmt_size(free)} free: free space there, choose another disk, or a smaller --type"
        )


def export(plan: Plan, say: Say | None = None) -> ExportResult:
    """Load, write, read back, rename into place: the export `plan` describes (see `check`)."""
    from tunelab.exporting.roundtrip import compare, logits, prompts, read_back
    from tunelab.exporting.writer import write_gguf
    from tunelab.models.loading import load_causal_lm

    say = say or _print
    for note in plan.notes:
        say(note)
    started = time.perf_counter()
    spec = resolve_spec(plan.spec, "MODEL") if "gguf_file" in plan.spec else plan.spec
    tokenizer = load_tokenizer(spec["path"])
    model = load_causal_lm({**spec, "dtype": "float32"}, merge_adapter=True)
    model = model.to("cpu").eval()
    fixed = prompts(tokenizer)
    source = logits(model, fixed.ids)
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{plan.out.name}.", suffix=".tmp.gguf", dir=plan.out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        written = write_gguf(model, plan.vocab, plan.arch, plan.kind, tmp, _name(plan.label))
        seconds = time.perf_counter() - started
        rounded = logits(model, fixed.ids)
        del model
        back, back_tokenizer = read_back(tmp)
        figures = compare(source, rounded, logits(back, fixed.ids), fixed, back_tokenizer)
        del back
        size = tmp.stat().st_size
        tmp.replace(plan.out)
    finally:
        tmp.unlink(missing_ok=True)
    result = ExportResult(
        plan.out,
        plan.kind.name,
        written.params,
        size,
        seconds,
        figures,
        dict(written.types),
        plan.notes + written.notes,
    )
    for note in written.notes:
        say(note)
    if figures["written_max_abs_diff"] > WRITTEN_TOLERANCE * max(1.0, figures["logit_scale"]):
        say(
            f"warning: the file read back differs from the model as written by {figures['written_max_abs_diff']:.3g} "
            "(more than rounding): transformers' GGUF reader may not read every setting this model uses"
        )
    if plan.modelfile is not None:
        path, text = plan.modelfile
        runs.write_atomic(path, text)
        result.modelfile = path
    return result


def _name(label: str) -> str:
    """general.name: the model's folder or hub id, without the path around it.

    Not exactly "mistral": transformers' reader (5.25) then takes a `llama` file for a `mistral` one, an
    architecture name gguf does not have, and fails to load it."""
    text = label.rstrip("/")
    name = Path(text).name if local_path(text) is not None else text
    return f"{name}-model" if name == "mistral" else name


def _print(line: str) -> None:
    log.info(f"   {line}")


def summary(result: ExportResult) -> list[str]:
    """The lines the CLI prints after an export."""
    f = result.figures
    types = ", ".join(f"{n} {k}" for k, n in sorted(result.tensor_types.items(), key=lambda kv: -kv[1]))
    lines = [
        f"wrote {result.path} ({result.type}: {runs.fmt_size(result.bytes)}, {result.params / 1e6:.1f}M parameters, "
        f"{8 * result.bytes / max(result.params, 1):.2f} bits each; tensors: {types}) in {result.seconds:.1f} s",
        f"round trip through transformers' GGUF reader ({f['prompts']} prompts, {f['positions']} positions): "
        f"max |logit difference| {f['max_abs_diff']:.4g} (logits up to {f['logit_scale']:.3g}), top-1 agreement "
        f"{100 * f['top1_agreement']:.1f}%",
        f"  the file reads back as written to {f['written_max_abs_diff']:.2g} (rounding aside); its tokenizer gives "
        f"the same ids on {100 * f['tokens_agree']:.0f}% of the prompts",
    ]
    if result.modelfile is not None:
        lines.append(f"Modelfile: {result.modelfile} (ollama create NAME -f {result.modelfile})")
    if result.scores:
        names = [k for k in next(iter(result.scores.values())) if k != "examples"]
        lines.append("what the export cost on the held-out rows (" + ", ".join(names) + "):")
        for label, values in result.scores.items():
            size = f", {runs.fmt_size(result.bytes)}" if label == result.type else ""
            shown = ", ".join(f"{k} {values[k]:.4g}" for k in names if isinstance(values.get(k), (int, float)))
            lines.append(f"  {label}: {shown} ({int(values.get('examples', 0))} rows{size})")
    return lines


def to_json(result: ExportResult) -> str:
    return json.dumps({"path": str(result.path), **result.metrics()}, indent=2)
