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

A chat template is a program (Jinja): nested loops can run for hours and `'x' * 10**10` fills the
memory. `render` runs every template (the recipe's and the tokenizers' own) in a bounded sandbox:
transformers' own ImmutableSandboxedEnvironment, with a deadline (RENDER_SECONDS) checked on every
attribute access, call, operator and `range` step (plus a CPU-time alarm on the main thread for
bare loops), and a cap (RENDER_CHARS) on the rendered text and on any string, list or width an
operation would build. A template over either bound is one line naming it, exit code 2.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.models.spec import stage_model
from tunelab.models.tokenizers import load_tokenizer

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


def template_turns(turns: list[Any]) -> list[Any]:
    """Turns as chat templates read them: without the None members Arrow gives turns that lack a key (a
    `tool_calls: None` on a user turn), content None as "", and tool calls' arguments as mappings
    (transformers' convention; datasets stores them as JSON strings, as OpenAI does)."""
    import json

    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            out.append(turn)
            continue
        clean = {k: v for k, v in turn.items() if v is not None}
        if "content" in turn and turn["content"] is None:
            clean["content"] = ""
        if isinstance(clean.get("content"), list):
            clean["content"] = [
                {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part
                for part in clean["content"]
            ]
        if clean.get("tool_calls"):
            calls = []
            for call in clean["tool_calls"]:
                call = {k: v for k, v in call.items() if v is not None} if isinstance(call, dict) else call
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    with contextlib.suppress(ValueError):  # not JSON: the template gets the text
                        call = {**call, "function": {**function, "arguments": json.loads(function["arguments"])}}
                calls.append(call)
            clean["tool_calls"] = calls
        out.append(clean)
    return out


def row_tools(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A row's tool schemas for the template (`tools` holds them as a JSON string, or as a list)."""
    import json

    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            return None
    return tools or None


def render(tokenizer: Any, turns: list[dict[str, Any]], where: str, row: int | None = None, **kwargs: Any) -> str:
    """The template's text for `turns` (a generation prompt at the end unless told otherwise), rendered
    within RENDER_SECONDS and RENDER_CHARS (see the module's docstring). `tools=` (a list of schemas)
    reaches templates that render tools."""
    kwargs.setdefault("add_generation_prompt", True)
    if kwargs.get("tools") is None:
        kwargs.pop("tools", None)
    at = f" on row {row}" if row is not None else ""
    try:
        with bounded(f"'{where}': the chat template", at):
            text = tokenizer.apply_chat_template(template_turns(turns), tokenize=False, **kwargs)
    except TunelabError:
        raise
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


# --- bounded rendering ----------------------------------------------------------------------------

RENDER_SECONDS = 5.0
"""The longest one rendering may take: real templates render a conversation in milliseconds."""
RENDER_CHARS = 8_000_000
"""The most characters one rendering (or one string, list or width inside it) may hold: ~2M tokens,
more than any model's context."""


class TemplateBudget(TunelabError):
    """A chat template ran past RENDER_SECONDS or built more than RENDER_CHARS."""


class _Budget:
    def __init__(self, what: str, at: str, seconds: float, chars: int) -> None:
        self.what, self.at, self.chars = what, at, chars
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def too_slow(self) -> TemplateBudget:
        return TemplateBudget(
            f"{self.what} took longer than {self.seconds:g} s to render{self.at}: it loops too much; "
            "simplify the template"
        )

    def too_big(self, size: int) -> TemplateBudget:
        return TemplateBudget(
            f"{self.what} rendered more than {self.chars} characters{self.at} (asked for {size}): "
            "it builds far more text than a prompt; simplify the template"
        )


_state = threading.local()


def _budget() -> _Budget | None:
    return getattr(_state, "budget", None)


def _tick() -> None:
    """Called on every step the sandbox sees: the deadline, checked."""
    budget = _budget()
    if budget is not None and time.monotonic() > budget.deadline:
        raise budget.too_slow()


def _size(size: int) -> None:
    budget = _budget()
    if budget is not None and size > budget.chars:
        raise budget.too_big(size)


def _sequence_size(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


_WIDTH = re.compile(r"\d{8,}")  # a width or precision of 8+ digits in a format string


class _Range:
    """`range()` inside templates: the sandbox's bound on one range, and a deadline check per step, so nested
    loops (10**5 x 10**5 steps) stop at the deadline."""

    def __init__(self, *args: Any) -> None:
        from jinja2.sandbox import safe_range

        self.inner = safe_range(*args)

    def __iter__(self) -> Iterator[int]:
        for i in self.inner:
            _tick()
            yield i

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: Any) -> Any:
        return self.inner[index]

    def __contains__(self, value: Any) -> bool:
        return value in self.inner

    def __reversed__(self) -> Iterator[int]:
        for i in reversed(self.inner):
            _tick()
            yield i


def _check_counts(args: tuple, kwargs: dict[str, Any]) -> None:
    """A width, count or repeat argument past RENDER_CHARS (`center(10**10)`, `'x'.ljust(10**10)`)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool):
            _size(abs(value))


def _check_format(text: Any) -> None:
    """A format string with a width or precision past RENDER_CHARS (`'%9999999999s'`, `'{:>9999999999}'`)."""
    if isinstance(text, str) and ("{" in text or "%" in text) and (width := _WIDTH.search(text)):
        _size(int(width.group()))


def _check_growth(name: str, args: tuple) -> None:
    """`replace` and `join` can build len(a) x len(b) characters from two strings under the cap: their size,
    computed before they run. `args` as the filter gets them (the string or items first)."""
    if name == "replace" and len(args) >= 3 and all(isinstance(a, str) for a in args[:3]):
        text, old, new = args[:3]
        count = text.count(old) if old else len(text) + 1
        _size(len(text) + count * max(len(new) - len(old), 0))
    elif name == "join" and len(args) >= 2 and isinstance(args[1], str):
        items = args[0]
        if hasattr(items, "__len__"):
            _size(len(items) * len(args[1]))


def _bounded_filter(func: Any) -> Any:
    import functools

    from jinja2 import Environment
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context

    name = getattr(func, "__name__", "").removeprefix("do_").removeprefix("sync_do_")

    @functools.wraps(func)  # keeps jinja's pass_context / pass_environment markers
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _tick()
        values = [a for a in args if not isinstance(a, (Environment, EvalContext, Context))]
        # The filtered value comes first: only the filter's own arguments are counts (the value is the data's)
        _check_counts(tuple(values[1:]), kwargs)
        if name == "format" and values:
            _check_format(values[0])
        _check_growth(name, tuple(values))
        out = func(*args, **kwargs)
        size = _sequence_size(out)
        if size is not None:
            _size(size)
        return out

    return wrapped


def _environment_class() -> type:
    """transformers' ImmutableSandboxedEnvironment, with the budget's checks on every operation it intercepts."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.globals["range"] = _Range
            self.filters = _BoundedFilters(self.filters)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _tick()
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if _sequence_size(seq) is not None and isinstance(n, int):
                        _size(_sequence_size(seq) * max(n, 0))
            elif operator == "+":
                a, b = _sequence_size(left), _sequence_size(right)
                if a is not None and b is not None:
                    _size(a + b)
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                _size(right * abs(left).bit_length() // 3)  # about the digits of the result
            elif operator == "%" and isinstance(left, str):
                _check_format(left)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's
            _tick()
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):  # a str method: ljust(10**10), replace, join
                _check_counts(args, kwargs)
                name = getattr(__obj, "__name__", "")
                if name == "replace":
                    _check_growth(name, (owner, *args))
                elif name == "join" and args:
                    _check_growth(name, (args[0], owner))
            out = super().call(__context, __obj, *args, **kwargs)
            size = _sequence_size(out)
            if size is not None:
                _size(size)
            return out

        def getattr(self, obj: Any, attribute: str) -> Any:
            _tick()
            if isinstance(obj, str) and attribute in ("format", "format_map"):  # the sandbox wraps these
                _check_format(obj)
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _tick()
            return super().getitem(obj, argument)

        @staticmethod
        def concat(parts: Any) -> str:  # type: ignore[override]
            """Template.render's join of the output, counted as it grows."""
            out, total = [], 0
            for part in parts:
                _tick()
                total += len(part)
                _size(total)
                out.append(part)
            return "".join(out)

    return Bounded


class _BoundedFilters(dict):
    """The environment's filters, each wrapped as it is looked up (transformers adds `tojson` after building
    the environment)."""

    def __getitem__(self, name: str) -> Any:
        return _bounded_filter(super().__getitem__(name))

    def get(self, name: str, default: Any = None) -> Any:
        return _bounded_filter(super().__getitem__(name)) if name in self else default


_compiled: dict[str, Any] = {}
_install_lock = threading.Lock()


def _install() -> bool:
    """Route transformers' template compilation through the bounded environment (once per process; the checks
    do nothing outside `bounded`). False when this transformers compiles templates differently: then only the
    SIGALRM backstop bounds the time."""
    try:
        from transformers.utils import chat_template_utils as ctu
    except ImportError:
        return False
    if getattr(ctu._compile_jinja_template, "tunelab_bounded", False):
        return True
    build = getattr(ctu, "_cached_compile_jinja_template", None)
    if build is None or not hasattr(ctu, "ImmutableSandboxedEnvironment"):
        return False
    environment = _environment_class()

    def compile_bounded(template: str) -> Any:
        found = _compiled.get(template)
        if found is None:
            with _install_lock:
                original = ctu.ImmutableSandboxedEnvironment
                ctu.ImmutableSandboxedEnvironment = environment
                try:
                    found = build(template)
                finally:
                    ctu.ImmutableSandboxedEnvironment = original
            if len(_compiled) > 64:
                _compiled.clear()
            _compiled[template] = found
        return found

    compile_bounded.tunelab_bounded = True  # type: ignore[attr-defined]
    with _install_lock:
        ctu._compile_jinja_template = compile_bounded
    return True


@contextmanager
def bounded(what: str, at: str = "", seconds: float | None = None, chars: int | None = None) -> Iterator[None]:
    """Template rendering inside the block is bounded in time and size; `what` and `at` name it in the error."""
    import signal

    _install()
    budget = _Budget(what, at, RENDER_SECONDS if seconds is None else seconds, RENDER_CHARS if chars is None else chars)
    outer, _state.budget = _budget(), budget
    # Bare loops (`{% for a in s %}{% for b in s %}`) call nothing the sandbox sees: a CPU-time alarm stops them.
    # ITIMER_VIRTUAL (SIGVTALRM), not ITIMER_REAL: a caller's own SIGALRM timeout stays untouched.
    backstop = (
        outer is None
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_VIRTUAL)[0] == 0
    )
    if backstop:

        def alarm(signum: int, frame: Any) -> None:
            raise budget.too_slow()

        previous = signal.signal(signal.SIGVTALRM, alarm)
        signal.setitimer(signal.ITIMER_VIRTUAL, budget.seconds + 1.0)
    try:
        yield
    finally:
        if backstop:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
            signal.signal(signal.SIGVTALRM, previous)
        _state.budget = outer


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
    tokenizer: Any, turns: list[dict[str, Any]], where: str, row: int = 0, tools: list[dict] | None = None
) -> tuple[list[int], list[int]]:
    """(input_ids, mask) of a conversation: 1 on the tokens of the assistants' content and end-of-turn token.

    An assistant's tool calls are its content too (the model learns to call); `tool` turns (the results)
    are not. `tools` are the schemas the template renders (usually in the system turn).

    Works for any template that renders earlier turns the same whatever follows them (prefix
    preservation, which chat inference relies on too); one that does not is refused in one line.
    """
    full, spans = _rendered(tokenizer, turns, where, row, tools)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), _mask(enc["offset_mapping"], spans)


