"""The rows as TRL's trainers tokenize them, for `tunelab data`: token ids, which tokens carry loss, and what
`max_length` does to each row, without a model.

Each function follows one trainer's own dataset preparation step by step (TRL 1.x: `SFTTrainer._prepare_dataset`,
`DPOTrainer._prepare_dataset`, `RewardTrainer._prepare_dataset`, `GRPOTrainer._tokenize_prompts`) with TRL's own
helpers (`is_conversational`, `maybe_convert_to_chatml`, `extract_prompt`, the training chat template), but
tokenizes many rows per call instead of one `datasets.map` row at a time: the same ids, ~4x faster, so 100k
rows take seconds. tests/test_data_view.py holds each one equal to the trainer's own preparation, so a TRL
upgrade that changes it fails a test instead of this view drifting from what trains.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from tunelab.data.preview import RowTokens, Sequence, TokenCounter, Tokens, chunks, pieces

BATCH = 1000
"""Rows tokenized per call."""


def _encode(tokenizer: Any, inputs: list[Any], kwargs: list[dict[str, Any]], **common: Any) -> list[dict[str, Any]]:
    """trl's `_tokenize` (a string through the tokenizer, a chat through its template) over many inputs; rows
    with their own template arguments (`tools`, `chat_template_kwargs`) are rendered one at a time."""
    out: list[dict[str, Any] | None] = [None] * len(inputs)
    chats = [i for i, x in enumerate(inputs) if isinstance(x, list) and not kwargs[i]]
    texts = [i for i, x in enumerate(inputs) if not isinstance(x, list)]
    if chats:
        enc = tokenizer.apply_chat_template([inputs[i] for i in chats], tokenize=True, return_dict=True, **common)
        for j, i in enumerate(chats):
            out[i] = {k: enc[k][j] for k in enc if k in ("input_ids", "assistant_masks")}
    if texts:
        enc = tokenizer(text=[inputs[i] for i in texts])
        for j, i in enumerate(texts):
            out[i] = {"input_ids": enc["input_ids"][j]}
    for i, x in enumerate(inputs):
        if out[i] is None:  # a chat with its own tools or template arguments
            enc = tokenizer.apply_chat_template(x, tokenize=True, return_dict=True, **common, **kwargs[i])
            out[i] = {k: enc[k] for k in enc if k in ("input_ids", "assistant_masks")}
    return out  # type: ignore[return-value]


def _template_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    """The per-row arguments TRL passes to the chat template: `tools` (JSON text or a list) and
    `chat_template_kwargs`."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    extra = row.get("chat_template_kwargs") or {}
    return {**({"tools": tools} if tools is not None else {}), **extra}


def _rows(ds: Any, start: int, stop: int) -> list[dict[str, Any]]:
    batch = ds[start:stop]
    return [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]


def _slice(length: int, max_length: int | None, mode: str) -> slice:
    """The part of a sequence TRL keeps: `truncation_mode` keep_start or keep_end."""
    if max_length is None or length <= max_length:
        return slice(None)
    return slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)


