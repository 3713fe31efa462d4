"""Multiple choice by log-likelihood, the way lm-evaluation-harness scores MMLU-style tasks.

Each choice is scored by the log-probability the model gives its tokens after the prompt; `acc`
counts the examples whose most likely choice is the reference, `acc_norm` divides each score by
the choice's length in characters first (the harness's `acc_norm`), so long answers are not
punished for having more tokens. A choice is appended to the prompt as it is, as a completion is:
give it its leading space (" 21") where the text needs one.

Tokenization follows the harness: trailing spaces of the prompt move to the choice, the prompt
and prompt + choice are encoded whole, and the choice's tokens are those past the prompt's. So
tunelab's eval with `choices` and the harness's `multiple_choice` tasks agree (tests/test_harness.py).
"""

from __future__ import annotations

from typing import Any

from tunelab.core.errors import TunelabError


def check_choices(ds: Any, column: str, reference: str, where: str) -> None:
    """Every row holds a list of at least two strings, and a reference that names one of them."""
    rows = ds.select_columns([column, reference]).to_list()
    for i, row in enumerate(rows):
        choices = row[column]
        if not isinstance(choices, list) or len(choices) < 2:
            raise TunelabError(
                f"'{where}' row {i}: column '{column}' must hold a list of at least two choices, got {choices!r}"
            )
        kinds = {type(c).__name__ for c in choices}
        if kinds != {"str"}:
            raise TunelabError(
                f"'{where}' row {i}: column '{column}' holds {', '.join(sorted(kinds))} values (as read: a column "
                "whose rows mix numbers and text is read as numbers); every choice must be a string: write "
                "numbers as text, with the leading space a completion has"
            )
        gold(row[reference], choices, f"{where}' row {i}: '{reference}")


def gold(value: Any, choices: list[str], where: str) -> int:
    """The index of the right choice: the reference is an index, or the text of one choice."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(choices):
            raise TunelabError(f"'{where}' is {value}, not an index of the {len(choices)} choices")
        return value
    if isinstance(value, str):
        for i, choice in enumerate(choices):
            if value == choice or value.strip() == choice.strip():
                return i
        raise TunelabError(f"'{where}' is {value!r}, which is none of the choices {choices!r}")
    raise TunelabError(f"'{where}' is {value!r}: give the index of the right choice or its text")


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context belongs to the continuation (the harness's rule)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        return context[:-spaces], context[-spaces:] + continuation
    return context, continuation


def encode_pair(tokenizer: Any, context: str, continuation: str, templated: bool) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens): the whole encoded at once, split at the context's length."""
    context, continuation = split_pair(context, continuation)
    special = not templated  # a rendered chat template holds its special tokens already
    whole = tokenizer(context + continuation, add_special_tokens=special)["input_ids"]
    head = tokenizer(context, add_special_tokens=special)["input_ids"]
    if not head:  # nothing to condition on: the harness starts from BOS (else EOS)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [start], whole
    return head, whole[len(head) :]


def loglikelihoods(
    model: Any, tokenizer: Any, pairs: list[tuple[str, str]], batch_size: int, templated: bool = False
) -> list[float]:
    """Sum of log-probabilities of each continuation after its context, in batches sorted by length."""
    import torch

    encoded = [encode_pair(tokenizer, c, x, templated) for c, x in pairs]
    for (context, continuation), (_, tokens) in zip(pairs, encoded, strict=True):
        if not tokens:
            raise TunelabError(f"choice {continuation!r} after prompt {context[-40:]!r} encodes to no tokens")
    order = sorted(range(len(pairs)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = [(encoded[i][0] + encoded[i][1])[:-1] for i in idx]  # the last token predicts nothing
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        for j, row in enumerate(rows):
            ids[j, : len(row)] = torch.tensor(row)
        # Right padding under causal attention: no real position sees a pad, so no mask is needed (the
        # harness does the same), and attention keeps its fast causal kernel.
        with torch.no_grad():
            logits = model(input_ids=ids.to(model.device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for j, i in enumerate(idx):
            context, tokens = encoded[i]
            first = len(context) - 1  # the position whose logits predict the choice's first token
            span = logprobs[j, first : first + len(tokens)]
            target = torch.tensor(tokens, device=span.device)
            out[i] = float(span.gather(-1, target[:, None]).sum())
    return out


def score(scores: list[float], choices: list[str], answer: int) -> dict[str, Any]:
    """acc and acc_norm for one example, from its choices' log-likelihoods."""
    best = max(range(len(scores)), key=lambda k: scores[k])
    normed = [s / max(len(c), 1) for s, c in zip(scores, choices, strict=True)]
    best_norm = max(range(len(normed)), key=lambda k: normed[k])
    return {
        "prediction": best,
        "prediction_norm": best_norm,
        "acc": float(best == answer),
        "acc_norm": float(best_norm == answer),
    }


def evaluate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    choices: list[list[str]],
    golds: list[int],
    batch_size: int,
    templated: bool,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(acc, acc_norm and examples; one row per example) for prompts rendered as the model reads them."""
    pairs = [(p, c) for p, options in zip(prompts, choices, strict=True) for c in options]
    flat = loglikelihoods(model, tokenizer, pairs, batch_size, templated)
    rows, at = [], 0
    for prompt, options, answer in zip(prompts, choices, golds, strict=True):
        scores = flat[at : at + len(options)]
        at += len(options)
        rows.append(
            {
                "prompt": prompt,
                "choices": options,
                "logprobs": scores,
                "label": answer,
                **score(scores, options, answer),
            }
        )
    n = len(rows)
    metrics = {"acc": sum(r["acc"] for r in rows) / n, "acc_norm": sum(r["acc_norm"] for r in rows) / n}
    return {**metrics, "examples": n}, rows
