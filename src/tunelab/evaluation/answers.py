"""Answers and exact match, one implementation for every place that scores a generation: the eval
stage's metric and its predictions files, the image+text eval, and the RL reward functions.

The answer is the first group of `answer_pattern` (or its whole match), else the first non-empty
line. Exact match compares answers after the normalisation options of the Hub's `exact_match`.
"""

from __future__ import annotations

import re
import string


def answer(text: str, pattern: str | None = None) -> str:
    """The answer part of a generation: the first group of `pattern`, else its first non-empty line."""
    if pattern is not None:
        match = re.search(pattern, text)
        return (match.group(1) if match.groups() else match.group(0)).strip() if match else ""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def normalise(
    text: str,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
    regexes_to_ignore: list[str] | None = None,
) -> str:
    """Text as exact match compares it: `regexes_to_ignore` removed, then the options, then stripped."""
    for pattern in regexes_to_ignore or []:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if ignore_numbers:
        text = text.translate(str.maketrans("", "", string.digits))
    return text.strip()


def matches(prediction: str, reference: str, **options) -> bool:
    """Whether a prediction equals its reference after `normalise` with the same options."""
    return normalise(prediction, **options) == normalise(reference, **options)