# --- SFTTrainer (sft, pretrain) ------------------------------------------------------------------------------
def _sft_choices(ds: Any, tokenizer: Any, args: Any) -> tuple[bool, str | None, list[str]]:
    """What SFTTrainer.__init__ decides before preparing the data: completion-only loss, the training chat
    template for assistant-only loss, the EOS token; and notes on what this view cannot show."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    notes = []
    if args.eos_token is not None:
        tokenizer.eos_token = args.eos_token
    if args.chat_template_path is not None:
        path = str(args.chat_template_path)
        if path.endswith((".jinja", ".j2")):
            with open(path, encoding="utf-8") as f:
                tokenizer.chat_template = f.read()
        else:
            notes.append(f"chat_template_path '{path}' is cloned into the model at training; shown with this template")
    sample = ds[0]
    completion_only = args.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in sample and "completion" in sample
    template = None
    if args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
        template = get_training_chat_template(tokenizer)
    return bool(completion_only), template, notes


def _sft_batch(
    rows: list[dict[str, Any]], tokenizer: Any, args: Any, completion_only: bool, template: str | None
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, trained) of each row, as `SFTTrainer._prepare_dataset` builds them before truncation."""
    from trl.data_utils import is_conversational, is_conversational_from_value, maybe_convert_to_chatml

    if "input_ids" not in rows[0]:
        if is_conversational_from_value(rows[0]):
            rows = [maybe_convert_to_chatml(dict(r)) for r in rows]
        if not is_conversational(rows[0]):  # TRL's add_eos: the first row decides for the dataset
            eos = tokenizer.eos_token
            for r in rows:
                if "text" in r and not r["text"].endswith(eos):
                    r["text"] = r["text"] + eos
                elif "completion" in r and not r["completion"].endswith(eos):
                    r["completion"] = r["completion"] + eos
        rows = _sft_tokenize(rows, tokenizer, args, template)
    out = []
    for r in rows:
        ids = list(r["input_ids"])
        if "labels" in r:
            trained = [int(label != -100) for label in r["labels"]]
        else:
            masks = []
            if completion_only and "completion_mask" in r:
                masks.append(r["completion_mask"])
            if "assistant_masks" in r:
                masks.append(r["assistant_masks"])
            trained = [int(all(bits)) for _, *bits in zip(ids, *masks, strict=False)]
        out.append((ids, trained))
    return out


def _sft_tokenize(rows: list[dict[str, Any]], tokenizer: Any, args: Any, template: str | None) -> list[dict[str, Any]]:
    """SFTTrainer's `tokenize_fn` over a batch of rows (see the module docstring)."""
    from trl.data_utils import is_conversational

    kwargs = [_template_kwargs(r) for r in rows]
    conv = [is_conversational(r) for r in rows]
    out: list[dict[str, Any]] = [{} for _ in rows]
    pc = [i for i, r in enumerate(rows) if "prompt" in r]
    lm = [i for i, r in enumerate(rows) if "prompt" not in r]
    if pc:
        chat = [i for i in pc if conv[i]]
        plain = [i for i in pc if not conv[i]]
        if chat:
            k = [kwargs[i] for i in chat]
            prompts = _encode(
                tokenizer, [rows[i]["prompt"] for i in chat], k, add_generation_prompt=True, chat_template=template
            )
            full = _encode(
                tokenizer,
                [rows[i]["prompt"] + rows[i]["completion"] for i in chat],
                k,
                return_assistant_tokens_mask=args.assistant_only_loss,
                chat_template=template,
            )
            for i, p, f in zip(chat, prompts, full, strict=True):
                out[i] = {**f, "prompt_len": len(p["input_ids"])}
        if plain:
            k = [{} for _ in plain]
            prompts = _encode(tokenizer, [rows[i]["prompt"] for i in plain], k)
            full = _encode(tokenizer, [rows[i]["prompt"] + rows[i]["completion"] for i in plain], k)
            for i, p, f in zip(plain, prompts, full, strict=True):
                out[i] = {"input_ids": f["input_ids"], "prompt_len": len(p["input_ids"])}
        for i in pc:
            n = out[i].pop("prompt_len")
            out[i]["completion_mask"] = [0] * n + [1] * (len(out[i]["input_ids"]) - n)
    if lm:
        chat = [i for i in lm if conv[i]]
        plain = [i for i in lm if not conv[i]]
        if chat:
            enc = _encode(
                tokenizer,
                [rows[i]["messages"] for i in chat],
                [kwargs[i] for i in chat],
                return_assistant_tokens_mask=args.assistant_only_loss,
                chat_template=template,
            )
            for i, e in zip(chat, enc, strict=True):
                out[i] = e
        if plain:
            enc = _encode(tokenizer, [rows[i][args.dataset_text_field] for i in plain], [{} for _ in plain])
            for i, e in zip(plain, enc, strict=True):
                out[i] = e
    return out


