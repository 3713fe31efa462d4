"""`tunelab data`: a training stage's data as its trainer sees it (formats, token lengths, truncation, rows left
without a trained token, the rows with the tokens that carry loss marked, held-out rows found in the training
data), the same view in HTML, and its one-line summary in `tunelab validate` and the run's report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import tunelab
from tests.helpers import fails, runner, tiny_training, write
from tunelab.cli.app import app
from tunelab.data.preview import contamination, normalise

QUESTIONS = [f"Mia has {i} pens. She buys {i % 5 + 1} more. How many pens does Mia have now?" for i in range(24)]
ANSWERS = [str(i + i % 5 + 1) for i in range(24)]
CPU = {"use_cpu": True, "bf16": False, "report_to": "none"}  # trainer configs built here, without a model


def jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def chats(n: int = 24) -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in zip(QUESTIONS[:n], ANSWERS[:n], strict=True)
    ]


def marked(view: Any, row: int = 0, sequence: int = 0) -> str:
    """The text of a shown row's marked (trained) tokens."""
    return "".join(text for text, flag in view.tokens.rows[row].sequences[sequence].pieces if flag == 1)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A byte-level BPE tokenizer trained in milliseconds, with tunelab's template (generation markers)."""
    from tunelab.models.chat_templates import TUNELAB_TEMPLATE
    from tunelab.models.tokenizers import train_tokenizer

    tok = train_tokenizer(QUESTIONS * 4, {"vocab_size": 300}, "tokenizer")
    tok.chat_template = TUNELAB_TEMPLATE
    return tok


