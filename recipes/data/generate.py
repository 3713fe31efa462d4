"""Generate the small datasets tunelab ships, deterministically.

Run from anywhere: ``python recipes/data/generate.py``. The same seed always
writes byte-identical files, so the checked-in data can be regenerated and
diffed.

The task is arithmetic word problems whose answer is a single number, so a
model's answer can be checked exactly. Three datasets share one small world
(names, objects, templates):

- ``arith_corpus/``: plain stories that state results ("... so now Mia has 7
  pears."), for pre-training from scratch. It teaches the language and the
  arithmetic facts, but never the question/answer format.
- ``arith_qa/``: ``prompt``/``completion`` pairs (``train`` and a held-out
  ``test`` split) for supervised fine-tuning and exact-match evaluation.
- ``arith_kind/``: ``text``/``label`` rows (``train``, ``test``) for text
  classification: which kind of problem a question is (0 buy, 1 give, 2 total).
- ``arith_pref/``: ``prompt``/``chosen``/``rejected`` preference pairs for reward
  modelling and DPO: chosen is the correct answer, rejected a wrong one of the
  kinds a small model makes (off by a little, the other operation, an operand
  repeated, a random number). ``test`` asks the 300 held-out ``arith_qa``
  questions; ``train`` (6,000 pairs: with 2,000 the reward model's held-out
  accuracy swung between 0.72 and 0.83 from seed to seed) never does.
- ``arith_chat/``: the ``arith_qa`` questions as chats for instruct models: ``messages`` (a user
  turn with the bare question, an assistant turn with the bare number) beside ``prompt`` and
  ``completion`` columns holding the same question and answer, so one file serves SFT (messages),
  eval (prompt/completion, prompted through the model's chat template) and GRPO (prompt,
  completion as the reference). ``arith_chat_pref/``: ``arith_pref``'s pairs in the same form.
- ``arith_mc/``: the ``arith_qa`` questions as multiple choice, for log-likelihood scoring (tunelab's
  eval with ``choices``, and the harness task ``tunelab_arith_mc``): ``prompt``, four ``choices``
  (the answer and three wrong ones of ``arith_pref``'s kinds, each with its leading space, as a
  completion), ``label`` (the index of the answer) and ``completion``.
- ``arith_alpaca/train.json`` and ``arith_sharegpt/train.json``: ``arith_chat``'s training questions in the two
  formats most instruction data on the Hub comes in, each a single JSON document (a list of rows), as their public
  definitions have it. Alpaca (the first 1,000): ``instruction`` (the question), ``input`` (empty) and ``output``
  (the number). ShareGPT (the other 1,000): ``conversations``, a list of ``{from: human|gpt, value}`` turns. The
  mixture recipe (``recipes/real/smollm2-mixture.yaml``) trains on both at once; ``tunelab data`` shows how each
  is detected and converted.

Held-out questions never appear in the training split (checked below).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 1234
HERE = Path(__file__).resolve().parent
NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Ada", "Ben", "Eva", "Kai"]
OBJECTS = ["apples", "pears", "books", "coins", "cards", "shells", "stamps", "marbles", "pens", "cups"]
MAX_N = 12


def _pronoun(name: str) -> str:
    return "She" if name in {"Mia", "Ava", "Zoe", "Ivy", "Ada", "Eva"} else "He"


KINDS = ["buy", "give", "total"]


def _problem(rng: random.Random, with_kind: bool = False):
    """Return (question, story, answer) for one random problem (and its kind index, if asked)."""
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    pron = _pronoun(name)
    kind = rng.choice(["buy", "give", "total"])
    a, b = rng.randint(1, MAX_N), rng.randint(1, MAX_N)
    if kind == "buy":
        c = a + b
        q = f"{name} has {a} {obj}. {pron} buys {b} more. How many {obj} does {name} have now?"
        s = f"{name} had {a} {obj}. {pron} bought {b} more, so now {name} has {c} {obj}."
    elif kind == "give":
        a, b = max(a, b), min(a, b)
        c = a - b
        q = f"{name} has {a} {obj}. {pron} gives {b} to {other}. How many {obj} does {name} have now?"
        s = f"{name} had {a} {obj}. {pron} gave {b} to {other}, so now {name} has {c} {obj}."
    else:
        c = a + b
        q = f"{name} has {a} {obj} and {other} has {b} {obj}. How many {obj} do they have together?"
        s = f"{name} had {a} {obj} and {other} had {b} {obj}, so together they have {c} {obj}."
    return (q, s, c, KINDS.index(kind)) if with_kind else (q, s, c)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    corpus = [_problem(rng)[1] for _ in range(6000)]
    # Group stories into short paragraphs so packed sequences look like text.
    paragraphs = [" ".join(corpus[i : i + 4]) for i in range(0, len(corpus), 4)]
    _write_jsonl(HERE / "arith_corpus" / "train.jsonl", [{"text": p} for p in paragraphs])

    seen: set[str] = set()
    qa: list[dict] = []
    while len(qa) < 2300:
        q, _, c = _problem(rng)
        if q in seen:
            continue
        seen.add(q)
        qa.append({"prompt": f"Question: {q}\nAnswer:", "completion": f" {c}"})
    train, test = qa[:2000], qa[2000:]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    _write_jsonl(HERE / "arith_qa" / "train.jsonl", train)
    _write_jsonl(HERE / "arith_qa" / "test.jsonl", test)

    # A separate stream, so adding this set left the files above byte-identical.
    kind_rng = random.Random(SEED + 1)
    rows = [dict(zip(("text", "label"), _problem(kind_rng, with_kind=True)[::3], strict=True)) for _ in range(1200)]
    _write_jsonl(HERE / "arith_kind" / "train.jsonl", rows[:1000])
    _write_jsonl(HERE / "arith_kind" / "test.jsonl", rows[1000:])

    # Preference pairs, from their own stream too.
    pref_rng = random.Random(SEED + 2)
    held_out = {r["prompt"] for r in test}
    pref_train: list[dict] = []
    while len(pref_train) < 6000:
        q, _, c = _problem(pref_rng)
        prompt = f"Question: {q}\nAnswer:"
        if prompt in held_out:
            continue
        pref_train.append(_pair(pref_rng, prompt, c))
    pref_test = [_pair(pref_rng, r["prompt"], int(r["completion"])) for r in test]
    _write_jsonl(HERE / "arith_pref" / "train.jsonl", pref_train)
    _write_jsonl(HERE / "arith_pref" / "test.jsonl", pref_test)

    # Chat forms of the same questions (no new random draws: the files above stay byte-identical).
    for split, rows in (("train", train), ("test", test)):
        _write_jsonl(HERE / "arith_chat" / f"{split}.jsonl", [_chat(r) for r in rows])
    for split, rows in (("train", pref_train[:2000]), ("test", pref_test)):
        _write_jsonl(HERE / "arith_chat_pref" / f"{split}.jsonl", [_chat_pair(r) for r in rows])

    # The same training questions as Alpaca and ShareGPT documents (no random draws).
    _write_json(HERE / "arith_alpaca" / "train.json", [_alpaca(r) for r in train[:1000]])
    _write_json(HERE / "arith_sharegpt" / "train.json", [_sharegpt(r) for r in train[1000:]])

    # Multiple choice over the same questions, from a stream of its own (train: few-shot examples).
    mc_rng = random.Random(SEED + 3)
    for split, rows in (("train", train[:200]), ("test", test)):
        _write_jsonl(HERE / "arith_mc" / f"{split}.jsonl", [_choices(mc_rng, r) for r in rows])


def _write_json(path: Path, rows: list[dict]) -> None:
    """One JSON document (a list of rows, one per line for readable diffs): how Alpaca and ShareGPT files ship."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[\n" + ",\n".join(json.dumps(row, sort_keys=True) for row in rows) + "\n]\n")


