"""Reward functions for the `grpo` stage, in TRL's form: `f(completions, **columns) -> list[float]`.

A recipe names them as `module:function` (`tunelab.rewards:exact_match`), so a user's own
reward is a function in a module on the Python path (the current folder counts). TRL passes
every dataset column except prompt/completion as a keyword argument; the grpo stage hands the
reference answers over as `reference` (see its `reference_column`).
"""

from __future__ import annotations

import re
from typing import Any

from tunelab.evaluation.answers import answer, matches


def _text(completion: Any) -> str:
    """A completion's text: plain, or the last message of a conversational one."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def exact_match(completions: list[Any], reference: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when the answer (first non-empty line) equals the reference, else 0.0: the eval stage's exact match."""
    return [float(matches(answer(_text(c)), str(r))) for c, r in zip(completions, reference, strict=True)]


def numeric(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when the answer is a whole number: a format reward that helps a policy that rambles."""
    return [float(bool(re.fullmatch(r"-?\d+", answer(_text(c))))) for c in completions]


def close(completions: list[Any], reference: list[Any], **kwargs: Any) -> list[float]:
    """1 / (1 + |answer - reference|) for numeric answers, 0.0 otherwise: partial credit for near misses."""
    out = []
    for c, r in zip(completions, reference, strict=True):
        try:
            out.append(1.0 / (1.0 + abs(float(answer(_text(c))) - float(str(r).strip()))))
        except ValueError:
            out.append(0.0)
    return out
