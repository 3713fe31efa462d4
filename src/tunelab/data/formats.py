"""Data formats: the shapes users' data comes in, detected and converted (`datasets.map`) into a stage's own.

A source's `format:` is one of FORMATS. `auto` (the default) detects it from the columns and the first rows,
and says from which columns. Conversions follow the formats' public definitions:

- `text`: a `text` column (plain language modelling);
- `messages`: OpenAI chat, `messages` of {role, content} turns, with `tool_calls` (arguments a JSON string, or
  a mapping) on assistant turns, `tool` turns holding results, and a `tools` column of function schemas;
- `sharegpt`: `conversations` of {from, value} turns; `from` is human, gpt, system, function_call (a call, as
  JSON {name, arguments}) or observation (a tool's result), other names through `roles:`; optional `system`
  and `tools` columns (LLaMA-Factory's definition);
- `alpaca`: `instruction`, `input` (optional), `output`, optional `system` and `history` ([instruction, output]
  pairs of earlier turns); the user turn is instruction and input joined by a newline;
- `prompt_completion`: `prompt` and `completion`, plain text or chat turns;
- `preference`: `chosen` and `rejected`, with an optional `prompt`, plain or conversational; a ShareGPT-style
  row (`conversations` with `chosen`/`rejected` {from, value} turns) and an Alpaca-style row (`instruction`,
  `input`, `chosen`, `rejected`) convert too;
- `kto`: `prompt`, `completion` and a boolean `label`;
- `vision`: `images` with `messages` (or ShareGPT `conversations` whose `<image>` marks place the images).

A stage takes one *target* shape (see TARGETS). Data already in the stage's own columns passes through
untouched (no copy); other formats are mapped into it. In converted chats, turns are {role, content}; tool
chats also carry `tool_calls` (arguments as JSON strings, as OpenAI stores them), `tool_call_id` and `name`,
and the `tools` column holds the schemas as a JSON string (which TRL's SFTTrainer reads); templates get them
back as mappings at rendering (`tunelab.models.chat_templates.template_turns`).

Every function works on `datasets.Dataset` and `datasets.IterableDataset` alike (rows are read from the first
few; nothing is materialised).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from tunelab.core.errors import TunelabError

FORMATS = ("auto", "text", "messages", "sharegpt", "alpaca", "prompt_completion", "preference", "kto", "vision")

NATIVE: dict[str, tuple[str, ...]] = {
    "lm": ("text", "messages", "prompt_completion"),
    "text": ("text",),
    "preference": ("preference",),
    "kto": ("kto", "preference"),
    "prompt": ("prompt_completion",),
    "eval": ("prompt_completion",),
    "vision": ("vision",),
}
"""Per target, the formats a stage reads as they are, in the order auto-detection prefers them (sft picks
`text` over `messages` over `prompt`/`completion`, as it always has)."""
CONVERTED: dict[str, tuple[str, ...]] = {
    "lm": ("sharegpt", "alpaca"),
    "prompt": ("messages", "sharegpt", "alpaca"),
    "eval": ("messages", "sharegpt", "alpaca"),
}
"""Per target, the formats mapped into its shape; auto-detection finding two of them is ambiguous."""
TARGETS = tuple(NATIVE)
SHAPES = {
    "lm": "text, messages, or prompt and completion",
    "text": "a text column",
    "preference": "prompt (optional), chosen and rejected",
    "kto": "prompt, completion and a boolean label, or preference pairs",
    "prompt": "a prompt (and an optional completion, the reference answer)",
    "eval": "a prompt and a completion (the reference answer)",
    "vision": "images and messages",
}

# What a source needs, per format, to be read as that format (alternatives separated by "|").
REQUIRED: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "messages": ("messages",),
    "sharegpt": ("conversations|messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "vision": ("images|image", "messages|conversations"),
}
# The columns each format is known by: the closest format to a source is the one sharing the most.
KNOWN_COLUMNS: dict[str, set[str]] = {
    "text": {"text"},
    "messages": {"messages", "tools"},
    "sharegpt": {"conversations", "system", "tools"},
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "prompt_completion": {"prompt", "completion"},
    "preference": {"prompt", "chosen", "rejected"},
    "kto": {"prompt", "completion", "label"},
    "vision": {"images", "image", "messages"},
}

# ShareGPT role names (LLaMA-Factory's and the original ShareGPT dumps'), and what `roles:` may map to.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "function_call",
    "observation": "tool",
    "tool": "tool",
}
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
ROLE_TARGETS = ("system", "user", "assistant", "tool", "function_call", "observation")
"""What `roles:` maps a data role to: a chat role, or ShareGPT's function_call (an assistant's tool call) and
observation (a tool's result, the same as tool)."""

IMAGE_MARK = "<image>"


# --- detection --------------------------------------------------------------------------------------------------
def _turn_style(rows: list[dict], column: str) -> str | None:
    """'sharegpt' ({from, value} turns), 'messages' ({role, content}), or None when the rows do not say."""
    for row in rows:
        turns = row.get(column)
        if isinstance(turns, list):
            for turn in turns:
                if isinstance(turn, dict):
                    if "from" in turn and "value" in turn:
                        return "sharegpt"
                    if "role" in turn:
                        return "messages"
    return None


def _has(columns: Iterable[str], need: str) -> str | None:
    """The column of `need` ("a|b": either) present in `columns`, or None."""
    return next((c for c in need.split("|") if c in columns), None)


def _signature(fmt: str, columns: list[str], rows: list[dict], target: str) -> str | None:
    """Why the source reads as `fmt` (the columns it is known by), or None when it does not."""
    cols = set(columns)
    if fmt == "text":
        return "column text" if "text" in cols else None
    if fmt == "messages":
        if "messages" in cols and _turn_style(rows, "messages") != "sharegpt":
            return "column messages ({role, content} turns)" + (" and tools" if "tools" in cols else "")
        return None
    if fmt == "sharegpt":
        if "conversations" in cols:
            return "column conversations ({from, value} turns)"
        if "messages" in cols and _turn_style(rows, "messages") == "sharegpt":
            return "column messages of {from, value} turns"
        return None
    if fmt == "alpaca":
        if {"instruction", "output"} <= cols:
            return "columns " + ", ".join(
                c for c in ("instruction", "input", "output", "system", "history") if c in cols
            )
        return None
    if fmt == "prompt_completion":
        if "prompt" not in cols:
            return None
        if "completion" in cols:
            return "columns prompt, completion"
        return None if target == "lm" else "column prompt"
    if fmt == "preference":
        if not {"chosen", "rejected"} <= cols:
            return None
        if "conversations" in cols:
            return "columns conversations, chosen, rejected (ShareGPT-style pairs)"
        if "instruction" in cols:
            return "columns instruction, chosen, rejected (Alpaca-style pairs)"
        return "columns " + ", ".join(c for c in ("prompt", "chosen", "rejected") if c in cols)
    if fmt == "kto":
        return "columns prompt, completion, label" if {"prompt", "completion", "label"} <= cols else None
    if fmt == "vision":
        images, turns = _has(cols, "images|image"), _has(cols, "messages|conversations")
        return f"columns {images}, {turns}" if images and turns else None
    raise ValueError(fmt)


def detect(column_names: list[str], rows: list[dict], where: str, target: str = "lm") -> tuple[str, str]:
    """(format, why): the format of a source for `target`, and the columns it was recognised by.

    The stage's own shapes (NATIVE) come first, in their order; else one converted format (CONVERTED).
    Two converted formats at once are ambiguous (one line naming both and `format:`). A source matching only
    formats the stage cannot take is refused with the stage's formats; one matching nothing is ("as_is", why):
    the stage's own column checks speak for it (custom columns such as `prompt_column:` pass this way).
    """
    columns = list(column_names)
    if target == "lm" and _has(columns, "images|image"):  # image+text rows read as text train without images
        why = _signature("vision", columns, rows, "vision") or "an images column"
        raise TunelabError(
            f"{where} holds images: train image+text models with the `vlm_sft` stage (sft is text-only; {why})"
        )
    for fmt in NATIVE[target]:
        why = _signature(fmt, columns, rows, target)
        if why:
            return fmt, why
    found = []
    for fmt in CONVERTED.get(target, ()):
        why = _signature(fmt, columns, rows, target)
        if why and not (fmt in ("sharegpt", "alpaca") and {"chosen", "rejected"} <= set(columns)):
            found.append((fmt, why))
    if len(found) > 1:
        (a, why_a), (b, why_b) = found[:2]
        raise TunelabError(
            f"{where} could be {a} ({why_a}) or {b} ({why_b}): set `format: {a}` or `format: {b}` on the source "
            "(or drop the other format's columns)"
        )
    if found:
        return found[0]
    others = [(fmt, why) for fmt in FORMATS[1:] if (why := _signature(fmt, columns, rows, target))]
    if others:
        fmt, why = others[0]
        raise not_accepted(where, fmt, why, target)
    return "as_is", f"no known format's columns (columns: {', '.join(columns)}): read as the stage's own columns"


STAGE_NEEDS = {
    "lm": "needs a 'text' column, a 'messages' column, or 'prompt' and 'completion' columns for SFT",
    "text": "has no column 'text' (text to pre-train on)",
    "preference": "is not preference data: it has no 'chosen' or 'rejected' column (pairs need 'chosen' and "
    "'rejected', optionally 'prompt')",
    "kto": "is not KTO data: it needs prompt, completion and label (true/false) columns, or preference pairs "
    "(chosen and rejected)",
    "prompt": "has no prompts (a 'prompt' column)",
    "eval": "has no prompts to answer (a 'prompt' column)",
    "vision": "has no `images` column, but the model is an image+text model: give each row its images (TRL's "
    "vision format), or train a text model with `sft`",
}


def accepted(target: str) -> tuple[str, ...]:
    """The formats a target takes: its own shapes, then those converted into it."""
    return NATIVE[target] + CONVERTED.get(target, ())


def stage_name(where: str) -> str:
    """The stage a source belongs to, from its label (`'stages.sft.data' (path)` -> sft)."""
    parts = where.strip("'").split("'")[0].split(".")
    return parts[1] if parts[0] == "stages" and len(parts) > 1 else parts[0]


def not_accepted(where: str, fmt: str, why: str, target: str) -> TunelabError:
    stage = stage_name(where)
    return TunelabError(
        f"{where} {STAGE_NEEDS[target]}: it holds {fmt} data ({why}), which stage '{stage}' cannot take; "
        f"it takes format {' | '.join(accepted(target))}"
    )


def closest_format(columns: list[str], rows: list[dict], target: str) -> str | None:
    """The format a source's columns come nearest to: one it matches, else the one sharing most column names."""
    for fmt in accepted(target) + tuple(f for f in FORMATS[1:] if f not in accepted(target)):
        if _signature(fmt, columns, rows, target):
            return fmt
    scores = {fmt: len(KNOWN_COLUMNS[fmt] & set(columns)) for fmt in KNOWN_COLUMNS}
    best = max(scores.values())
    return next(fmt for fmt in accepted(target) + FORMATS[1:] if scores.get(fmt) == best) if best else None


def check_format(fmt: str, column_names: list[str], rows: list[dict], where: str, target: str) -> str:
    """Why a source given `format: fmt` reads as it: its columns are there; one line naming the found columns
    and the closest format when not."""
    if fmt not in accepted(target):
        stage = stage_name(where)
        raise TunelabError(
            f"{where} is `format: {fmt}`, which stage '{stage}' cannot take (it reads {SHAPES[target]}): "
            f"use format {' | '.join(accepted(target))}"
        )
    why = _signature(fmt, list(column_names), rows, target)
    if why:
        return why
    need = REQUIRED[fmt] if not (fmt == "prompt_completion" and target != "lm") else ("prompt",)
    guess = closest_format(list(column_names), rows, target)
    hint = f"; the closest format is {guess} (set `format: {guess}`, or `columns:` to rename)" if guess else ""
    if guess == fmt:
        hint = "; rename them with `columns:` (e.g. {question: prompt})"
    raise TunelabError(
        f"{where} is `format: {fmt}`, which needs column(s) {', '.join(n.replace('|', ' or ') for n in need)}; "
        f"its columns are {', '.join(column_names)}{hint}"
    )


# --- turns ------------------------------------------------------------------------------------------------------
def _text(content: Any) -> str:
    """A turn's content as text: structured text parts ([{type: text, text}]) joined."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return str(content)


def _json_value(value: Any, where: str, row: int, what: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise TunelabError(f"{where} row {row}: {what} is not valid JSON ({exc.msg}): {value[:80]!r}") from None
    return value


def _drop_none(value: Any) -> Any:
    """A JSON value without the None members Arrow adds when it unifies mappings of different keys."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _arguments(value: Any, where: str, row: int) -> str:
    """A tool call's arguments as a JSON string (OpenAI's form), from a string or a mapping."""
    if value is None:
        return "{}"
    if isinstance(value, str):
        _json_value(value, where, row, "a tool call's arguments")
        return value
    return json.dumps(_drop_none(value), ensure_ascii=False)


def _tool_calls(calls: Any, where: str, row: int) -> list[dict]:
    """Tool calls as OpenAI stores them: [{type: function, function: {name, arguments: JSON string}, id?}]."""
    calls = _json_value(calls, where, row, "a function_call")
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise TunelabError(f"{where} row {row}: a tool call is {calls!r}; give {{name, arguments}}"[:300])
    out = []
    for call in calls:
        if not isinstance(call, dict):
            raise TunelabError(f"{where} row {row}: a tool call is {call!r}; give {{name, arguments}}"[:300])
        function = call.get("function") if isinstance(call.get("function"), dict) else call
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise TunelabError(f"{where} row {row}: a tool call has no function name: {call!r}"[:300])
        item: dict[str, Any] = {
            "type": "function",
            "function": {"name": name, "arguments": _arguments(function.get("arguments"), where, row)},
        }
        if call.get("id") is not None:
            item["id"] = str(call["id"])
        out.append(item)
    return out


def _tools(value: Any, where: str, row: int) -> str | None:
    """A row's tool schemas as one JSON string (TRL's SFTTrainer reads it so), or None."""
    value = _json_value(value, where, row, "`tools`")
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        value = [value]
    return json.dumps(_drop_none(value), ensure_ascii=False)


class Roles:
    """Data role names to chat roles: the format's defaults, then `roles:`."""

    def __init__(self, defaults: dict[str, str], given: dict | None, where: str) -> None:
        self.where = where
        self.given = dict(given or {})
        self.map = dict(defaults)
        for name, role in (given or {}).items():
            self.map[str(name)] = "tool" if role == "observation" else role

    def changes(self) -> bool:
        """`roles:` was given: rows pass through no format untouched then."""
        return bool(self.given)

    def __call__(self, name: Any, row: int) -> str:
        role = self.map.get(name) if isinstance(name, str) else None
        if role is None:
            known = ", ".join(sorted(self.map))
            raise TunelabError(
                f"{self.where} row {row}: role {name!r} does not map to a chat role (known: {known}): add it to the "
                f"source's `roles:`, e.g. roles: {{{name}: assistant}}"
            )
        return role


def _turn(role: str, content: Any, where: str, row: int, source: dict | None = None) -> dict[str, Any]:
    """One canonical turn: {role, content} plus a call's or result's fields."""
    if role == "function_call":  # ShareGPT: the assistant calls a tool; the value is the call (JSON)
        return {"role": "assistant", "content": "", "tool_calls": _tool_calls(content, where, row)}
    turn: dict[str, Any] = {"role": role, "content": _text(content)}
    if source:
        if source.get("tool_calls"):
            turn["tool_calls"] = _tool_calls(source["tool_calls"], where, row)
        for key in ("tool_call_id", "name"):
            if source.get(key) is not None:
                turn[key] = str(source[key])
    return turn


def _with_system(turns: list[dict], system: str | None) -> list[dict]:
    """`system` as the first turn of a conversation that has none."""
    if system and not (turns and turns[0].get("role") == "system"):
        return [{"role": "system", "content": system}, *turns]
    return turns


def _sharegpt_turns(turns: Any, roles: Roles, where: str, row: int) -> list[dict]:
    if not isinstance(turns, list):
        raise TunelabError(f"{where} row {row}: the conversation is {type(turns).__name__}, not a list of turns")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise TunelabError(f"{where} row {row}: a turn is {turn!r}, not {{from, value}}"[:300])
        name = turn.get("from") if turn.get("from") is not None else turn.get("role")
        value = turn.get("value") if turn.get("value") is not None else turn.get("content")
        out.append(_turn(roles(name, row), value, where, row, turn))
    return out


def _message_turns(turns: Any, roles: Roles, where: str, row: int) -> list[dict]:
    if not isinstance(turns, list):
        raise TunelabError(f"{where} row {row}: `messages` is {type(turns).__name__}, not a list of turns")
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or "role" not in turn:
            raise TunelabError(f"{where} row {row}: every turn needs `role` and `content`, got {turn!r}"[:300])
        out.append(_turn(roles(turn["role"], row), turn.get("content"), where, row, turn))
    return out


def _alpaca_turns(row_data: dict, where: str, row: int) -> list[dict]:
    turns: list[dict] = []
    system = row_data.get("system")
    if system:
        turns.append({"role": "system", "content": str(system)})
    for pair in row_data.get("history") or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TunelabError(
                f"{where} row {row}: a `history` entry is {pair!r}; Alpaca history is a list of [instruction, output]"
                " pairs"[:300]
            )
        turns += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
    query = "\n".join(str(p) for p in (row_data.get("instruction"), row_data.get("input")) if p)
    turns.append({"role": "user", "content": query})
    if row_data.get("output") is not None:
        turns.append({"role": "assistant", "content": str(row_data["output"])})
    return turns


# --- features ---------------------------------------------------------------------------------------------------
def _turn_feature(tools: bool) -> dict:
    from datasets import Value

    plain = {"role": Value("string"), "content": Value("string")}
    if not tools:
        return plain
    from datasets import List

    call = {"type": Value("string"), "function": {"name": Value("string"), "arguments": Value("string")}}
    call["id"] = Value("string")
    return {**plain, "tool_calls": List(call), "tool_call_id": Value("string"), "name": Value("string")}


def _turns_feature(tools: bool = False):
    from datasets import List

    return List(_turn_feature(tools))


def _features(ds: Any, drop: Iterable[str], out: dict[str, Any]):
    """The mapped dataset's features: the kept columns' own, and `out` for the written ones (None: unknown)."""
    from datasets import Features

    features = getattr(ds, "features", None)
    if features is None:
        return None
    kept = {k: v for k, v in features.items() if k not in set(drop) and k not in out}
    return Features({**kept, **out})


def first_rows(ds: Any, n: int = 8) -> list[dict]:
    """The first rows of a Dataset or IterableDataset (for detection), without reading the rest."""
    if hasattr(ds, "__len__"):
        return [ds[i] for i in range(min(n, len(ds)))]
    return list(ds.take(n))


def column_names(ds: Any) -> list[str]:
    names = getattr(ds, "column_names", None)
    if names is None:  # an IterableDataset of unknown features: its first row says
        rows = first_rows(ds, 1)
        names = list(rows[0]) if rows else []
    return list(names)


def _tooling(ds: Any, fmt: str, roles: Roles) -> bool:
    """Whether a source's chats use tools: a `tools` column, tool fields in its turns' schema, or (ShareGPT)
    function_call/observation turns. Decides the converted turns' schema (plain chats stay {role, content})."""
    names = column_names(ds)
    if "tools" in names:
        return True
    column = "conversations" if "conversations" in names else "messages"
    feature = (getattr(ds, "features", None) or {}).get(column)
    inner = getattr(feature, "feature", None)
    if isinstance(inner, dict) and ({"tool_calls", "tool_call_id"} & set(inner)):
        return True
    tool_roles = {name for name, role in roles.map.items() if role in ("function_call", "tool")}
    if isinstance(inner, dict) and fmt == "sharegpt" and "from" in inner and hasattr(ds, "__len__"):
        import pyarrow.compute as pc

        names_col = pc.struct_field(pc.list_flatten(ds.with_format("arrow")[column]), "from")
        return bool(set(pc.unique(names_col).to_pylist()) & tool_roles)
    # Turns of mixed shapes (datasets' Json type) say nothing in their schema: read them (a stream: its start)
    rows = ds.select_columns([column]) if hasattr(ds, "__len__") else first_rows(ds, 100)
    for row in rows:
        for turn in row.get(column) or []:
            if isinstance(turn, dict) and (
                turn.get("tool_calls") or turn.get("role") == "tool" or turn.get("from") in tool_roles
            ):
                return True
    return False


def tool_chat(ds: Any) -> bool:
    """A converted chat dataset uses tools: a `tools` column, or tool fields in its turns' schema."""
    names = column_names(ds)
    if "tools" in names:
        return True
    inner = getattr((getattr(ds, "features", None) or {}).get("messages"), "feature", None)
    return isinstance(inner, dict) and "tool_calls" in inner


# --- conversion -------------------------------------------------------------------------------------------------
def convert(
    ds: Any,
    fmt: str,
    target: str,
    *,
    system: str | None = None,
    roles: dict | None = None,
    where: str,
):
    """`ds` (a Dataset or IterableDataset in format `fmt`) in the shape of `target`, by `datasets.map`.

    Data already in the target's shape passes through untouched unless `system:` or `roles:` asks for a
    change. `system` is the system turn of conversations that have none; `roles` maps the data's role names.
    """
    if fmt == "as_is":
        return ds
    names = column_names(ds)
    if system is not None and fmt == "text":
        raise TunelabError(f"{where} sets `system:`, but text rows have no turns to put it in: remove `system:`")
    defaults = SHAREGPT_ROLES if fmt in ("sharegpt", "preference", "vision") else {r: r for r in MESSAGE_ROLES}
    role_map = Roles(defaults, roles, where)
    build = _CONVERTERS.get((fmt, target)) or _CONVERTERS.get((fmt, "*"))
    if build is None:
        return ds
    plan = build(ds, fmt, names, role_map, system, where, target)
    if plan is None:
        return ds
    fn, drop, out = plan
    features = _features(ds, drop, out) if out is not None else None
    kwargs: dict[str, Any] = {"with_indices": True, "remove_columns": [c for c in drop if c in names]}
    if features is not None:
        kwargs["features"] = features
    if hasattr(ds, "__len__"):
        kwargs["desc"] = f"{fmt} to the stage's rows"
    return ds.map(_batched(fn), batched=True, batch_size=1000, **kwargs)


def _batched(fn: Callable[[dict, int], dict]) -> Callable[[dict, list[int]], dict]:
    """A row converter as a batched map function: datasets encodes one Arrow batch per 1,000 rows instead of
    one per row, which is most of a row map's cost (benchmarks/data_mixing.py)."""

    def batch_fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        keys, rows = list(batch), zip(*batch.values(), strict=True)
        out = [fn(dict(zip(keys, values, strict=True)), i) for values, i in zip(rows, indices, strict=True)]
        return {key: [row[key] for row in out] for key in (out[0] if out else ())}

    return batch_fn


Plan = tuple[Callable[[dict, int], dict], list[str], dict | None] | None


def _chat_source(fmt: str, names: list[str]) -> str:
    if fmt == "sharegpt":
        return "conversations" if "conversations" in names else "messages"
    return "messages"


def _chat_turns(fmt: str, column: str, roles: Roles, where: str) -> Callable[[dict, int], list[dict]]:
    """Row -> canonical turns (system column and all), for messages, sharegpt and alpaca sources."""
    if fmt == "alpaca":
        return lambda row, i: _alpaca_turns(row, where, i)
    if fmt == "sharegpt":

        def sharegpt(row: dict, i: int) -> list[dict]:
            turns = _sharegpt_turns(row[column], roles, where, i)
            return _with_system(turns, str(row["system"])) if row.get("system") else turns

        return sharegpt
    return lambda row, i: _message_turns(row[column], roles, where, i)


def _to_messages(
    ds: Any, fmt: str, names: list[str], roles: Roles, system: str | None, where: str, target: str
) -> Plan:
    """messages, sharegpt or alpaca rows -> `messages` (and `tools`) for sft."""
    tools = _tooling(ds, fmt, roles) if fmt != "alpaca" else False
    if fmt == "messages" and not tools and system is None and not roles.changes():
        return None  # already the stage's shape
    column = _chat_source(fmt, names)
    turns_of = _chat_turns(fmt, column, roles, where)
    has_tools = "tools" in names

    def fn(row: dict, i: int) -> dict:
        out: dict[str, Any] = {"messages": _with_system(turns_of(row, i), system)}
        if has_tools:
            out["tools"] = _tools(row.get("tools"), where, i)
        return out

    out_features: dict[str, Any] = {"messages": _turns_feature(tools)}
    if has_tools:
        from datasets import Value

        out_features["tools"] = Value("string")
    return fn, list(names), out_features


def _prompt_and_answer(turns: list[dict]) -> tuple[list[dict], str | None]:
    """A conversation split before its last assistant turn: (the turns before it, its text)."""
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        return turns, None
    return turns[:last], turns[last]["content"]


def _to_prompts(ds: Any, fmt: str, names: list[str], roles: Roles, system: str | None, where: str, target: str) -> Plan:
    """messages, sharegpt or alpaca rows -> `prompt` (+ `completion`, the reference answer) for grpo, rloo, ppo,
    distill (prompts as chat turns) and eval (prompts as text: one question, its answer)."""
    from datasets import Value

    column = _chat_source(fmt, names)
    turns_of = _chat_turns(fmt, column, roles, where)
    consumed = {"alpaca": ["instruction", "input", "output", "system", "history"], "sharegpt": [column, "system"]}
    drop = [c for c in consumed.get(fmt, [column]) if c in names] + [c for c in ("prompt", "completion") if c in names]
    plain = target == "eval" or (fmt == "alpaca" and system is None and not {"system", "history"} & set(names))
    if target == "eval" and system is not None:
        raise TunelabError(
            f"{where} sets `system:`, but eval prompts are text: set the eval stage's own `system:` instead"
        )

    def fn(row: dict, i: int) -> dict:
        prompt, answer = _prompt_and_answer(turns_of(row, i))
        if not plain:
            return {"prompt": _with_system(prompt, system), "completion": answer}
        extra = [t for t in prompt[:-1]] if prompt else []
        if not prompt or prompt[-1]["role"] != "user" or extra:
            raise TunelabError(
                f"{where} row {i}: {target} prompts are one question, but this row has "
                f"{len(prompt)} turn(s) before the answer ({', '.join(t['role'] for t in prompt)}): keep one user "
                "turn per row (set the stage's `system:` and `fewshot:` for the rest)"
            )
        return {"prompt": prompt[-1]["content"], "completion": answer}

    prompt_feature = Value("string") if plain else _turns_feature(False)
    return fn, drop, {"prompt": prompt_feature, "completion": Value("string")}


def _answer_turns(value: Any, roles: Roles, where: str, row: int) -> list[dict] | str:
    """A preference answer: text, a list of turns, or one ShareGPT/OpenAI turn (a mapping) -> turns or text."""
    if isinstance(value, dict):
        name = next((value[k] for k in ("from", "role") if value.get(k) is not None), "gpt")
        text = next((value[k] for k in ("value", "content") if value.get(k) is not None), "")
        return [_turn(roles(name, row), text, where, row, value)]
    if isinstance(value, list):
        style = "sharegpt" if any(isinstance(t, dict) and "from" in t for t in value) else "messages"
        return (_sharegpt_turns if style == "sharegpt" else _message_turns)(value, roles, where, row)
    return "" if value is None else str(value)


def _to_preference(
    ds: Any, fmt: str, names: list[str], roles: Roles, system: str | None, where: str, target: str
) -> Plan:
    """Preference pairs -> prompt (optional), chosen, rejected: plain or conversational, as TRL reads them.

    ShareGPT-style pairs (`conversations` + chosen/rejected turns) and Alpaca-style pairs (`instruction`,
    `input` + chosen/rejected texts) become conversational and plain pairs; a `system:` makes plain pairs chats.
    """
    from datasets import Value

    rows = first_rows(ds, 4)
    sharegpt = "conversations" in names
    alpaca = "instruction" in names and not sharegpt
    chat_prompt = sharegpt or _turn_style(rows, "prompt") is not None
    chat_answers = any(isinstance(r.get(c), (list, dict)) for r in rows for c in ("chosen", "rejected"))
    single_turns = any(isinstance(r.get(c), dict) for r in rows for c in ("chosen", "rejected"))
    if not (sharegpt or alpaca or single_turns or system is not None or roles.changes()):
        return None  # TRL's own preference format already (its columns are checked by the stage)
    chat = chat_prompt or chat_answers or system is not None or (alpaca and {"system", "history"} & set(names))
    drop = [c for c in ("conversations", "instruction", "input", "system", "history", "tools") if c in names]
    drop += [c for c in ("prompt", "chosen", "rejected") if c in names]
    has_prompt = sharegpt or alpaca or "prompt" in names

    def as_turns(value: Any) -> list[dict]:
        return value if isinstance(value, list) else [{"role": "assistant", "content": value}]

    def fn(row: dict, i: int) -> dict:
        if sharegpt:
            prompt: Any = _sharegpt_turns(row["conversations"], roles, where, i)
            if row.get("system"):
                prompt = _with_system(prompt, str(row["system"]))
        elif alpaca:
            turns = _alpaca_turns({**row, "output": None}, where, i)
            prompt = turns if chat else turns[-1]["content"]
        else:
            value = row.get("prompt")
            prompt = _answer_turns(value, roles, where, i) if isinstance(value, list) else value
        chosen = _answer_turns(row["chosen"], roles, where, i)
        rejected = _answer_turns(row["rejected"], roles, where, i)
        if not chat:
            plain = {"chosen": chosen, "rejected": rejected}
            return {"prompt": prompt, **plain} if has_prompt else plain
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        result = {"chosen": as_turns(chosen), "rejected": as_turns(rejected)}
        if prompt is None:  # implicit prompt: whole conversations
            result = {k: _with_system(v, system) for k, v in result.items()}
        else:
            result["prompt"] = _with_system(prompt, system)
        return result

    value = _turns_feature(False) if chat else Value("string")
    out = {"chosen": value, "rejected": value}
    if has_prompt:
        out = {"prompt": value, **out}
    return fn, drop, out


def _to_kto(ds: Any, fmt: str, names: list[str], roles: Roles, system: str | None, where: str, target: str) -> Plan:
    """prompt/completion/label rows: passed through, unless `system:` or `roles:` makes them chats."""
    from datasets import Value

    if system is None and not roles.changes():
        return None
    chat = system is not None or _turn_style(first_rows(ds, 4), "prompt") is not None

    def fn(row: dict, i: int) -> dict:
        prompt, completion = row["prompt"], row["completion"]
        prompt = _answer_turns(prompt, roles, where, i) if isinstance(prompt, list) else prompt
        completion = _answer_turns(completion, roles, where, i)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return {"prompt": _with_system(prompt, system), "completion": completion}

    value = _turns_feature(False) if chat else Value("string")
    return fn, ["prompt", "completion"], {"prompt": value, "completion": value}


def _prompt_completion(
    ds: Any, fmt: str, names: list[str], roles: Roles, system: str | None, where: str, target: str
) -> Plan:
    """prompt/completion rows: passed through; `system:` (or `roles:`) makes them conversational."""
    if system is None and not roles.changes():
        return None
    if target == "eval":
        raise TunelabError(
            f"{where} sets `system:` or `roles:`, but eval prompts are text: set the eval stage's own `system:`"
        )
    from datasets import Value

    has_completion = "completion" in names

    def fn(row: dict, i: int) -> dict:
        prompt = row["prompt"]
        prompt = (
            _answer_turns(prompt, roles, where, i)
            if isinstance(prompt, list)
            else [{"role": "user", "content": prompt}]
        )
        out: dict[str, Any] = {"prompt": _with_system(prompt, system)}
        if has_completion:
            completion = row["completion"]
            if target == "lm":
                completion = _answer_turns(completion, roles, where, i)
                if isinstance(completion, str):
                    completion = [{"role": "assistant", "content": completion}]
            else:
                completion = (
                    _text(completion)
                    if not isinstance(completion, list)
                    else _prompt_and_answer(_answer_turns(completion, roles, where, i))[1]
                )
            out["completion"] = completion
        return out

    out_features: dict[str, Any] = {"prompt": _turns_feature(False)}
    if has_completion:
        out_features["completion"] = _turns_feature(False) if target == "lm" else Value("string")
    return fn, ["prompt", "completion"], out_features


def _text_rows(ds: Any, fmt: str, names: list[str], roles: Roles, system: str | None, where: str, target: str) -> Plan:
    return None


def _to_vision(ds: Any, fmt: str, names: list[str], roles: Roles, system: str | None, where: str, target: str) -> Plan:
    """images + messages rows: passed through; ShareGPT turns (or `<image>` marks in text turns) become TRL's
    structured turns, each `<image>` one {"type": "image"} part, or the images before the first user turn's
    text when no turn marks them."""
    from datasets import List, Value

    rows = first_rows(ds, 4)
    column = "conversations" if "conversations" in names else "messages"
    sharegpt = column == "conversations" or _turn_style(rows, column) == "sharegpt"
    marked = any(
        isinstance(t, dict) and IMAGE_MARK in str(t.get("content") or t.get("value") or "")
        for r in rows
        for t in r.get(column) or []
    )
    if not (sharegpt or marked or system is not None or roles.changes()):
        return None
    image_column = "images" if "images" in names else "image"

    def parts(text: str, images: int, first_user: bool) -> list[dict]:
        pieces = text.split(IMAGE_MARK)
        out: list[dict] = []
        if first_user and images:
            out += [{"type": "image", "text": None}] * images
        for k, piece in enumerate(pieces):
            if k:
                out.append({"type": "image", "text": None})
            if piece.strip():
                out.append({"type": "text", "text": piece})
        return out

    def fn(row: dict, i: int) -> dict:
        raw = row[column]
        turns = _sharegpt_turns(raw, roles, where, i) if sharegpt else _message_turns(raw, roles, where, i)
        if sharegpt and row.get("system"):
            turns = _with_system(turns, str(row["system"]))
        turns = _with_system(turns, system)
        images = row[image_column]
        count = len(images) if isinstance(images, list) else int(images is not None)
        marks = sum(str(t["content"]).count(IMAGE_MARK) for t in turns)
        first = next((k for k, t in enumerate(turns) if t["role"] == "user"), None)
        out = []
        for k, t in enumerate(turns):
            before = count if (marks == 0 and k == first) else 0
            out.append({"role": t["role"], "content": parts(t["content"], before, k == first)})
        return {"messages": out}

    part = {"type": Value("string"), "text": Value("string")}
    turn = {"role": Value("string"), "content": List(part)}
    drop = [c for c in (column, "system") if c in names and (c != "system" or sharegpt)]
    return fn, drop, {"messages": List(turn)}


_CONVERTERS: dict[tuple[str, str], Callable[..., Plan]] = {
    ("text", "*"): _text_rows,
    ("messages", "lm"): _to_messages,
    ("sharegpt", "lm"): _to_messages,
    ("alpaca", "lm"): _to_messages,
    ("messages", "prompt"): _to_prompts,
    ("sharegpt", "prompt"): _to_prompts,
    ("alpaca", "prompt"): _to_prompts,
    ("messages", "eval"): _to_prompts,
    ("sharegpt", "eval"): _to_prompts,
    ("alpaca", "eval"): _to_prompts,
    ("prompt_completion", "*"): _prompt_completion,
    ("preference", "*"): _to_preference,
    ("kto", "*"): _to_kto,
    ("vision", "*"): _to_vision,
}