def _rendered(
    tokenizer: Any, turns: list[dict[str, Any]], where: str, row: int, tools: list[dict] | None
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans the assistant turns add. One bound around the row's
    renders: each keeps its own deadline, and the CPU-time alarm is set once per row, not once per render."""
    with bounded(f"'{where}': the chat template", f" on row {row}"):
        full = render(tokenizer, turns, where, row, add_generation_prompt=False, tools=tools)
        return full, _assistant_spans(tokenizer, turns, full, where, row, tools)


def _mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap an assistant span."""
    return [int(any(s < stop and e > start for start, stop in spans)) for s, e in offsets]


def _assistant_spans(
    tokenizer: Any, turns: list[dict[str, Any]], full: str, where: str, row: int, tools: list[dict] | None
) -> list[tuple[int, int]]:
    """The character spans of `full` that each assistant turn adds (content and end-of-turn token)."""
    spans = []
    for i, turn in enumerate(turns):
        if turn.get("role") != "assistant":
            continue
        before = render(tokenizer, turns[:i], where, row, tools=tools) if i else ""
        last = i == len(turns) - 1  # the conversation through its last turn is `full` itself
        through = (
            full if last else render(tokenizer, turns[: i + 1], where, row, add_generation_prompt=False, tools=tools)
        )
        if not (full.startswith(before) and full.startswith(through) and through.startswith(before)):
            raise TunelabError(
                f"'{where}' row {row}: the chat template renders turn {i} differently once later turns follow "
                "(not prefix-preserving), so the assistant-only mask cannot be derived; set "
                "training.assistant_only_loss: false, or give `chat_template:` one with {% generation %} markers"
            )
        end = len(through.rstrip())  # the end-of-turn token, not the newline after it
        spans.append((len(before), max(end, len(before))))
    return spans


def tokenize_assistant_only(ds: Any, tokenizer: Any, where: str, masked: bool = True) -> Any:
    """`messages` rows (and their `tools`) as `input_ids` + `assistant_masks`, the pre-tokenized form TRL's
    SFTTrainer takes as is. With `masked=False`, `input_ids` only: every token trains."""

    def encode(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        texts, spans = zip(
            *(_rendered(tokenizer, r["messages"], where, i, row_tools(r)) for r, i in zip(rows, indices, strict=True)),
            strict=True,
        )
        # One tokenizer call per batch: the same ids as one call per row, a fraction of the time.
        enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        out = {"input_ids": [list(ids) for ids in enc["input_ids"]]}
        if masked:
            out["assistant_masks"] = [_mask(o, sp) for o, sp in zip(enc["offset_mapping"], spans, strict=True)]
        return out

    out = ds.map(encode, with_indices=True, batched=True, batch_size=256, remove_columns=ds.column_names)
    if not masked or not hasattr(out, "__len__"):  # a stream: its rows are encoded as training reads them
        return out
    empty = next((i for i, m in enumerate(out["assistant_masks"]) if 1 not in m), None)
    if empty is not None:
        raise TunelabError(f"'{where}' row {empty} has no assistant turn: assistant_only_loss leaves nothing to learn")
    return out


def check_rows(ds: Any, tokenizer: Any, where: str, assistant_only: bool, rows: int = 2) -> None:
    """What run does to the first rows of chat data, minus the training: render them, derive their masks."""
    for i in range(min(rows, len(ds))):
        example = ds[i]
        turns, tools = example["messages"], row_tools(example)
        check_conversation(turns, where, i)
        if assistant_only and (tools or not has_markers(tokenizer.chat_template)):
            _, mask = assistant_mask(tokenizer, turns, where, i, tools)
            if 1 not in mask:
                raise TunelabError(
                    f"'{where}' row {i} has no assistant turn: assistant_only_loss leaves nothing to learn"
                )
        else:
            render(tokenizer, turns, where, i, add_generation_prompt=False, tools=tools)


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


ANSWER_COLUMNS = ("completion", "chosen", "rejected")


def example_turns(row: dict[str, Any], columns: tuple[str, ...] | list[str], system: str | None) -> list[list[Any]]:
    """Row `row` as the conversations a trainer renders: the prompt (a string becomes a user turn after the
    system turn, as `conversational` makes it) followed by each answer column in turn (or alone)."""
    prompt = next((c for c in columns if c not in ANSWER_COLUMNS), None)
    head: list[Any] = []
    if prompt is not None and row.get(prompt) is not None:
        value = row[prompt]
        head = messages(value, system) if isinstance(value, str) else list(value)
    out = []
    for column in (c for c in columns if c in ANSWER_COLUMNS):
        value = row.get(column)
        if isinstance(value, str) and head:  # plain answers become chats only after a prompt (`conversational`)
            out.append(head + [{"role": "assistant", "content": value.strip()}])
        elif isinstance(value, list):
            out.append(head + value)
    return out or [head]


def check_example(tokenizer: Any, row: dict[str, Any], columns: Any, system: str | None, where: str) -> None:
    """Render the first row through the template as the trainer will (bounded: see `render`), so a template
    that fails, loops or explodes is one line at validate, not an error after the model has loaded."""
    for turns in example_turns(row, columns, system):
        if turns:
            last = turns[-1]
            final = isinstance(last, dict) and last.get("role") == "assistant"
            render(tokenizer, turns, where, 0, add_generation_prompt=not final)


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
