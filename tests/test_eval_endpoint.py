"""Scoring what you ship: the eval stage with a served model (`{openai_base_url, model}`) next to the same model
loaded in-process. The server is `tunelab serve` on a free loopback port, the client the real `openai` package;
greedy answers through the API must be the in-process answers, row for row."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tunelab
from tunelab.cli import app

QA = {"path": "recipes/data/arith_qa", "split": "test[:12]"}
runner = CliRunner()


def _lora_with_template(base: Path, out: Path) -> Path:
    """A LoRA adapter (random, non-zero: it answers unlike the base) whose folder carries a chat template."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.chat_templates import TUNELAB_TEMPLATE

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = TUNELAB_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def served(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory):
    adapter = _lora_with_template(tiny_lm, tmp_path_factory.mktemp("endpoint") / "chatty")
    with tunelab.serve(tiny_lm, adapters={"chatty": adapter}) as server:
        yield server, adapter


def _run(tmp_path: Path, stage: dict) -> tuple[dict, dict[str, list[dict]]]:
    recipe = tunelab.recipe_from_dict({"output_dir": str(tmp_path / "run"), "stages": {"score": stage}})
    result = tunelab.run(recipe)
    folder = tmp_path / "run" / "score"
    rows = {
        p.stem.removeprefix("predictions-"): [json.loads(line) for line in p.read_text().splitlines()]
        for p in folder.glob("predictions-*.jsonl")
    }
    return result.metrics["score"], rows


def test_served_answers_equal_in_process_answers(served, tiny_lm: Path, tmp_path: Path) -> None:
    server, adapter = served
    stage = {
        "stage": "eval",
        "models": {
            "local": str(tiny_lm),
            "served": {"openai_base_url": server.url, "model": "pretrain"},
            "local_chat": str(adapter),
            "served_chat": {"openai_base_url": server.url, "model": "chatty", "api_key": "unused"},
        },
        "data": QA,
        "generation": {"max_new_tokens": 6},
        "batch_size": 4,
    }
    metrics, rows = _run(tmp_path, stage)
    # The base has no chat template: plain prompts to /v1/completions; the adapter has one: messages.
    assert [r["output"] for r in rows["served"]] == [r["output"] for r in rows["local"]]
    assert [r["output"] for r in rows["served_chat"]] == [r["output"] for r in rows["local_chat"]]
    assert [r["output"] for r in rows["local_chat"]] != [r["output"] for r in rows["local"]]  # the two differ
    for served_label, local_label in (("served", "local"), ("served_chat", "local_chat")):
        assert metrics[served_label]["exact_match"] == metrics[local_label]["exact_match"]
        assert metrics[served_label]["examples"] == 12


def _fails(tmp_path: Path, stage: dict, message: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "never-run"), "stages": {"score": stage}}))
    result = runner.invoke(app, ["validate", str(path)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert message in lines[0], lines[0]


def test_bad_endpoints_are_one_line_at_validate(served, tmp_path: Path) -> None:
    server, _ = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens once the socket closes
    base = {"stage": "eval", "data": QA}
    nobody = {"openai_base_url": f"http://127.0.0.1:{closed}/v1", "model": "x"}
    _fails(tmp_path, {**base, "model": nobody}, "nothing answers at http://127.0.0.1")
    unknown = {"openai_base_url": server.url, "model": "nope"}
    _fails(tmp_path, {**base, "model": unknown}, "'stages.score.model.model' is 'nope', which")
    _fails(tmp_path, {**base, "model": {"openai_base_url": "localhost:8000", "model": "x"}}, "OpenAI base URL")
    _fails(
        tmp_path,
        {**base, "model": {**unknown, "temperature": 0}},
        "unknown key 'stages.score.model.temperature' (keys of a served endpoint)",
    )
    beams = {**base, "model": {"openai_base_url": server.url, "model": "pretrain"}, "generation": {"num_beams": 2}}
    _fails(tmp_path, beams, "'stages.score.generation.num_beams' has no field in OpenAI's API")
    quant = {**beams, "generation": {"max_new_tokens": 4}, "quantization": {"load_in_4bit": True}}
    _fails(tmp_path, quant, "'stages.score.quantization' applies to models tunelab loads")
    choices = tmp_path / "mc.jsonl"
    choices.write_text(json.dumps({"prompt": "1+1=", "choices": ["2", "3"], "label": 0}) + "\n")
    mc = {"stage": "eval", "model": unknown, "data": {"path": str(choices), "split": "train"}}
    _fails(tmp_path, mc, "is a served endpoint, but choices scored by log-likelihood need the model itself")


def test_harness_scores_a_served_model_as_the_model_itself(served, tmp_path: Path) -> None:
    """lm_eval through the harness's local-chat-completions against tunelab serve: the same scores as HFLM on
    the same adapter with its chat template."""
    server, adapter = served
    stage = {
        "stage": "lm_eval",
        "models": {"local": str(adapter), "served": {"openai_base_url": server.url, "model": "chatty"}},
        "tasks": "tunelab_arith",
        "limit": 6,
        "apply_chat_template": True,
        "gen_kwargs": {"max_gen_toks": 6},
    }
    recipe = tunelab.recipe_from_dict({"output_dir": str(tmp_path / "run"), "stages": {"score": stage}})
    metrics = tunelab.run(recipe).metrics["score"]
    scores = {k: v for k, v in metrics["local"].items() if k.startswith("tunelab_arith/")}
    assert scores and scores == {k: metrics["served"][k] for k in scores}
    assert metrics["served"]["examples"] == 6
    harness = json.loads((tmp_path / "run" / "score" / "harness-served.json").read_text())
    assert "--model local-chat-completions" in harness["tunelab"]["command"]
    mc = {**stage, "models": {"served": stage["models"]["served"]}, "tasks": "tunelab_arith_mc"}
    _fails(tmp_path, mc, "which return no log-likelihoods; task 'tunelab_arith_mc' is multiple_choice")
