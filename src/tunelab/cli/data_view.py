"""`tunelab data`'s terminal output: a `DataView` (tunelab.data.preview) drawn with rich.

Trained (or answer) tokens are highlighted; tokens `max_length` cuts are struck through. Without colour (a
pipe, a log file, CliRunner) the same marks are written as text: [[trained]] and ~~cut~~.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.preview import DataView, Lengths, visible

TRAINED = "bold black on green3"
CUT = "strike dim"
PLAIN = "dim"
BAR = 40


def render(view: DataView, console: Any) -> None:
    """Print the whole view: sources, lengths and histogram, the rows with their marks, contamination."""
    from rich.text import Text

    colour = console.color_system is not None
    console.print(Text(f"stage {view.stage} ({view.kind})", style="bold"))
    for line in view.source_lines():
        console.print(Text(line))
    t = view.tokens
    if t is None:
        if view.no_tokens:
            console.print(Text(f"tokens: not shown: {view.no_tokens}"))
    else:
        console.print(Text(t.shown))
        for line in view.length_lines():
            console.print(Text(line))
        console.print(Text(t.rule))
        for x in t.lengths:
            for line in histogram(x):
                console.print(Text(line))
        for note in t.notes:
            console.print(Text(f"note: {note}", style="yellow"))
        if any(flag for row in t.rows for seq in row.sequences for _, flag in seq.pieces):
            legend = Text(f"\nthe first {len(t.rows)} rows: ")
            if colour:
                legend.append(t.marked, style=TRAINED).append(", not ").append("cut by max_length", style=CUT)
            else:
                legend.append(f"[[{t.marked}]], not, ~~cut by max_length~~")
            console.print(legend)
        for row in t.rows:
            head = f"-- row {row.index}" + (f" ({'; '.join(row.notes)})" if row.notes else "")
            console.print(Text(head, style="bold"))
            for seq in row.sequences:
                if len(row.sequences) > 1 or seq.name != "input":
                    console.print(Text(f"{seq.name}: {seq.tokens} tokens, {seq.marked} {t.marked}", style="italic"))
                console.print(marked_text(seq.pieces, colour))
    if view.raw:
        console.print(Text(f"\nthe first {len(view.raw)} rows, as read:"))
        for i, row in enumerate(view.raw):
            console.print(Text(f"-- row {i}: {visible(repr(row))}"))
    lines = view.contamination_lines()
    if lines:
        console.print()
    for line in lines:
        console.print(Text(line, style="red" if line.startswith("  exact") or "normalised:" in line else ""))


def marked_text(pieces: list[tuple[str, int]], colour: bool) -> Any:
    """The pieces as one rich Text: runs of marked tokens highlighted (or [[bracketed]] without colour)."""
    from rich.text import Text

    out = Text()
    runs: list[tuple[int, str]] = []
    for text, flag in pieces:
        if runs and runs[-1][0] == flag:
            runs[-1] = (flag, runs[-1][1] + text)
        else:
            runs.append((flag, text))
    for flag, text in runs:
        text = visible(text)
        if colour:
            out.append(text, style={1: TRAINED, 0: PLAIN, -1: CUT}[flag])
        else:
            out.append({1: f"[[{text}]]", 0: text, -1: f"~~{text}~~"}[flag])
    return out


def histogram(x: Lengths) -> list[str]:
    """A text histogram of token lengths: one line per bin."""
    top = max((c for _, _, c in x.histogram), default=0) or 1
    spans = [f"{lo}" if hi - 1 == lo else f"{lo}-{hi - 1}" for lo, hi, _ in x.histogram]
    pad = max(len(s) for s in spans) if spans else 0
    return [f"  {x.name} tokens per row:"] + [
        f"  {span:>{pad}} {'#' * max(1 if c else 0, round(BAR * c / top)):<{BAR}} {c}"
        for span, (_, _, c) in zip(spans, x.histogram, strict=True)
    ]