# --- the same tokens as the trainers' own preparation ------------------------------------------------------------
def _sft_cases() -> dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]:
    plain = [{"prompt": q, "completion": " " + a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    chat_pc = [
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for q, a in zip(QUESTIONS, ANSWERS, strict=True)
    ]
    return {
        "text": ([{"text": q + " " + a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)], {}),
        "prompt_completion": (plain, {}),
        "prompt_completion, full loss": (plain, {"completion_only_loss": False}),
        "conversational prompt_completion": (chat_pc, {}),
        "messages": (chats(), {}),
        "messages, assistant only": (chats(), {"assistant_only_loss": True}),
    }


@pytest.mark.parametrize("case", list(_sft_cases()))
def test_sft_tokens_equal_sft_trainers_own_preparation(tokenizer: Any, case: str) -> None:
    """The batched tokenization is SFTTrainer._prepare_dataset's, token for token and label for label."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tunelab.training.tokenized import sft_rows

    rows, config = _sft_cases()[case]
    ds = Dataset.from_list(rows)
    args = SFTConfig(output_dir="unused", max_length=None, shuffle_dataset=False, **CPU, **config)
    trainer = SFTTrainer.__new__(SFTTrainer)  # the preparation alone: no model
    trainer._tokenizer = tokenizer
    trainer.chat_template = None
    trainer.completion_only_loss = args.completion_only_loss
    if trainer.completion_only_loss is None:
        trainer.completion_only_loss = "prompt" in rows[0]
    theirs = trainer._prepare_dataset(ds, tokenizer, args, False, None, "train")
    ours = list(sft_rows(ds, tokenizer, args, batch=7))  # several batches, one short
    assert [ids for ids, _ in ours] == theirs["input_ids"]
    assert [[int(t != -100) for t in labels] for labels in theirs["labels"]] == [m for _, m in ours]


def test_pair_tokens_equal_dpo_and_reward_trainers_own_preparation(tokenizer: Any) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from tunelab.training.tokenized import dpo_rows

    plain = [{"prompt": q, "chosen": " " + a, "rejected": " 0"} for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    chat = [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": "0"}],
        }
        for q, a in zip(QUESTIONS, ANSWERS, strict=True)
    ]
    for rows in (plain, chat):
        ds = Dataset.from_list(rows)
        trainer = DPOTrainer.__new__(DPOTrainer)
        trainer._tokenizer = tokenizer
        theirs = trainer._prepare_dataset(ds, tokenizer, DPOConfig(output_dir="unused", **CPU), "train")
        ours = list(dpo_rows(ds, tokenizer, batch=5))
        assert [list(t) for t in ours] == [
            [p, c, r]
            for p, c, r in zip(theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"], strict=True)
        ]
    # RewardTrainer scores prompt + answer whole: the view's chosen sequence is its chosen_ids.
    from tunelab.training.tokenized import reward_tokens

    args = RewardConfig(output_dir="unused", max_length=None, **CPU)
    theirs = RewardTrainer._prepare_dataset(None, Dataset.from_list(chat), tokenizer, args, "train")
    view = reward_tokens(Dataset.from_list(chat), tokenizer, args, shown=2)
    assert [s.tokens for s in view.rows[1].sequences] == [len(theirs[1]["chosen_ids"]), len(theirs[1]["rejected_ids"])]
    assert "".join(t for t, f in view.rows[1].sequences[0].pieces if f) == ANSWERS[1] + "<|endoftext|>\n"


# --- the CLI on a tiny sft recipe ----------------------------------------------------------------------------
def recipe(tmp_path: Path, tiny_lm: Path, data: str, **extra: Any) -> Path:
    stage = {"stage": "sft", "model": str(tiny_lm), "data": data, "training": tiny_training(), **extra}
    return write(tmp_path, {"stages": {"sft": stage}})


def test_cli_shows_format_lengths_and_the_loss_mask(tmp_path: Path, tiny_lm: Path) -> None:
    data = jsonl(tmp_path / "chats.jsonl", chats())
    path = recipe(
        tmp_path,
        tiny_lm,
        data,
        chat_template="tunelab",
        training=tiny_training(assistant_only_loss=True, max_length=128),
    )
    result = runner.invoke(app, ["data", str(path), "--rows", "2", "--html", str(tmp_path / "view.html")])
    out = result.output
    assert result.exit_code == 0, out
    assert "training data: " in out and ": messages (" in out and "24 rows" in out
    assert "loss on the assistant turns (assistant_only_loss)" in out
    assert "tokens (input): p50 " in out and "max_length 128: 0 rows truncated" in out
    # Without colour, trained tokens are [[bracketed]]: the assistant's answer and its end-of-turn token only.
    assert f"<|user|>\n{QUESTIONS[0]}<|endoftext|>\n<|assistant|>\n[[{ANSWERS[0]}<|endoftext|>]]" in out
    assert out.count("[[") == 2 + 1  # two rows, and the legend
    view = tunelab.data_preview(str(path), rows=2)
    assert marked(view, 0) == ANSWERS[0] + "<|endoftext|>" and marked(view, 1) == ANSWERS[1] + "<|endoftext|>"
    assert view.sources[0].format == "messages" and view.rows == 24 and view.tokens.lengths[0].rows == 24
    page = (tmp_path / "view.html").read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page
    assert f"<span class=m1>{ANSWERS[0]}</span><span class=m1>&lt;|endoftext|&gt;</span>" in page  # a span a token
    assert "<|" not in page and "|&gt;" in page
    # A page tunelab wrote is replaced; any other file is kept.
    assert runner.invoke(app, ["data", str(path), "--html", str(tmp_path / "view.html")]).exit_code == 0
    (tmp_path / "mine.html").write_text("<p>my notes</p>")
    fails(["data", str(path), "--html", str(tmp_path / "mine.html")], "is not a page `tunelab data` wrote")
    assert (tmp_path / "mine.html").read_text() == "<p>my notes</p>"


def test_truncation_and_rows_left_without_a_trained_token(tmp_path: Path, tiny_lm: Path) -> None:
    """A small max_length cuts long rows; a row whose prompt alone fills it keeps no completion token, and
    SFTTrainer drops it. The counts are the trainer's, from its own tokens."""
    long = "Before the question, a long story about pens and cups and shells. " * 3
    rows = [
        {"prompt": (long if i % 3 == 0 else "") + q, "completion": " " + a}
        for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True))
    ]
    data = jsonl(tmp_path / "qa.jsonl", rows)
    view = tunelab.data_preview(str(recipe(tmp_path, tiny_lm, data)), rows=3)
    from tunelab.models.tokenizers import load_tokenizer

    tok = load_tokenizer(str(tiny_lm))
    lengths = [len(tok(r["prompt"] + r["completion"] + tok.eos_token)["input_ids"]) for r in rows]
    prompts = [len(tok(r["prompt"])["input_ids"]) for r in rows]
    t = view.tokens
    assert t.max_length == 64 and t.lengths[0].max == max(lengths)
    assert t.truncated == sum(n > 64 for n in lengths) > 0
    assert t.cut_tokens == sum(max(0, n - 64) for n in lengths)
    assert t.no_trained == t.dropped == sum(p >= 64 for p in prompts) > 0
    assert view.tokens.rows[0].notes == [
        f"max_length 64 cuts {lengths[0] - 64} tokens (keep_start)",
        "no trained token: the trainer drops this row",
    ]
    assert all(flag == -1 for _, flag in view.tokens.rows[0].sequences[0].pieces[-(lengths[0] - 64) :])
    # An override after the recipe (no stage named) applies as in `run`.
    out = runner.invoke(app, ["data", str(tmp_path / "recipe.yaml"), "training.max_length=1000", "--rows", "0"])
    assert out.exit_code == 0 and "max_length 1000: 0 rows truncated (0 tokens cut), 0 rows with no" in out.output