def sft_rows(ds: Any, tokenizer: Any, args: Any, batch: int = BATCH) -> Iterator[tuple[list[int], list[int]]]:
    """(input_ids, trained mask) of every row as `SFTTrainer` prepares it, before truncation and packing."""
    completion_only, template, _ = _sft_choices(ds, tokenizer, args)
    for start, stop in chunks(len(ds), batch):
        yield from _sft_batch(_rows(ds, start, stop), tokenizer, args, completion_only, template)


def sft_tokens(ds: Any, tokenizer: Any, args: Any, shown: int) -> Tokens:
    """What SFTTrainer makes of `ds` under `args`: lengths, truncation, rows without a trained token, and the
    first `shown` rows. Packing and padding-free batching change what a batch is, not which tokens train."""
    completion_only, template, notes = _sft_choices(ds, tokenizer, args)
    skip = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset"))
    max_length, mode = args.max_length, args.truncation_mode
    packing, strategy = args.packing, args.packing_strategy
    # Which rows lose tokens to max_length, and what becomes of rows with no trained token (TRL 1.x):
    cuts = max_length is not None and not skip and (not packing or strategy == "bfd")
    if packing and strategy == "bfd":
        mode = "keep_start"
    drops = max_length is not None and not packing and not skip
    counter = TokenCounter(["input"])
    shown_rows: list[RowTokens] = []
    for start, stop in chunks(len(ds), BATCH):
        encoded = _sft_batch(_rows(ds, start, stop), tokenizer, args, completion_only, template)
        for offset, (ids, trained) in enumerate(encoded):
            keep = _slice(len(ids), max_length if cuts else None, mode)
            kept = trained[keep]
            marked = sum(kept)
            cut = len(ids) - len(kept)
            counter.add({"input": len(ids)}, cut, marked, dropped=drops and not marked)
            index = start + offset
            if index < shown:
                notes_row = []
                if cut:
                    notes_row.append(f"max_length {max_length} cuts {cut} tokens ({mode})")
                if not marked:
                    notes_row.append(
                        "no trained token: the trainer drops this row" if drops else "no trained token: zero loss"
                    )
                flags = _cut_flags(len(ids), keep)
                shown_rows.append(
                    RowTokens(
                        index,
                        [Sequence("input", _pieces(tokenizer, ids, trained, flags), len(ids), sum(trained), len(kept))],
                        notes_row,
                    )
                )
    what = (
        "the completion (completion_only_loss)"
        if completion_only and "prompt" in ds.column_names
        else "the assistant turns (assistant_only_loss)"
        if args.assistant_only_loss or "assistant_masks" in ds.column_names
        else "every token"
    )
    if skip:
        rule = "skip_prepare_dataset: the rows reach the collator as they are (no truncation, nothing dropped)"
    elif packing:
        how = {
            "bfd": f"packed (bfd): rows past max_length {max_length} are cut to it",
            "bfd_split": "packed (bfd_split): long rows are split across packs, no token is lost",
            "wrapped": "packed (wrapped): rows are concatenated and cut into max_length blocks, no token is lost",
        }.get(strategy, f"packed ({strategy})")
        rule = f"{how}; rows with no trained token stay in their packs as zero-loss tokens"
    elif max_length is None:
        rule = "no max_length: nothing is cut; rows with no trained token are trained on with zero loss"
    else:
        rule = f"rows past max_length {max_length} are cut ({mode}); rows then left with no trained token are dropped"
    return counter.tokens(
        shown=f"SFTTrainer's tokens; loss on {what}",
        marked="trained",
        rule=rule,
        max_length=max_length,
        rows=shown_rows,
        notes=notes,
    )


def _cut_flags(n: int, keep: slice) -> list[bool]:
    """True for each of n tokens that `keep` keeps."""
    kept = set(range(n)[keep])
    return [i in kept for i in range(n)]


def _pieces(tokenizer: Any, ids: list[int], mask: list[int], kept: list[bool]) -> list[tuple[str, int]]:
    """Display pieces with tokens cut by max_length (either end) marked -1."""
    if all(kept):
        return pieces(tokenizer, ids, mask)
    first = kept.index(True) if True in kept else len(ids)
    last = len(kept) - kept[::-1].index(True) if True in kept else 0
    head = [(t, -1) for t, _ in pieces(tokenizer, ids[:first], mask[:first])]
    middle = pieces(tokenizer, ids[first:last], mask[first:last])
    tail = [(t, -1) for t, _ in pieces(tokenizer, ids[last:], mask[last:])]
    return head + middle + tail


