"""An Ollama `Modelfile` beside the exported file: `ollama create NAME -f Modelfile` then runs it.

Ollama prompts with Go templates, not the Jinja chat template the model carries, so the template is
converted by family: the family is recognised by the special tokens the Jinja template writes, and
its Go template is written here, turn by turn as the Jinja one renders them. Each family's end-of-turn
token becomes a `PARAMETER stop`, so Ollama stops where the model ends its turn. A template of no
known family is refused: a wrong TEMPLATE would prompt the model with text it was never trained on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tunelab.core.errors import TunelabError

HEADER = "# Modelfile written by tunelab export: ollama create NAME -f Modelfile"

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""

LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}{{ if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""

# Gemma has no system turn: its Jinja template puts the system text at the top of the first user turn.
GEMMA = """{{- $first := true }}
{{- range .Messages }}
{{- if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ else if eq .Role "user" }}<start_of_turn>user
{{ if and $first $.System }}{{ $.System }}

{{ end }}{{ .Content }}<end_of_turn>
{{ $first = false }}{{ end }}
{{- end }}<start_of_turn>model
"""


@dataclass(frozen=True)
class Family:
    name: str
    marker: str  # a token the Jinja template writes, which names the family
    template: str
    stops: tuple[str, ...]


FAMILIES = (
    Family("ChatML", "<|im_start|>", CHATML, ("<|im_end|>", "<|im_start|>")),
    Family("Llama 3", "<|start_header_id|>", LLAMA3, ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")),
    Family("Gemma", "<start_of_turn>", GEMMA, ("<end_of_turn>", "<start_of_turn>")),
)
KNOWN = "ChatML (<|im_start|>: SmolLM2, Qwen), Llama 3 (<|start_header_id|>) and Gemma (<start_of_turn>)"


def family(template: str | None, where: str) -> Family:
    """The family of a Jinja chat template, or one line naming those `--ollama` converts."""
    if not template:
        raise TunelabError(
            f"'{where}' has no chat template, so --ollama has no TEMPLATE to write: drop --ollama (Ollama would "
            f"prompt it with raw text), or export a chat model; --ollama converts {KNOWN} templates"
        )
    for fam in FAMILIES:
        if fam.marker in template:
            return fam
    raise TunelabError(
        f"'{where}' has a chat template of no family --ollama converts (it knows {KNOWN}): drop --ollama, or "
        "write the Modelfile's TEMPLATE by hand"
    )


def default_system(tokenizer: object, fam: Family) -> str | None:
    """The system text a ChatML template writes when the conversation has none (SmolLM2's names itself):
    Ollama's template writes a system turn only when SYSTEM is set, so it becomes the SYSTEM line."""
    if fam.name != "ChatML":
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that needs more than a user turn: no default to find
        return None
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return found.group(1) if found else None


def modelfile(gguf_name: str, fam: Family, system: str | None) -> str:
    """The Modelfile's text: FROM the file beside it, TEMPLATE, stops, SYSTEM."""
    if system is not None and '"""' in system:
        raise TunelabError('the system prompt holds """, which a Modelfile cannot quote: remove it')
    lines = [HEADER, f"FROM ./{gguf_name}", f'TEMPLATE """{fam.template}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in fam.stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def check_target(path: Path, overwrite: bool) -> None:
    """A Modelfile is replaced only with --overwrite, and only one this command wrote (its first line)."""
    if path.is_dir():
        raise TunelabError(f"'{path}' is a folder, where --ollama writes the Modelfile: move it, or export elsewhere")
    if not path.exists():
        return
    if not overwrite:
        raise TunelabError(f"'{path}' exists: pass --overwrite to replace it, or export into another folder")
    try:
        first = path.read_text(errors="replace").split("\n", 1)[0]
    except OSError as exc:
        raise TunelabError(f"'{path}' cannot be read ({exc.strerror}): move it, or export elsewhere") from None
    if first != HEADER:
        raise TunelabError(
            f"'{path}' is a Modelfile tunelab did not write: it is left alone; move it, or export into another folder"
        )