# --- contamination ---------------------------------------------------------------------------------------------
def test_contamination_by_exact_and_normalised_text() -> None:
    train = [{"prompt": q, "completion": a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    held = [
        {"prompt": QUESTIONS[3]},  # planted: the same text
        {"prompt": "  MIA has 7 pens;  she BUYS 3 more -- how many pens does Mia have now "},  # planted, normalised
        {"prompt": "Tom has 2 cups. How many cups does Tom have?"},
    ]
    found = contamination(train, [("stages.eval.data", held)])
    assert (found.exact, found.normalised, found.rows) == (1, 2, 3)
    assert [(m.how, m.row, m.train_row) for m in found.examples] == [("exact", 0, 3), ("normalised", 1, 7)]
    clean = contamination(train, [("stages.eval.data", held[2:])])
    assert (clean.exact, clean.normalised, clean.examples) == (0, 0, [])
    # A chat's user turns are its question; punctuation and case do not hide a copy.
    assert contamination(chats(), [("e", [{"prompt": QUESTIONS[5].upper()}])]).normalised == 1
    assert normalise("Mia  has 3 pens.\n") == normalise("mia has 3 pens") == "mia has 3 pens"
    # lm_eval stages' documents are the harness's: said, not compared.
    harness = contamination(train, [("stages.bench.tasks", None)])
    assert harness.sources == [] and harness.notes == [
        "stages.bench.tasks: not compared (its documents come from lm-evaluation-harness)"
    ]


def test_data_validate_and_report_find_a_planted_duplicate(tmp_path: Path, tiny_lm: Path) -> None:
    """The eval stage's data and the stage's own eval_data are compared with the training rows; `validate`
    prints the summary in one line; a run writes it to data.json and report.md."""
    train = jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": q, "completion": " " + a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)],
    )
    test_rows = [
        {"prompt": q, "completion": "1"}
        for q in [
            "Tom has 2 cups. How many?",
            QUESTIONS[2] + "  ",
            "mia has 9 pens she buys 5 more how many pens does mia have now",
        ]
    ]
    held = jsonl(tmp_path / "test.jsonl", test_rows)
    path = write(
        tmp_path,
        {
            "stages": {
                "sft": {"stage": "sft", "model": str(tiny_lm), "data": train, "training": tiny_training(max_steps=1)},
                "eval": {"stage": "eval", "model": "${sft}", "data": held, "generation": {"max_new_tokens": 2}},
            }
        },
    )
    result = runner.invoke(app, ["data", str(path), "sft"])
    assert result.exit_code == 0, result.output
    assert (
        "contamination: 2 of 3 rows of stages.eval.data appear in the training data (1 exact, 1 more" in result.output
    )
    assert f"  exact: stages.eval.data row 1 = training row 2: '{QUESTIONS[2]}'" in result.output
    checked = runner.invoke(app, ["validate", str(path)])
    assert checked.exit_code == 0, checked.output
    line = next(x for x in checked.output.splitlines() if x.startswith("data sft: "))
    assert "24 rows, prompt_completion" in line and "contamination: 2 of 3 held-out rows (1 exact)" in line
    run = tunelab.run(str(path))
    data = json.loads((run.run_dir / "sft" / "data.json").read_text())
    assert data["contamination"]["normalised"] == 2 and data["tokens"]["rows"] == []
    report = (run.run_dir / "report.md").read_text()
    assert "## sft: data" in report and "contamination: 2 of 3 rows of stages.eval.data" in report


# --- bad input -------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(
        tmp_path,
        {
            "stages": {
                "sft": {"stage": "sft", "model": str(tiny_lm), "data": jsonl(tmp_path / "d.jsonl", chats(4))},
                "eval": {
                    "stage": "eval",
                    "model": "${sft}",
                    "data": jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "completion": "b"}]),
                },
            }
        },
    )
    fails(["data", str(path), "sfx"], "the recipe has no stage 'sfx'; did you mean 'sft'?")
    fails(
        ["data", str(path), "eval"], r"stage 'eval' \(eval\) trains no language model on rows: .*; the recipe's: sft$"
    )
    fails(["data", str(path), "--rows", "-1"], "--rows is -1")
    fails(["data", str(path), "--html", str(tmp_path)], "is a folder")
    fails(["data", str(path), "--html", str(tmp_path / "no" / "x.html")], "does not exist")
    with pytest.raises(tunelab.TunelabError, match="rows must be a whole number"):
        tunelab.data_preview(str(path), rows=-2)