# --- DPOTrainer (dpo, and the other pair trainers' prompts and answers) ---------------------------------------
def _answers_batch(
    rows: list[dict[str, Any]], tokenizer: Any, answers: tuple[str, ...]
) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt_ids, [answer_ids, ...]) of each row, as DPOTrainer and KTOTrainer's `_prepare_dataset` build
    them: the prompt extracted from pairs that have none, EOS after plain answers, each answer's tokens those
    that prompt + answer adds to the prompt's."""
    from trl.data_utils import extract_prompt, is_conversational

    if "prompt" not in rows[0]:
        rows = [{**r, **extract_prompt(r)} for r in rows]
    if not is_conversational(rows[0]):
        eos = tokenizer.eos_token
        for r in rows:
            for a in answers:
                r[a] = r[a] if r[a].endswith(eos) else r[a] + eos
    conv = [is_conversational(r) for r in rows]
    kwargs = [_template_kwargs(r) if c else {} for r, c in zip(rows, conv, strict=True)]
    out: list[Any] = [None] * len(rows)
    for group, extra in (
        ([i for i, c in enumerate(conv) if c], {"add_generation_prompt": True}),
        ([i for i, c in enumerate(conv) if not c], {}),
    ):
        if not group:
            continue
        k = [kwargs[i] for i in group]
        prompt = _encode(tokenizer, [rows[i]["prompt"] for i in group], k, **extra)
        full = [_encode(tokenizer, [rows[i]["prompt"] + rows[i][a] for i in group], k) for a in answers]
        for j, i in enumerate(group):
            n = len(prompt[j]["input_ids"])
            out[i] = (list(prompt[j]["input_ids"]), [list(f[j]["input_ids"][n:]) for f in full])
    return out