def _alpaca(row: dict) -> dict:
    """Alpaca's row: the task in `instruction`, an optional `input` (none here), the answer in `output`."""
    return {"instruction": _question(row["prompt"]), "input": "", "output": row["completion"].strip()}


def _sharegpt(row: dict) -> dict:
    """ShareGPT's row: `conversations`, a list of turns `{from: human|gpt, value}`."""
    question, answer = _question(row["prompt"]), row["completion"].strip()
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _question(prompt: str) -> str:
    return prompt.removeprefix("Question: ").removesuffix("\nAnswer:")


def _chat(row: dict) -> dict:
    """A prompt/completion row as a chat (and as bare prompt/completion strings beside it)."""
    question, answer = _question(row["prompt"]), row["completion"].strip()
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "prompt": question, "completion": answer}


def _chat_pair(row: dict) -> dict:
    return {"prompt": _question(row["prompt"]), "chosen": row["chosen"].strip(), "rejected": row["rejected"].strip()}


def _pair(rng: random.Random, prompt: str, c: int) -> dict:
    """A preference pair: the correct answer against a plausible wrong one."""
    a, b = (int(n) for n in re.findall(r"\d+", prompt.split("How many")[0])[:2])
    while True:
        kind = rng.random()
        if kind < 0.4:
            wrong = c + rng.choice([-3, -2, -1, 1, 2, 3])
        elif kind < 0.6:
            wrong = abs(a - b) if c == a + b else a + b  # the other operation
        elif kind < 0.8:
            wrong = rng.choice([a, b])  # an operand repeated
        else:
            wrong = rng.randint(0, 2 * MAX_N)
        if wrong >= 0 and wrong != c:
            return {"prompt": prompt, "chosen": f" {c}", "rejected": f" {wrong}"}


def _choices(rng: random.Random, row: dict) -> dict:
    """A multiple-choice row: the answer among three distinct wrong answers, in random order."""
    c = int(row["completion"])
    wrong: list[int] = []
    while len(wrong) < 3:
        value = int(_pair(rng, row["prompt"], c)["rejected"])
        if value not in wrong:
            wrong.append(value)
    choices = [c, *wrong]
    rng.shuffle(choices)
    return {
        "prompt": row["prompt"],
        "choices": [f" {n}" for n in choices],
        "label": choices.index(c),
        "completion": row["completion"],
    }


if __name__ == "__main__":
    main()
