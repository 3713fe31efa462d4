"""Chat templates: prompts rendered the way an instruct model was trained to read them, and
assistant-only loss masks derived for any template.

Every stage that prompts a model (eval, the prompts of grpo, ppo and dpo, reward scoring, chat)
goes through `use_template`: a tokenizer with a chat template gets its prompts as a user turn
(after an optional system turn and few-shot turns) rendered with `add_generation_prompt=True`;
a base model without one keeps plain prompts. A stage may set `chat_template: false` to turn the
template off, `chat_template: "<jinja>"` to give one (`tunelab` names the minimal template with
generation markers that tunelab's own tokenizers can use), and `system: "..."` for a system turn.

TRL's `assistant_only_loss` needs `{% generation %}` markers, which real templates (ChatML,
Llama 3, Qwen, Gemma) lack. `assistant_mask` derives the mask from any template instead: it
renders the conversation up to each assistant turn (with the generation prompt) and through it,
and marks the tokens whose characters the assistant's content and end-of-turn token add.
"""

from __future__ import annotations

import re
from typing import Any

from tunelab.errors import TunelabError
from tunelab.models import load_tokenizer, stage_model

# A minimal chat template with generation markers, for tokenizers tunelab trains (`chat_template: tunelab`).
TUNELAB_TEMPLATE = (
    "{%- for message in messages %}{{ '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|endoftext|>' }}"
    "{% endgeneration %}{%- else %}{{ message['content'] + '<|endoftext|>' }}{%- endif %}{{ '\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- endif %}"
)
SECTIONS = {
    "chat_template": "true (default: the tokenizer's template when it has one), false (plain prompts), or a Jinja "
    "template (`tunelab`: a minimal one with generation markers)",
    "system": "system prompt for chat-templated prompts (default: the template's own, if any)",
}
_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")


def setting(cfg: dict[str, Any], where: str) -> bool | str:
    """The stage's `chat_template:` value, checked: True, False or a template string."""
    value = cfg.get("chat_template", True)
    if value is None:
        value = True
    if not isinstance(value, (bool, str)) or value == "":
        raise TunelabError(
            f"'{where}.chat_template' is {value!r}: use true, false, or a Jinja template string (or `tunelab`)"
        )
    if isinstance(value, str) and value != "tunelab" and "{" not in value:
        raise TunelabError(
            f"'{where}.chat_template' is {value!r}, which is not a Jinja template: use true, false, `tunelab`, "
            "or the template text"
        )
    return value


def system_prompt(cfg: dict[str, Any], where: str) -> str | None:
    value = cfg.get("system")
    if value is not None and not isinstance(value, str):
        raise TunelabError(f"'{where}.system' must be a string (the system prompt), got {value!r}")
    return value


def use_template(tokenizer: Any, value: bool | str) -> bool:
    """Apply the stage's setting to `tokenizer`; True when prompts go through a chat template."""
    if isinstance(value, str):
        tokenizer.chat_template = TUNELAB_TEMPLATE if value == "tunelab" else value
        return True
    return bool(value) and bool(getattr(tokenizer, "chat_template", None))