def _dpo_batch(rows: list[dict[str, Any]], tokenizer: Any) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids) of each row, as `DPOTrainer._prepare_dataset` builds them."""
    return [(p, c, r) for p, (c, r) in _answers_batch(rows, tokenizer, ("chosen", "rejected"))]


def dpo_rows(ds: Any, tokenizer: Any, batch: int = BATCH) -> Iterator[tuple[list[int], list[int], list[int]]]:
    """(prompt_ids, chosen_ids, rejected_ids) of every row as `DPOTrainer` prepares them."""
    for start, stop in chunks(len(ds), batch):
        yield from _dpo_batch(_rows(ds, start, stop), tokenizer)


def dpo_tokens(ds: Any, tokenizer: Any, args: Any, shown: int) -> Tokens:
    """DPOTrainer: each pair is the prompt followed by the chosen, and by the rejected answer; the loss compares
    the answers' log-probabilities (their tokens are the marked ones). The collator cuts prompt + answer to
    `max_length`; with keep_start, rows whose prompt alone fills it are dropped."""
    max_length, mode = args.max_length, args.truncation_mode
    counter = TokenCounter(["prompt", "prompt+chosen", "prompt+rejected"])
    shown_rows: list[RowTokens] = []
    for start, stop in chunks(len(ds), BATCH):
        for offset, (prompt, chosen, rejected) in enumerate(_dpo_batch(_rows(ds, start, stop), tokenizer)):
            index = start + offset
            dropped = max_length is not None and mode == "keep_start" and len(prompt) >= max_length
            sequences, cut, answers_kept = [], 0, []
            for name, answer in (("chosen", chosen), ("rejected", rejected)):
                ids, mask = prompt + answer, [0] * len(prompt) + [1] * len(answer)
                keep = _slice(len(ids), max_length, mode)
                cut += len(ids) - len(mask[keep])
                answers_kept.append(sum(mask[keep]))
                if index < shown:
                    flags = _cut_flags(len(ids), keep)
                    sequences.append(
                        Sequence(name, _pieces(tokenizer, ids, mask, flags), len(ids), len(answer), len(mask[keep]))
                    )
            lengths = {"prompt": len(prompt), "prompt+chosen": len(prompt) + len(chosen)}
            lengths["prompt+rejected"] = len(prompt) + len(rejected)
            # A pair trains when both answers keep a token: the loss compares their log-probabilities.
            counter.add(lengths, cut, 0 if dropped else min(answers_kept), dropped)
            if index < shown:
                notes = [f"max_length {max_length} cuts {cut} tokens ({mode})"] if cut else []
                if dropped:
                    notes.append("the prompt alone fills max_length: the trainer drops this pair")
                shown_rows.append(RowTokens(index, sequences, notes))
    tokens = counter.tokens(
        shown="DPOTrainer's tokens: the prompt, then each answer; the loss compares the answers' log-probabilities",
        marked="answer",
        rule=(
            "no max_length: nothing is cut"
            if max_length is None
            else f"prompt + answer past max_length {max_length} is cut ({mode}) in each batch"
            + ("; pairs whose prompt alone fills it are dropped" if mode == "keep_start" else "")
        ),
        max_length=max_length,
        rows=shown_rows,
    )
    tokens.trained_tokens = 0  # a pair's figure is its shorter kept answer: a total of those would mislead
    return tokens


# --- KTOTrainer --------------------------------------------------------------------------------------------------
def kto_tokens(ds: Any, tokenizer: Any, args: Any, shown: int) -> Tokens:
    """KTOTrainer: each row is a prompt and one completion, desirable or not (`label`); the loss reads the
    completion's log-probability (its tokens are the marked ones). The collator keeps the first `max_length`
    tokens; rows whose prompt alone fills it are dropped."""
    max_length = args.max_length
    counter = TokenCounter(["prompt", "prompt+completion"])
    shown_rows: list[RowTokens] = []
    for start, stop in chunks(len(ds), BATCH):
        rows = _rows(ds, start, stop)
        labels = [r.get("label") for r in rows]
        for offset, (prompt, (completion,)) in enumerate(_answers_batch(rows, tokenizer, ("completion",))):
            index = start + offset
            ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
            keep = _slice(len(ids), max_length, "keep_start")
            dropped = max_length is not None and len(prompt) >= max_length
            kept = sum(mask[keep])
            counter.add(
                {"prompt": len(prompt), "prompt+completion": len(ids)},
                len(ids) - len(mask[keep]),
                0 if dropped else kept,
                dropped,
            )
            if index < shown:
                notes = [f"label {labels[offset]}"]
                if len(ids) > len(mask[keep]):
                    notes.append(f"max_length {max_length} cuts {len(ids) - len(mask[keep])} tokens (keep_start)")
                if dropped:
                    notes.append("the prompt alone fills max_length: the trainer drops this row")
                flags = _cut_flags(len(ids), keep)
                seq = Sequence(
                    "completion", _pieces(tokenizer, ids, mask, flags), len(ids), len(completion), len(mask[keep])
                )
                shown_rows.append(RowTokens(index, [seq], notes))
    return counter.tokens(
        shown="KTOTrainer's tokens: the prompt, then the completion; the loss reads the completion's log-probability",
        marked="trained",
        rule="no max_length: nothing is cut"
        if max_length is None
        else f"prompt + completion past max_length {max_length} is cut (keep_start); rows whose prompt alone fills "
        "it are dropped",
        max_length=max_length,
        rows=shown_rows,
    )


# --- ORPOTrainer, CPOTrainer (trl.experimental) -----------------------------------------------------------------
def row_trainer_tokens(ds: Any, tokenizer: Any, args: Any, shown: int, trainer_class: type) -> Tokens:
    """ORPO and CPO tokenize one row at a time (`tokenize_row`, after the chat template is applied as text):
    their own code runs here, once as configured and once without `max_length` to see what it cuts. Their
    labels mark the trained tokens (the answer; the prompt is -100)."""
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    def standin(max_length: int) -> Any:
        trainer = trainer_class.__new__(trainer_class)  # the tokenizing step alone: no model
        trainer.processing_class, trainer.is_encoder_decoder = tokenizer, False
        trainer.max_length, trainer.max_completion_length = max_length, args.max_completion_length
        return trainer

    max_length = args.max_length if args.max_length is not None else 512  # the trainers' own fallback
    configured, whole = standin(max_length), standin(10**9)
    counter = TokenCounter(["prompt+chosen", "prompt+rejected"])
    shown_rows: list[RowTokens] = []
    longer = 0
    for start, stop in chunks(len(ds), BATCH):
        for offset, row in enumerate(_rows(ds, start, stop)):
            row = maybe_apply_chat_template(maybe_extract_prompt(row), tokenizer)
            kept, full = configured.tokenize_row(row), whole.tokenize_row(row)
            lengths, cut, trained, sequences = {}, 0, [], []
            for side in ("chosen", "rejected"):
                ids, labels = full[f"{side}_input_ids"], full[f"{side}_labels"]
                n_kept = len(kept[f"{side}_input_ids"])
                lengths[f"prompt+{side}"] = len(ids)
                cut += len(ids) - n_kept
                trained.append(sum(label != -100 for label in kept[f"{side}_labels"]))
                if start + offset < shown:
                    mask = [int(label != -100) for label in labels]
                    flags = [i < n_kept for i in range(len(ids))]
                    sequences.append(Sequence(side, _pieces(tokenizer, ids, mask, flags), len(ids), sum(mask), n_kept))
            counter.add(lengths, cut, min(trained), False)
            too_long = (
                max_length is not None and max(len(kept[f"{x}_input_ids"]) for x in ("chosen", "rejected")) > max_length
            )
            longer += too_long
            if start + offset < shown:
                notes = [f"max_length {max_length} cuts {cut} tokens from the answers"] if cut else []
                if too_long:
                    notes.append(f"still longer than max_length {max_length} (the prompt is not cut)")
                shown_rows.append(RowTokens(start + offset, sequences, notes))
    name = trainer_class.__name__
    return counter.tokens(
        shown=f"{name}'s tokens (its tokenize_row on the template's text): the prompt, then each answer; the loss "
        "reads the answers",
        marked="trained",
        rule=f"{name}'s tokenize_row cuts each answer to max_length minus the longer answer's length when prompt "
        f"+ the longer answer passes max_length {max_length}; the prompt is never cut and no row is dropped",
        max_length=max_length,
        rows=shown_rows,
        notes=[f"{longer} rows stay longer than max_length {max_length}: {name} trains on them whole"]
        if longer
        else [],
    )


# --- RewardTrainer ----------------------------------------------------------------------------------------------
def reward_tokens(ds: Any, tokenizer: Any, args: Any, shown: int) -> Tokens:
    """RewardTrainer: the model scores each whole sequence (prompt and answer) at its last token; there is no
    per-token loss. The answer's tokens (after the prompt's) are marked. Pairs with a sequence past
    `max_length` are dropped, not cut."""
    from trl.data_utils import is_conversational

    max_length = args.max_length
    counter = TokenCounter(["chosen", "rejected"])
    shown_rows: list[RowTokens] = []
    for start, stop in chunks(len(ds), BATCH):
        rows = _rows(ds, start, stop)
        if not is_conversational(rows[0]):  # RewardTrainer's add_eos
            eos = tokenizer.eos_token
            for r in rows:
                r["chosen"] = r["chosen"] if r["chosen"].endswith(eos) else r["chosen"] + eos
                r["rejected"] = r["rejected"] if r["rejected"].endswith(eos) else r["rejected"] + eos
        kwargs = [_template_kwargs(r) for r in rows]
        has_prompt = ["prompt" in r for r in rows]
        # TRL's tokenize_fn: with a prompt, each sequence is prompt + answer (strings or chats alike).
        chosen = _encode(tokenizer, [r["prompt"] + r["chosen"] if "prompt" in r else r["chosen"] for r in rows], kwargs)
        rejected = _encode(
            tokenizer, [r["prompt"] + r["rejected"] if "prompt" in r else r["rejected"] for r in rows], kwargs
        )
        prompts = [
            _encode(tokenizer, [r["prompt"]], [k], **({"add_generation_prompt": True} if is_conversational(r) else {}))[
                0
            ]
            if p and start + i < shown
            else None
            for i, (r, p, k) in enumerate(zip(rows, has_prompt, kwargs, strict=True))
        ]
        for offset, (c, r) in enumerate(zip(chosen, rejected, strict=True)):
            index = start + offset
            c_ids, r_ids = list(c["input_ids"]), list(r["input_ids"])
            dropped = max_length is not None and (len(c_ids) > max_length or len(r_ids) > max_length)
            counter.add({"chosen": len(c_ids), "rejected": len(r_ids)}, 0, 0 if dropped else 1, dropped)
            if index < shown:
                p = prompts[offset]
                n = len(p["input_ids"]) if p is not None and c_ids[: len(p["input_ids"])] == list(p["input_ids"]) else 0
                sequences = [
                    Sequence(
                        name, pieces(tokenizer, ids, [0] * n + [1] * (len(ids) - n)), len(ids), len(ids) - n, len(ids)
                    )
                    for name, ids in (("chosen", c_ids), ("rejected", r_ids))
                ]
                notes = [f"longer than max_length {max_length}: the trainer drops this pair"] if dropped else []
                shown_rows.append(RowTokens(index, sequences, notes))
    tokens = counter.tokens(
        shown="RewardTrainer's tokens: each whole sequence is scored at its last token (no per-token loss); "
        "the answer after the prompt is marked",
        marked="answer",
        rule="no max_length: every pair is kept"
        if max_length is None
        else f"pairs with a sequence past max_length {max_length} are dropped (not cut)",
        max_length=max_length,
        rows=shown_rows,
    )
    tokens.no_trained = 0  # every kept pair is scored whole
    tokens.trained_tokens = 0
    return tokens


# --- GRPOTrainer / RLOOTrainer: prompts only ---------------------------------------------------------------------
def prompt_tokens(ds: Any, tokenizer: Any, args: Any, shown: int, trainer: str) -> Tokens:
    """Online trainers tokenize the prompts (through the chat template for chats, with the generation prompt)
    and sample the answers: the data holds no trained token; the view shows the prompts the policy reads."""
    from trl.data_utils import is_conversational

    counter = TokenCounter(["prompt"])
    shown_rows: list[RowTokens] = []
    extra = dict(getattr(args, "chat_template_kwargs", None) or {})
    for start, stop in chunks(len(ds), BATCH):
        rows = _rows(ds, start, stop)
        prompts = [r.get("prompt") for r in rows]
        if "input_ids" in rows[0]:  # tokenized by the stage itself (PPO's prepare)
            enc = [r["input_ids"] for r in rows]
        elif is_conversational({"prompt": prompts[0]}):
            enc = tokenizer.apply_chat_template(
                prompts, add_generation_prompt=True, tokenize=True, return_dict=True, **extra
            )["input_ids"]
        else:
            enc = tokenizer(text=prompts)["input_ids"]
        for offset, ids in enumerate(enc):
            ids = list(ids)
            counter.add({"prompt": len(ids)}, 0, 1, False)
            if start + offset < shown:
                shown_rows.append(
                    RowTokens(
                        start + offset,
                        [Sequence("prompt", pieces(tokenizer, ids, [0] * len(ids)), len(ids), 0, len(ids))],
                    )
                )
    limit = getattr(args, "max_completion_length", None) or getattr(args, "response_length", None)
    tokens = counter.tokens(
        shown=f"{trainer}'s prompt tokens: the answers are sampled during training, so no data token carries loss",
        marked="trained",
        rule=f"prompts are not cut; each is answered with up to {limit} sampled tokens",
        max_length=None,
        rows=shown_rows,
        limited=False,
    )
    tokens.no_trained = 0
    tokens.trained_tokens = 0
    return tokens
