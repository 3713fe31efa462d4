"""`stage: export`: a pipeline that ends with a GGUF file for llama.cpp and Ollama, checked by a round trip.

Keys: `model:` (an earlier stage, `${sft}`, or any model tunelab can name), `type:` (f16, bf16, q8_0,
q4_0, q4_1, q5_0, q5_1; default f16), `ollama:` (also write a Modelfile), `system:` (its SYSTEM line)
and `file:` (the file's name in the stage folder; default `model-TYPE.gguf`).

The stage is `tunelab export` (see `tunelab.exporting`) writing into its own folder: the file, the
Modelfile, and in `metrics.json` the round trip's figures (max |logit difference| and top-1 agreement
with the source, the file read back against the model as written, tokenizer agreement), the file's
size and bits per parameter. Later stages name the file by its path (an eval stage's
`models: {q8_0: runs/NAME/export/model-q8_0.gguf}`), as any GGUF source.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.exporting import check as check_export
from tunelab.exporting import export
from tunelab.exporting.architectures import architecture
from tunelab.exporting.ollama import family
from tunelab.exporting.types import gguf_type
from tunelab.exporting.vocab import read_vocab
from tunelab.models.spec import model_config, model_spec
from tunelab.models.tokenizers import load_tokenizer, tokenizer_origin
from tunelab.stages import Context, Metrics, Stage, StageResult, StageSpec

log = logging.getLogger(__name__)
SECTIONS = {
    "model": "model to export: ${stage}, a folder, adapter, hub id or GGUF file",
    "type": "GGUF type: f16 (default), bf16, q8_0, q4_0, q4_1, q5_0 or q5_1",
    "ollama": "also write an Ollama Modelfile beside the file (true/false)",
    "system": "the Modelfile's SYSTEM prompt (with ollama: true)",
    "file": "the file's name in the stage folder (default model-TYPE.gguf)",
}
FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\.gguf")


def _settings(spec: StageSpec) -> dict[str, Any]:
    cfg, where = spec.cfg, spec.where
    if "model" not in cfg:
        raise TunelabError(f"'{where}' has no `model:`: name the model to export, e.g. ${{sft}}")
    kind = gguf_type(cfg.get("type", "f16"), f"'{where}.type'")
    ollama = cfg.get("ollama", False)
    if not isinstance(ollama, bool):
        raise TunelabError(f"'{where}.ollama' is {ollama!r}: use true or false")
    system = cfg.get("system")
    if system is not None and not isinstance(system, str):
        raise TunelabError(f"'{where}.system' must be text (the Modelfile's SYSTEM prompt), not {system!r}")
    if system is not None and not ollama:
        raise TunelabError(f"'{where}.system' is the Modelfile's SYSTEM line: set ollama: true, or drop it")
    name = cfg.get("file", f"model-{kind.name}.gguf")
    if not (isinstance(name, str) and FILE.fullmatch(name)):
        raise TunelabError(
            f"'{where}.file' is {name!r}: give a plain file name ending in .gguf (letters, digits, '_', '-', '.')"
        )
    return {"type": kind.name, "ollama": ollama, "system": system, "file": name}


def _plan(spec: StageSpec, ctx: Context, settings: dict[str, Any]):
    mspec = model_spec(spec.cfg["model"], f"{spec.where}.model")
    mspec["path"] = ctx.resolve_ref(mspec["path"])
    out = spec.out_dir / settings["file"]
    return check_export(mspec, out, settings["type"], True, settings["ollama"], settings["system"], in_stage=True)


class Export(Stage):
    """`tunelab export` as a stage: a GGUF file (and a Modelfile) in the stage folder, round-trip figures in
    metrics.json. It makes a file, not a model folder: later stages name it by its path."""

    produces_model = False
    sections = SECTIONS
    metrics = Metrics(summary=("max_abs_diff", "top1_agreement", "written_max_abs_diff", "file_mb"))

    def check(self, spec: StageSpec, ctx: Context) -> None:
        settings = _settings(spec)
        where = f"{spec.where}.model"
        mspec = model_spec(spec.cfg["model"], where)
        if ctx.is_pending(mspec["path"]):  # an earlier stage makes it: check what its config and tokenizer allow
            config = model_config(spec.cfg["model"], ctx, where)
            if config is not None:
                architecture(config, where)
            origin = tokenizer_origin(spec.cfg["model"], ctx, where)
            if config is not None and not origin.startswith("stage '"):
                vocab = read_vocab(load_tokenizer(origin), int(config.vocab_size), where)
                if settings["ollama"]:
                    family(vocab.chat_template, where)
            return
        _plan(spec, ctx, settings)

    def run(self, spec: StageSpec, ctx: Context) -> StageResult:
        result = export(_plan(spec, ctx, _settings(spec)), say=lambda line: log.info(f"   {line}"))
        files = {"gguf": str(result.path)}
        if result.modelfile is not None:
            files["modelfile"] = str(result.modelfile)
        f = result.figures
        log.info(
            f"   {result.path.name}: {result.bytes / 1e6:.1f} MB; round trip: max |logit difference| "
            f"{f['max_abs_diff']:.4g}, top-1 agreement {100 * f['top1_agreement']:.1f}%"
        )
        return StageResult(metrics=result.metrics(), files=files)

    def plan(self, spec: StageSpec, ctx: Context) -> None:
        """No memory plan: the export holds the model in float32 once, as the stage that made it did."""
        return None
