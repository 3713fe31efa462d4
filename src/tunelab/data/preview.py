"""What `tunelab data` shows: a stage's data as its trainer will see it, as plain structures.

The stage's own steps produce the numbers (`TrainerStage.data_view`, its `tokens` hook over the trainer's own
tokenization in `tunelab.training.tokenized`); this module holds what they produce and what is computed from
the rows alone, so the CLI, the Python API, `tunelab validate` and the run's report all render one result:

- `Tokens`: token lengths per sequence (p50/p95/max, a histogram), the rows `max_length` truncates, the rows
  left without a trained token, and the first rows as pieces of text marked trained or not;
- `Contamination`: held-out rows (an `eval_data`, a later eval stage's data) that also appear in the training
  data, compared by exact text and by normalised text (lowercase, whitespace collapsed, punctuation dropped);
- `DataView`: the whole view of one stage, with `summary_lines` (validate, report.md), `as_dict` (data.json)
  and `to_html` (a self-contained page).

Nothing here imports torch or datasets at import time.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

EXAMPLES = 5
"""Contaminated rows shown per kind of match."""
SHOWN_CHARS = 160
"""Characters of a row's text shown in a contamination example."""


# --- lengths -------------------------------------------------------------------------------------------------
@dataclass
class Lengths:
    """Token lengths of one kind of sequence (`input`, `chosen`, `prompt`, ...) over every row, before truncation."""

    name: str
    rows: int
    p50: int
    p95: int
    max: int
    mean: float
    histogram: list[tuple[int, int, int]]
    """(low, high, rows) bins: rows whose length is in [low, high)."""

    @classmethod
    def of(cls, name: str, lengths: list[int], bins: int = 10) -> Lengths:
        values = sorted(lengths)
        if not values:
            return cls(name, 0, 0, 0, 0, 0.0, [])
        low, top = values[0], values[-1]
        width = max(1, -(-(top - low + 1) // bins))  # ceil: the longest row falls in the last bin
        counts = [0] * bins
        for v in values:
            counts[min((v - low) // width, bins - 1)] += 1
        edges = [(low + i * width, low + (i + 1) * width) for i in range(bins)]
        histogram = [(lo, hi, c) for (lo, hi), c in zip(edges, counts, strict=True) if lo <= top]
        return cls(
            name, len(values), _rank(values, 0.50), _rank(values, 0.95), top, sum(values) / len(values), histogram
        )


def _rank(sorted_values: list[int], q: float) -> int:
    """The nearest-rank percentile: the smallest value with at least q of the rows at or below it."""
    index = max(0, -(-int(q * 1000) * len(sorted_values) // 1000) - 1)
    return sorted_values[min(index, len(sorted_values) - 1)]


# --- the tokens of a row -------------------------------------------------------------------------------------
@dataclass
class Sequence:
    """One tokenized sequence of a row, as pieces of text each marked (1) or not (0)."""

    name: str
    pieces: list[tuple[str, int]]
    tokens: int
    marked: int
    kept: int
    """Tokens left once the trainer's `max_length` rule applies (== tokens when nothing is cut)."""


@dataclass
class RowTokens:
    index: int
    sequences: list[Sequence]
    notes: list[str] = field(default_factory=list)
    """What the trainer does to this row: truncated, dropped."""


@dataclass
class Tokens:
    """What a stage's tokenization makes of its training rows: lengths, what `max_length` does, the first rows."""

    shown: str
    """What the view shows, e.g. "SFTTrainer's tokens; loss on the completion (completion_only_loss)"."""
    marked: str
    """What a marked token is: "trained" (carries loss) or "answer" (after the prompt)."""
    rule: str
    """What the trainer does with rows past `max_length` and rows without a trained token."""
    max_length: int | None
    lengths: list[Lengths]
    truncated: int = 0
    """Rows `max_length` cuts."""
    cut_tokens: int = 0
    no_trained: int = 0
    """Rows left with no trained token once the rule applies (TRL drops some, trains on others as zero loss)."""
    dropped: int = 0
    """Rows the trainer drops (too long, or left without a trained token)."""
    trained_tokens: int = 0
    """Marked tokens kept in all, over every row."""
    rows: list[RowTokens] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    limited: bool = True
    """Whether `max_length` and trained tokens apply to these rows (False: prompts an online trainer answers)."""


class TokenCounter:
    """Accumulates the per-row figures of `Tokens` while a stage's tokenization streams through its rows."""

    def __init__(self, names: Iterable[str]) -> None:
        self.lengths: dict[str, list[int]] = {name: [] for name in names}
        self.truncated = self.cut_tokens = self.no_trained = self.dropped = self.trained_tokens = 0

    def add(self, lengths: dict[str, int], cut: int, trained: int, dropped: bool) -> None:
        """One row: its sequences' lengths, the tokens `max_length` cuts, the marked tokens kept, dropped or not."""
        for name, n in lengths.items():
            self.lengths[name].append(n)
        if cut:
            self.truncated += 1
            self.cut_tokens += cut
        if not trained:
            self.no_trained += 1
        if dropped:
            self.dropped += 1
        self.trained_tokens += trained

    def tokens(self, **fields: Any) -> Tokens:
        return Tokens(
            lengths=[Lengths.of(name, values) for name, values in self.lengths.items()],
            truncated=self.truncated,
            cut_tokens=self.cut_tokens,
            no_trained=self.no_trained,
            dropped=self.dropped,
            trained_tokens=self.trained_tokens,
            **fields,
        )


def pieces(tokenizer: Any, ids: list[int], mask: list[int], kept: int | None = None) -> list[tuple[str, int]]:
    """`ids` as text pieces, one per token (or per few tokens where a character spans them), each with its
    mark; tokens past `kept` (cut by `max_length`) are marked -1."""
    out: list[tuple[str, int]] = []
    start = 0
    kept = len(ids) if kept is None else kept
    while start < len(ids):
        end = start + 1
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        # A character split over several byte-level tokens decodes whole only with all of them.
        while text.endswith("\ufffd") and end < len(ids) and end - start < 4:
            end += 1
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        flag = -1 if start >= kept else int(any(mask[start:end]))
        out.append((text, flag))
        start = end
    return out


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def visible(text: str) -> str:
    """Text safe to show: control characters (a terminal's escape sequences, carriage returns) written as
    escapes, so that data cannot move the cursor or recolour the terminal; newlines and tabs stay."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


# --- the text of a row, for contamination --------------------------------------------------------------------
def _content(value: Any) -> str:
    """A turn's content as text (structured content: its text parts)."""
    if isinstance(value, list):
        return "\n".join(str(p.get("text") or "") for p in value if isinstance(p, dict) and p.get("type") == "text")
    return "" if value is None else str(value)


def _turns_text(turns: Any, roles: tuple[str, ...]) -> list[str]:
    if not isinstance(turns, list):
        return []
    out = []
    for turn in turns:
        if isinstance(turn, dict):
            role = turn.get("role", turn.get("from"))
            if role in roles:
                out.append(_content(turn.get("content", turn.get("value"))))
    return out


USER_ROLES = ("user", "human")


def row_keys(row: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(the row's question, every text of it a held-out question could equal).

    The question is what a model is asked: the user turns of a chat, the prompt, an Alpaca instruction and
    input; for plain text, the text itself. A training row offers its question, each of its user turns, and
    its text: a held-out question found as any of them was seen in training.
    """
    keys: list[str] = []
    question: str | None = None
    if isinstance(row.get("messages"), list) or isinstance(row.get("conversations"), list):
        users = _turns_text(row.get("messages") or row.get("conversations"), USER_ROLES)
        question = "\n".join(users)
        keys += users
    elif "prompt" in row:
        value = row["prompt"]
        users = _turns_text(value, USER_ROLES) if isinstance(value, list) else [_content(value)]
        question = "\n".join(users)
        keys += users
    elif "instruction" in row:
        question = "\n".join(s for s in (_content(row.get("instruction")), _content(row.get("input"))) if s)
    elif isinstance(row.get("text"), str):
        question = row["text"]
    if question is not None:
        keys.append(question)
    return question, [k for k in dict.fromkeys(keys) if k.strip()]


class _Punctuation(dict):
    """`str.translate` table dropping every Unicode punctuation character (computed per character, once)."""

    def __missing__(self, code: int) -> int | None:
        value = None if unicodedata.category(chr(code)).startswith("P") else code
        self[code] = value
        return value


_PUNCTUATION = _Punctuation()
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: "Mia has 3 pens." == "mia has 3 pens"."""
    return _SPACE.sub(" ", text.casefold().translate(_PUNCTUATION)).strip()


@dataclass
class Match:
    held_out: str
    """Where the held-out row is: 'stages.eval.data'."""
    row: int
    train_row: int
    text: str
    how: str
    """"exact" or "normalised"."""


@dataclass
class HeldOutCount:
    where: str
    rows: int
    exact: int
    normalised: int
    """Rows matching once normalised (the exact matches included)."""


@dataclass
class Contamination:
    """Held-out rows whose question also appears in the training data."""

    sources: list[HeldOutCount]
    examples: list[Match]
    notes: list[str] = field(default_factory=list)

    @property
    def exact(self) -> int:
        return sum(s.exact for s in self.sources)

    @property
    def normalised(self) -> int:
        return sum(s.normalised for s in self.sources)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sources)


def contamination(train: Any, held_out: list[tuple[str, Any]], notes: Iterable[str] = ()) -> Contamination:
    """Compare each held-out row's question with every text a training row offers (see `row_keys`), exactly
    (surrounding whitespace aside) and normalised. `train` and each held-out rows: a `datasets.Dataset` or
    a list of dicts; rows None: not compared, and a note says so."""
    exact: dict[str, int] = {}
    loose: dict[str, int] = {}
    for i, row in enumerate(iter_rows(train)):
        for key in row_keys(row)[1]:
            exact.setdefault(key.strip(), i)
            loose.setdefault(normalise(key), i)
    counts, examples = [], []
    shown = {"exact": 0, "normalised": 0}
    notes = list(notes)
    for where, rows in held_out:
        if rows is None:  # a stage whose held-out rows tunelab cannot read (lm_eval's tasks)
            notes.append(f"{where}: not compared (its documents come from lm-evaluation-harness)")
            continue
        n = hits = near = 0
        for j, row in enumerate(iter_rows(rows)):
            n += 1
            question = row_keys(row)[0]
            if not question or not question.strip():
                continue
            found, how = exact.get(question.strip()), "exact"
            if found is None and normalise(question):
                found, how = loose.get(normalise(question)), "normalised"
            if found is None:
                continue
            near += 1
            hits += how == "exact"
            if shown[how] < EXAMPLES:
                shown[how] += 1
                examples.append(Match(where, j, found, _short(question), how))
        counts.append(HeldOutCount(where, n, hits, near))
    return Contamination(counts, examples, notes)


def _short(text: str, limit: int = SHOWN_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- the view of a stage -------------------------------------------------------------------------------------
@dataclass
class Source:
    """One source of the training data: where it is, its format and how that was known, its rows."""

    index: int
    where: str
    path: str
    format: str
    detected_from: str
    rows: int | None


@dataclass
class DataView:
    """A training stage's data as its trainer will see it (`tunelab data`, `tunelab.data_preview`)."""

    stage: str
    kind: str
    sources: list[Source]
    rows: int | None
    """Rows of the training data (the mixture's, with several sources)."""
    mix: str | None = None
    eval_rows: int | None = None
    tokens: Tokens | None = None
    no_tokens: str | None = None
    """Why there is no token view (an earlier stage makes the tokenizer, a stage kind without one)."""
    contamination: Contamination | None = None
    raw: list[dict[str, Any]] = field(default_factory=list)
    """The first rows as the stage reads them, when there is no token view to show them."""
    measured: int | None = None
    """The figures are over the first `measured` rows only: a stream's, or a large dataset's in a run's summary."""

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON: `data.json` in a stage's folder, and what the API's callers may serialise."""
        out = asdict(self)
        if self.contamination is not None:
            out["contamination"].update(
                exact=self.contamination.exact, normalised=self.contamination.normalised, rows=self.contamination.rows
            )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataView:
        """The view back from `as_dict` (report.md reads a run's data.json)."""
        tokens = data.get("tokens")
        if tokens is not None:
            rows = [
                RowTokens(
                    r["index"],
                    [Sequence(**{**s, "pieces": [tuple(p) for p in s["pieces"]]}) for s in r["sequences"]],
                    r.get("notes", []),
                )
                for r in tokens.get("rows", [])
            ]
            lengths = [Lengths(**{**x, "histogram": [tuple(b) for b in x["histogram"]]}) for x in tokens["lengths"]]
            tokens = Tokens(**{**tokens, "rows": rows, "lengths": lengths})
        found = data.get("contamination")
        if found is not None:
            found = Contamination(
                [HeldOutCount(**s) for s in found["sources"]],
                [Match(**m) for m in found["examples"]],
                found.get("notes", []),
            )
        return cls(
            **{
                **{k: v for k, v in data.items() if k in {f for f in cls.__dataclass_fields__}},
                "sources": [Source(**s) for s in data["sources"]],
                "tokens": tokens,
                "contamination": found,
            }
        )

    # --- text -------------------------------------------------------------------------------------------------
    def source_lines(self) -> list[str]:
        lines = []
        total = f"{self.rows} rows" if self.rows is not None else "rows unknown (streaming)"
        if len(self.sources) > 1:
            lines.append(f"training data: {total} from {len(self.sources)} sources (mix: {self.mix or 'concat'})")
        for s in self.sources:
            rows = f"{s.rows} rows" if s.rows is not None else "streaming"
            head = f"  [{s.index}] " if len(self.sources) > 1 else "training data: "
            lines.append(f"{head}{s.path}: {s.format} ({s.detected_from}), {rows}")
        if self.eval_rows is not None:
            lines.append(f"eval_data: {self.eval_rows} rows")
        if self.measured is not None:
            lines.append(f"lengths and contamination over the first {self.measured} rows")
        return lines

    def length_lines(self) -> list[str]:
        t = self.tokens
        if t is None:
            return [f"tokens: not shown: {self.no_tokens}"] if self.no_tokens else []
        lines = [
            f"tokens ({x.name}): p50 {x.p50}, p95 {x.p95}, max {x.max}, mean {x.mean:.1f} over {x.rows} rows"
            for x in t.lengths
        ]
        if t.limited:
            limit = f"max_length {t.max_length}" if t.max_length is not None else "no max_length"
            lines.append(
                f"{limit}: {t.truncated} rows truncated ({t.cut_tokens} tokens cut), {t.no_trained} rows with no "
                f"{t.marked} token, {t.dropped} rows dropped by the trainer"
            )
        return lines

    def contamination_lines(self, examples: bool = True) -> list[str]:
        c = self.contamination
        if c is None:
            return []
        if not c.sources:
            return ["contamination: no held-out rows compared"] + [f"  note: {n}" for n in c.notes]
        lines = []
        for s in c.sources:
            lines.append(
                f"contamination: {s.normalised} of {s.rows} rows of {s.where} appear in the training data "
                f"({s.exact} exact, {s.normalised - s.exact} more once normalised)"
            )
        if examples:
            for m in c.examples:
                lines.append(
                    f"  {m.how}: {m.held_out} row {m.row} = training row {m.train_row}: {visible(repr(m.text))}"
                )
        lines += [f"  note: {n}" for n in c.notes]
        return lines

    def summary_line(self) -> str:
        """The summary in one line, starting `data STAGE:`: `tunelab validate` prints one per training stage."""
        parts = []
        formats = ", ".join(dict.fromkeys(s.format for s in self.sources))
        rows = f"{self.rows} rows" if self.rows is not None else "streaming"
        parts.append(f"{rows}, {formats}" + (f" from {len(self.sources)} sources" if len(self.sources) > 1 else ""))
        t = self.tokens
        if t is not None:
            x = t.lengths[1] if len(t.lengths) > 1 and t.lengths[0].name == "prompt" else t.lengths[0]  # a sequence
            parts.append(f"{x.name} tokens p50 {x.p50}, p95 {x.p95}, max {x.max}")
            limit = f"max_length {t.max_length}" if t.max_length is not None else "no max_length"
            if t.limited:
                parts.append(
                    f"{limit}: {t.truncated} truncated, {t.no_trained} without a {t.marked} token, {t.dropped} dropped"
                )
        elif self.no_tokens:
            parts.append("tokens: `tunelab data` once the tokenizer exists")
        c = self.contamination
        if c is not None and c.sources:
            parts.append(f"contamination: {c.normalised} of {c.rows} held-out rows ({c.exact} exact)")
        return f"data {self.stage}: " + "; ".join(parts)

    def summary_lines(self) -> list[str]:
        """The short summary in a few lines: report.md holds it."""
        lines = [f"data of '{self.stage}' ({self.kind}):"]
        lines += ["  " + line for line in self.source_lines()]
        lines += ["  " + line for line in self.length_lines()]
        if self.tokens is not None:
            lines.append(f"  {self.tokens.rule}")
        lines += ["  " + line for line in self.contamination_lines(examples=False)]
        return lines

    # --- html -------------------------------------------------------------------------------------------------
    def to_html(self) -> str:
        """A self-contained page (no scripts, no external files) of everything `tunelab data` prints."""
        e = html.escape
        body = [f"<h1>tunelab data: stage {e(self.stage)} ({e(self.kind)})</h1>", "<h2>Sources</h2><ul>"]
        body += [f"<li>{e(line.strip())}</li>" for line in self.source_lines()]
        body.append("</ul>")
        t = self.tokens
        if t is None:
            if self.no_tokens:
                body.append(f"<p>Tokens not shown: {e(self.no_tokens)}</p>")
        else:
            body += [
                "<h2>Lengths</h2>",
                f"<p>{e(t.shown)}</p>",
                "<ul>" + "".join(f"<li>{e(line)}</li>" for line in self.length_lines()) + "</ul>",
                f"<p>{e(t.rule)}</p>",
            ]
            for x in t.lengths:
                body.append(_html_histogram(x))
            body += [f"<p class=note>{e(n)}</p>" for n in t.notes]
            body.append(
                f"<h2>The first {len(t.rows)} rows</h2><p><span class=m1>{e(t.marked)}</span> "
                "<span class=m0>not</span> <span class=mx>cut by max_length</span></p>"
            )
            for row in t.rows:
                body.append(f"<h3>row {row.index}</h3>")
                body += [f"<p class=note>{e(n)}</p>" for n in row.notes]
                for s in row.sequences:
                    spans = "".join(f"<span class={_CLASS[flag]}>{e(visible(text))}</span>" for text, flag in s.pieces)
                    body.append(
                        f"<div class=seq><div class=name>{e(s.name)}: {s.tokens} tokens, {s.marked} {e(t.marked)}"
                        f"</div><pre>{spans}</pre></div>"
                    )
        if self.raw:
            body.append("<h2>The first rows</h2>")
            body += [f"<pre>{e(visible(repr(row)))}</pre>" for row in self.raw]
        if self.contamination is not None:
            body.append("<h2>Contamination</h2><ul>")
            body += [f"<li>{e(line.strip())}</li>" for line in self.contamination_lines()]
            body.append("</ul>")
        return _PAGE.format(title=e(f"tunelab data: {self.stage}"), body="\n".join(body))


HTML_MARK = "<!-- written by tunelab data -->"
"""On the page's second line: `tunelab data --html` replaces a file only when it holds it there."""


_CLASS = {1: "m1", 0: "m0", -1: "mx"}
_PAGE = """<!doctype html>
<!-- written by tunelab data -->
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }}
pre {{ white-space: pre-wrap; word-break: break-word; background: #f6f6f6; padding: .6em; }}
span {{ border-right: 1px solid #e4e4e4; }}
.m1 {{ background: #b7f0b1; }}
.m0 {{ color: #666; }}
.mx {{ color: #999; text-decoration: line-through; }}
.name {{ font-weight: bold; margin-top: .6em; }}
.note {{ color: #8a5a00; }}
table.h td {{ padding: 0 .5em; }} .bar {{ background: #5b8def; height: .8em; }}
</style></head>
<body>
{body}
</body></html>
"""


def _html_histogram(x: Lengths) -> str:
    top = max((c for _, _, c in x.histogram), default=0) or 1
    rows = "".join(
        f"<tr><td>{lo}-{hi - 1}</td><td>{c}</td>"
        f"<td><div class=bar style='width:{round(300 * c / top)}px'></div></td></tr>"
        for lo, hi, c in x.histogram
    )
    return f"<p>{html.escape(x.name)} tokens per row</p><table class=h>{rows}</table>"


KEY_COLUMNS = ("messages", "conversations", "prompt", "instruction", "input", "text")
"""The columns `row_keys` reads."""


def iter_rows(ds: Any, size: int = 2000) -> Iterator[dict[str, Any]]:
    """The rows of a `datasets.Dataset` (or a list of dicts) with only the columns `row_keys` reads, read a
    batch at a time (a row at a time costs ~20x more)."""
    if isinstance(ds, list):
        yield from ds
        return
    columns = [c for c in KEY_COLUMNS if c in ds.column_names]
    if not columns:
        return
    part = ds.select_columns(columns)
    for start, stop in chunks(len(part), size):
        batch = part[start:stop]
        for values in zip(*batch.values(), strict=True):
            yield dict(zip(batch, values, strict=True))


STREAMED_ROWS = 10_000
"""Rows of a streamed dataset (`streaming: true`) the view reads: a stream has no end to measure up to."""
SUMMARY_ROWS = 100_000
"""Rows a run's data summary (data.json, report.md) measures: `tunelab data` measures every row."""


def head(ds: Any, limit: int | None = None) -> tuple[Any, int | None]:
    """The rows to measure, and how many when maybe not all: a streamed `IterableDataset` as a `datasets.Dataset`
    of its first STREAMED_ROWS (or `limit`) rows; a Dataset past `limit` rows as its first `limit`."""
    if ds is None:
        return None, None
    if hasattr(ds, "__len__"):
        return (ds, None) if limit is None or len(ds) <= limit else (ds.select(range(limit)), limit)
    from tunelab.data.mixtures import preview

    n = STREAMED_ROWS if limit is None else limit
    rows = preview(ds, n)
    return rows, (n if len(rows) == n else None)  # a stream shorter than n was read whole


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges covering n rows, `size` at a time."""
    for start in range(0, n, size):
        yield start, min(n, start + size)