# --- a real chat template ------------------------------------------------------------------------------------
def test_smollm2_chatml_mask_from_its_real_template(tmp_path: Path, smollm2: Path) -> None:
    """SmolLM2's ChatML template has no generation markers: tunelab derives the mask, and the view shows the
    rows SFTTrainer gets: the answer and <|im_end|> trained; the system and user turns not."""
    data = jsonl(tmp_path / "chats.jsonl", chats(8))
    stage = {
        "stage": "sft",
        "model": str(smollm2),  # its plain copy (the GGUF file converted once per suite)
        "data": data,
        "training": tiny_training(assistant_only_loss=True, max_length=128),
    }
    view = tunelab.data_preview(str(write(tmp_path, {"stages": {"sft": stage}})), rows=2)
    assert marked(view, 0) == ANSWERS[0] + "<|im_end|>" and marked(view, 1) == ANSWERS[1] + "<|im_end|>"
    text = "".join(t for t, _ in view.tokens.rows[0].sequences[0].pieces)
    assert text.startswith("<|im_start|>system\n") and f"<|im_start|>user\n{QUESTIONS[0]}<|im_end|>" in text
    assert view.tokens.no_trained == 0 and view.tokens.lengths[0].rows == 8


# --- the other trainers -----------------------------------------------------------------------------------------
def test_kto_tokens_equal_kto_trainers_own_preparation(tokenizer: Any) -> None:
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from tunelab.training.tokenized import _answers_batch

    rows = [
        {"prompt": q, "completion": " " + a, "label": i % 2 == 0}
        for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True))
    ]
    trainer = KTOTrainer.__new__(KTOTrainer)
    trainer._tokenizer, trainer.calculate_KL = tokenizer, False
    theirs = trainer._prepare_dataset(
        Dataset.from_list(rows), tokenizer, KTOConfig(output_dir="unused", **CPU), "train"
    )
    ours = _answers_batch([dict(r) for r in rows], tokenizer, ("completion",))
    assert [(p, c) for p, (c,) in ours] == list(zip(theirs["prompt_ids"], theirs["completion_ids"], strict=True))


@pytest.mark.parametrize("kind", ["dpo", "reward", "kto", "orpo", "cpo", "grpo", "rloo", "ppo"])
def test_every_trainer_stage_shows_its_tokens(tmp_path: Path, tiny_lm: Path, reward_model: Path, kind: str) -> None:
    """Each stage kind's view: its trainer's tokenization, what is marked, and the first rows."""
    from tests.helpers import PPO_TRAINING, PREF_TRAIN, QA_TRAIN

    stage: dict[str, Any] = {"stage": kind, "model": str(tiny_lm), "data": PREF_TRAIN}
    if kind in ("grpo", "rloo"):
        stage.update(data=QA_TRAIN, rewards=["tunelab.rewards:exact_match"])
    if kind == "ppo":
        stage.update(data=QA_TRAIN, reward_model=str(reward_model), training=dict(PPO_TRAINING))
    view = tunelab.data_preview(str(write(tmp_path, {"stages": {kind: stage}})), rows=2)
    t = view.tokens
    unpaired = 2 if kind == "kto" else 1  # KTO trains on each pair's answers as two rows
    assert t is not None and len(t.rows) == 2 and all(x.rows == unpaired * view.rows for x in t.lengths)
    first = t.rows[0].sequences[0]
    assert first.tokens == len(first.pieces) or first.tokens >= len(first.pieces)  # a piece holds one token or more
    if kind in ("grpo", "rloo", "ppo"):
        assert first.name == "prompt" and first.marked == 0 and "sampled" in t.shown
    else:  # the prompt unmarked, then the answer (and its EOS) marked
        flags = [flag for _, flag in first.pieces]
        assert flags[0] == 0 and flags[-1] == 1 and flags == sorted(flags) and first.marked > 0
        assert "".join(text for text, flag in first.pieces if flag == 1).endswith("<|endoftext|>")


def test_a_stream_is_measured_on_its_first_rows(tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed dataset (an IterableDataset) has no end: the view reads its first rows and says so."""
    from tunelab.data import preview
    from tunelab.stages.sft import SFT

    rows = [{"prompt": q, "completion": " " + a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    path = recipe(tmp_path, tiny_lm, jsonl(tmp_path / "qa.jsonl", rows))
    data = SFT.data
    monkeypatch.setattr(SFT, "data", lambda self, *a: tuple(d and d.to_iterable_dataset() for d in data(self, *a)))
    monkeypatch.setattr(preview, "STREAMED_ROWS", 10)
    view = tunelab.data_preview(str(path), rows=1)
    assert view.measured == 10 and view.tokens.lengths[0].rows == 10
    assert "lengths and contamination over the first 10 rows" in view.source_lines()