def messages(prompt: Any, system: str | None = None, shots: list[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """A prompt as chat turns: system, few-shot examples as earlier user/assistant turns, the prompt."""
    # A list is a conversation already.
    turns = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    head = [{"role": "system", "content": system}] if system is not None and turns[0].get("role") != "system" else []
    for question, answer in shots:
        head += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return head + turns


def render(tokenizer: Any, turns: list[dict[str, Any]], where: str, row: int | None = None, **kwargs: Any) -> str:
    """The template's text for `turns` (a generation prompt at the end unless told otherwise)."""
    kwargs.setdefault("add_generation_prompt", True)
    at = f" on row {row}" if row is not None else ""
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - jinja raises TemplateError, TypeError, KeyError, ...
        msg = " ".join(str(exc).split())[:200]
        raise TunelabError(f"'{where}': the chat template fails to render{at} ({type(exc).__name__}: {msg})") from None
    if isinstance(text, str) and not text.strip() and any(_has_text(turn) for turn in turns):
        # A template that drops every message would train on, or prompt with, nothing at all.
        raise TunelabError(
            f"'{where}': the chat template renders nothing{at} (the messages hold text): it must write each "
            "message's content; fix `chat_template:`, or set chat_template: false for plain prompts"
        )
    return text


def _has_text(turn: Any) -> bool:
    content = turn.get("content") if isinstance(turn, dict) else None
    if isinstance(content, list):  # structured content: [{"type": "text", "text": ...}, ...]
        return any(isinstance(part, dict) and str(part.get("text") or "").strip() for part in content)
    return bool(str(content or "").strip())


def has_markers(template: str | None) -> bool:
    return bool(template) and bool(_MARKERS.search(template))


def check_conversation(turns: Any, where: str, row: int) -> None:
    """A `messages` value is a list of {role, content} mappings with at least one assistant turn."""
    if not isinstance(turns, list) or not turns:
        raise TunelabError(
            f"'{where}' row {row}: `messages` must be a list of {{role, content}} turns, got {type(turns).__name__}"
        )
    for turn in turns:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise TunelabError(f"'{where}' row {row}: every turn needs `role` and `content`, got {turn!r}"[:300])


def assistant_mask(
    tokenizer: Any, turns: list[dict[str, Any]], where: str, row: int = 0
) -> tuple[list[int], list[int]]:
    """(input_ids, mask) of a conversation: 1 on the tokens of the assistants' content and end-of-turn token.

    Works for any template that renders earlier turns the same whatever follows them (prefix
    preservation, which chat inference relies on too); one that does not is refused in one line.
    """
    full = render(tokenizer, turns, where, row, add_generation_prompt=False)
    spans = []
    for i, turn in enumerate(turns):
        if turn.get("role") != "assistant":
            continue
        before = render(tokenizer, turns[:i], where, row) if i else ""
        through = render(tokenizer, turns[: i + 1], where, row, add_generation_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise TunelabError(
                f"'{where}' row {row}: the chat template renders turn {i} differently once later turns follow "
                "(not prefix-preserving), so the assistant-only mask cannot be derived; set "
                "training.assistant_only_loss: false, or give `chat_template:` one with {% generation %} markers"
            )
        end = len(through.rstrip())  # the end-of-turn token, not the newline after it
        spans.append((len(before), max(end, len(before))))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s < stop and e > start for start, stop in spans)) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def tokenize_assistant_only(ds: Any, tokenizer: Any, where: str) -> Any:
    """`messages` rows as `input_ids` + `assistant_masks`, the pre-tokenized form TRL's SFTTrainer takes as is."""

    def encode(example: dict[str, Any], idx: int) -> dict[str, Any]:
        ids, mask = assistant_mask(tokenizer, example["messages"], where, idx)
        return {"input_ids": ids, "assistant_masks": mask}

    out = ds.map(encode, with_indices=True, remove_columns=ds.column_names)
    empty = next((i for i, m in enumerate(out["assistant_masks"]) if 1 not in m), None)
    if empty is not None:
        raise TunelabError(f"'{where}' row {empty} has no assistant turn: assistant_only_loss leaves nothing to learn")
    return out


def check_rows(ds: Any, tokenizer: Any, where: str, assistant_only: bool, rows: int = 2) -> None:
    """What run does to the first rows of chat data, minus the training: render them, derive their masks."""
    for i in range(min(rows, len(ds))):
        turns = ds[i]["messages"]
        check_conversation(turns, where, i)
        if assistant_only and not has_markers(tokenizer.chat_template):
            _, mask = assistant_mask(tokenizer, turns, where, i)
            if 1 not in mask:
                raise TunelabError(
                    f"'{where}' row {i} has no assistant turn: assistant_only_loss leaves nothing to learn"
                )
        else:
            render(tokenizer, turns, where, i, add_generation_prompt=False)


def conversational(
    ds: Any, tokenizer: Any, value: bool | str, system: str | None, prompt: str = "prompt", answers: tuple = ()
) -> Any:
    """Plain-text prompts (and answers) as chat turns when the tokenizer has a chat template.

    TRL's trainers (DPO, GRPO, reward) apply the template to conversational rows themselves, so the
    policy is prompted the way it reads prompts everywhere else in tunelab.
    """
    if not use_template(tokenizer, value) or prompt not in ds.column_names or not isinstance(ds[0][prompt], str):
        return ds
    columns = [prompt, *(c for c in answers if c in ds.column_names and isinstance(ds[0][c], str))]

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        out = {prompt: messages(row[prompt], system)}
        for c in columns[1:]:
            out[c] = [{"role": "assistant", "content": row[c].strip()}]
        return out

    return ds.map(convert, remove_columns=columns)


def chat_pairs(cfg: dict[str, Any], where: str, tokenizer: Any, *datasets: Any) -> list[Any]:
    """Plain-text preference pairs as chats when the tokenizer has a chat template (see `conversational`)."""
    value, system = setting(cfg, where), system_prompt(cfg, where)
    return [
        None if ds is None else conversational(ds, tokenizer, value, system, answers=("chosen", "rejected"))
        for ds in datasets
    ]


def reward_texts(tokenizer: Any, prompts: list[Any], answers: list[str], value: bool | str = True) -> list[str]:
    """Prompt + answer as a reward model reads them: one chat through its template when it has one."""
    if value is not False and getattr(tokenizer, "chat_template", None):
        return [
            render(
                tokenizer,
                messages(p) + [{"role": "assistant", "content": a}],
                "reward_model",
                i,
                add_generation_prompt=False,
            )
            for i, (p, a) in enumerate(zip(prompts, answers, strict=True))
        ]
    return [str(p) + a for p, a in zip(prompts, answers, strict=True)]


def check_chat_data(ds: Any, columns: tuple[str, ...], spec: Any, ctx: Any) -> None:
    """Conversational rows (a column of chat turns) need a chat template: say so at validate, not mid-run."""
    chat = [c for c in columns if c in ds.column_names and isinstance(ds[0][c], list)]
    value = setting(spec.cfg, spec.where)
    if not chat or isinstance(value, str):
        return
    if value is False:
        raise TunelabError(
            f"'{spec.where}' sets chat_template: false, but its data is conversational ({chat[0]} holds chat "
            "turns): drop chat_template: false, or use plain-text data"
        )

    mspec = stage_model(spec, ctx)
    if mspec is None:
        return  # an earlier stage makes the model; its tokenizer is checked when that stage's output exists
    tokenizer = load_tokenizer(mspec.get("gguf_file", mspec["path"]))
    if not tokenizer.chat_template:
        raise TunelabError(
            f"'{spec.where}.data' is conversational ({chat[0]} holds chat turns) but the tokenizer of the model "
            "has no chat template: use a chat model, set `chat_template:` (a Jinja template, or `tunelab`), "
            "or use plain-text data"
        )
