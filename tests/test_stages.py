"""Each stage trained for a few steps on tiny models; outputs reloaded with the libraries' loaders."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import tunelab
from tests.helpers import QA_TEST, QA_TRAIN, TINY_LLAMA, tiny_training
from tunelab.cli.app import app
from tunelab.evaluation.answers import answer


def run_stage(tmp_path: Path, stage: dict, name: str = "stage") -> tunelab.RunResult:
    recipe = tunelab.recipe_from_dict({"output_dir": str(tmp_path / "run"), "seed": 0, "stages": {name: stage}})
    return tunelab.run(recipe)


def logits(model: torch.nn.Module, tokenizer, text: str = "Question: Mia has 3 pens.") -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_pretrain_writes_a_standard_model_folder(tiny_lm: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    assert model.config.model_type == "llama" and model.config.hidden_size == TINY_LLAMA["hidden_size"]
    assert model.config.vocab_size == len(tokenizer) <= 300
    assert tokenizer.decode(tokenizer("Mia has 7 pears.")["input_ids"]) == "Mia has 7 pears."
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.chat_template is None  # a base model: prompted with plain text
    stage = json.loads((tiny_lm / "stage.json").read_text())
    assert stage["status"] == "completed" and stage["metrics"]["global_step"] == 4
    assert stage["metrics"]["train_loss"] > 0


def test_sft_lora_adapter_reloads_and_merges_exactly(tmp_path: Path, tiny_lm: Path) -> None:
    result = run_stage(
        tmp_path,
        {
            "stage": "sft",
            "model": str(tiny_lm),
            "data": QA_TRAIN,
            "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
            "training": tiny_training(max_steps=3, learning_rate=1e-2),
        },
        name="sft",
    )
    adapter = result.outputs["sft"]
    assert (adapter / "adapter_config.json").exists() and (adapter / "tokenizer.json").exists()
    assert not (adapter / "model.safetensors").exists()  # only the adapter is saved
    assert result.metrics["sft"]["trainable_params"] < result.metrics["sft"].get("params", 1e12)

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    base_logits = logits(base, tokenizer)
    peft_model = PeftModel.from_pretrained(base, adapter)
    adapter_logits = logits(peft_model, tokenizer)
    assert not torch.allclose(base_logits, adapter_logits, atol=1e-4)  # the adapter learned something

    merged_dir = tmp_path / "merged"
    out = CliRunner().invoke(app, ["merge", str(adapter), str(merged_dir)])
    assert out.exit_code == 0, out.output
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(
        logits(merged, AutoTokenizer.from_pretrained(merged_dir)), adapter_logits, atol=1e-5, rtol=1e-5
    )
    again = CliRunner().invoke(app, ["merge", str(adapter), str(merged_dir)])
    assert again.exit_code == 2 and "exists and is not empty" in again.output


def test_sft_full_fine_tuning_saves_a_full_model(tmp_path: Path, tiny_lm: Path) -> None:
    result = run_stage(
        tmp_path,
        {
            "stage": "sft",
            "model": str(tiny_lm),
            "data": QA_TRAIN,
            "training": tiny_training(max_steps=2, learning_rate=1e-3),
        },
    )
    out = result.outputs["stage"]
    tuned = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not torch.allclose(logits(tuned, tokenizer), logits(base, tokenizer), atol=1e-4)


@pytest.mark.parametrize("fmt", ["messages", "text-packed"])
def test_sft_conversational_and_packed_text(tmp_path: Path, tiny_lm: Path, fmt: str) -> None:
    data = tmp_path / "data.jsonl"
    rows = [json.loads(line) for line in Path("recipes/data/arith_qa/train.jsonl").read_text().splitlines()[:24]]
    with data.open("w") as f:
        for row in rows:
            if fmt == "messages":
                record = {
                    "messages": [
                        {"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row["completion"].strip()},
                    ]
                }
            else:
                record = {"text": row["prompt"] + row["completion"]}
            f.write(json.dumps(record) + "\n")
    training = tiny_training(packing=fmt == "text-packed", max_length=128)
    if fmt == "messages":
        training["assistant_only_loss"] = True
    stage = {"stage": "sft", "model": str(tiny_lm), "data": str(data), "lora": {"r": 4}, "training": training}
    if fmt == "messages":
        stage["chat_template"] = "tunelab"  # the base model has none; this one has generation markers
    result = run_stage(tmp_path, stage)
    metrics = result.metrics["stage"]
    assert metrics["global_step"] == 2 and metrics["train_loss"] > 0
    if fmt == "messages":  # the template is saved with the tokenizer, for eval and chat
        assert AutoTokenizer.from_pretrained(result.outputs["stage"]).chat_template


def test_eval_scores_exact_match_and_batching_does_not_change_answers(tmp_path: Path, tiny_lm: Path) -> None:
    stage = {"stage": "eval", "models": {"tiny": str(tiny_lm)}, "data": QA_TEST, "generation": {"max_new_tokens": 4}}
    batched = run_stage(tmp_path / "a", {**stage, "batch_size": 8})
    single = run_stage(tmp_path / "b", {**stage, "batch_size": 1})
    rows = [
        json.loads(line) for line in (batched.run_dir / "stage" / "predictions-tiny.jsonl").read_text().splitlines()
    ]
    rows1 = [
        json.loads(line) for line in (single.run_dir / "stage" / "predictions-tiny.jsonl").read_text().splitlines()
    ]
    assert [r["output"] for r in rows] == [r["output"] for r in rows1]
    assert len(rows) == 16
    score = sum(r["answer"] == r["reference"] for r in rows) / len(rows)
    assert batched.metrics["stage"]["tiny"] == {"exact_match": score, "examples": 16}


def test_predictions_rows_are_scored_as_metrics_json_is(tmp_path: Path, tiny_lm: Path) -> None:
    """Each row's `answer` is the pattern's match and its `exact_match` uses the metric's own options, so the
    predictions file agrees with metrics.json (here every answer matches once digits are ignored)."""
    stage = {
        "stage": "eval",
        "models": {"tiny": str(tiny_lm)},
        "data": QA_TEST,
        "generation": {"max_new_tokens": 4},
        "answer_pattern": r"(\S*)",
        "metrics": [{"exact_match": {"regexes_to_ignore": [r"\S"]}}],
    }
    result = run_stage(tmp_path, stage)
    rows = [json.loads(line) for line in (result.run_dir / "stage" / "predictions-tiny.jsonl").read_text().splitlines()]
    assert all(r["answer"] == answer(r["output"], r"(\S*)") for r in rows)
    assert [r["exact_match"] for r in rows] == [1.0] * 16
    assert result.metrics["stage"]["tiny"]["exact_match"] == 1.0


def test_sft_reports_examples_truncated_to_nothing(tmp_path: Path, tiny_lm: Path) -> None:
    with pytest.raises(tunelab.TunelabError, match="raise training.max_length"):
        run_stage(
            tmp_path, {"stage": "sft", "model": str(tiny_lm), "data": QA_TRAIN, "training": tiny_training(max_length=8)}
        )


def test_eval_computes_evaluate_metrics_on_the_answers(tmp_path: Path, tiny_lm: Path) -> None:
    stage = {
        "stage": "eval",
        "models": {"tiny": str(tiny_lm)},
        "data": QA_TEST,
        "generation": {"max_new_tokens": 4},
        "metrics": ["exact_match", "bleu", {"rouge": {"rouge_types": ["rouge1"]}}, "chrf"],
    }
    result = run_stage(tmp_path, stage)
    got = result.metrics["stage"]["tiny"]
    assert set(got) == {"exact_match", "bleu", "bleu_brevity_penalty", "rouge1", "chrf", "examples"}
    rows = [json.loads(line) for line in (result.run_dir / "stage" / "predictions-tiny.jsonl").read_text().splitlines()]
    import sacrebleu

    expected = sacrebleu.corpus_bleu([r["answer"] for r in rows], [[r["reference"] for r in rows]]).score
    assert got["bleu"] == pytest.approx(expected)


def test_generation_strategies_are_deterministic_under_a_seed(tmp_path: Path, tiny_lm: Path) -> None:
    def outputs(name: str, generation: dict) -> list[str]:
        stage = {"stage": "eval", "models": {"m": str(tiny_lm)}, "data": QA_TEST, "generation": generation}
        result = run_stage(tmp_path / name, stage)
        path = result.run_dir / "stage" / "predictions-m.jsonl"
        return [json.loads(line)["output"] for line in path.read_text().splitlines()]

    sampling = {"do_sample": True, "temperature": 1.5, "top_k": 50, "top_p": 0.95, "max_new_tokens": 6}
    first, second = outputs("s1", sampling), outputs("s2", sampling)
    assert first == second  # same recipe seed, same samples
    assert first != outputs("greedy", {"max_new_tokens": 6})  # and sampling is really on
    beams = outputs("beam", {"num_beams": 3, "max_new_tokens": 6})
    assert len(beams) == 16 and beams == outputs("beam2", {"num_beams": 3, "max_new_tokens": 6})
    stopped = outputs("stop", {"max_new_tokens": 12, "stop_strings": ["."]})
    assert all(o.count(".") <= 1 for o in stopped)


def test_compare_tabulates_runs(tmp_path: Path) -> None:
    for name, em in (("a", 0.25), ("b", 0.75)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(
            json.dumps({"sft": {"train_loss": 1.5, "epoch": 2.0}, "eval": {"sft": {"exact_match": em, "examples": 4}}})
        )
    out = CliRunner().invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert out.exit_code == 0, out.output
    assert "0.25" in out.output and "0.75" in out.output and "train_loss" in out.output and "epoch" not in out.output
    everything = CliRunner().invoke(app, ["compare", "--all", str(tmp_path / "a")])
    assert "epoch" in everything.output
    missing = CliRunner().invoke(app, ["compare", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no readable metrics.json" in missing.output


def test_fewshot_prompts_and_answer_patterns(tmp_path: Path, tiny_lm: Path) -> None:
    stage = {
        "stage": "eval",
        "models": {"m": str(tiny_lm)},
        "data": QA_TEST,
        "generation": {"max_new_tokens": 3},
        "fewshot": {"k": 2},
        "prompt_template": "{prompt}",
        "answer_pattern": r"(\d+)",
    }
    result = run_stage(tmp_path / "a", stage)
    rows = [json.loads(line) for line in (result.run_dir / "stage" / "predictions-m.jsonl").read_text().splitlines()]
    shots = rows[0]["prompt"].split("\n\n")
    assert len(shots) == 3 and all(r["prompt"].startswith("\n\n".join(shots[:2])) for r in rows)  # same 2 shots
    assert shots[0].startswith("Question:") and shots[0].split("Answer:")[1].strip().isdigit()
    again = run_stage(tmp_path / "b", stage)
    rows2 = (again.run_dir / "stage" / "predictions-m.jsonl").read_text()
    assert rows2 == (result.run_dir / "stage" / "predictions-m.jsonl").read_text()  # deterministic choice
    with pytest.raises(tunelab.TunelabError, match="k=99 examples asked for, but .* has only 16"):
        run_stage(tmp_path / "c", {**stage, "fewshot": {"k": 99, "data": QA_TEST}})


def test_eval_command_without_a_recipe(tmp_path: Path, tiny_lm: Path) -> None:
    out = CliRunner().invoke(
        app,
        [
            "eval",
            str(tiny_lm),
            "recipes/data/arith_qa",
            "data.split=test[:8]",
            "generation.max_new_tokens=3",
            "metrics=[exact_match, chrf]",
            "--output-dir",
            str(tmp_path / "ev"),
        ],
    )
    assert out.exit_code == 0, out.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["eval"]["model"]
    assert metrics["examples"] == 8 and "chrf" in metrics and "exact_match" in metrics


def test_answer_extraction() -> None:
    assert answer("so the answer is 12.", r"answer is (\d+)") == "12"
    assert answer("no number", r"(\d+)") == ""
    assert answer(" 17\nQuestion: more") == "17"
    assert answer("\n\n 5 ") == "5"
    assert answer("") == ""


def test_run_writes_manifest_metrics_and_recipe(tmp_path: Path, tiny_lm: Path) -> None:
    result = run_stage(
        tmp_path,
        {"stage": "sft", "model": str(tiny_lm), "data": QA_TRAIN, "lora": {"r": 4}, "training": tiny_training()},
    )
    run_dir = result.run_dir
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["seed"] == 0
    assert manifest["versions"]["trl"] == importlib.metadata.version("trl") and "transformers" in manifest["versions"]
    assert manifest["device"]["type"] in {"cpu", "cuda"}
    assert manifest["data"]["stage"]["data"] and manifest["started"] <= manifest["ended"]
    assert json.loads((run_dir / "metrics.json").read_text())["stage"]["global_step"] == 2
    assert tunelab.load_recipe(run_dir / "recipe.yaml").stages == result_recipe_stages(run_dir)
    again = tunelab.run(tunelab.load_recipe(run_dir / "recipe.yaml"), resume=True)  # nothing to run: all kept
    assert again.skipped == ["stage"]
    assert json.loads((run_dir / "run.json").read_text())["data"] == manifest["data"]


def result_recipe_stages(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "recipe.yaml").read_text())["stages"]


def test_sft_packs_by_default_only_where_attention_keeps_rows_apart(tmp_path: Path) -> None:
    from tunelab.stages import Context, StageSpec, stage

    sft = stage("sft")
    ctx = Context(seed=0, run_dir=tmp_path)
    flash = StageSpec("s", "sft", {"model": {"path": "m", "attn_implementation": "flash_attention_2"}}, tmp_path)
    sdpa = StageSpec("s", "sft", {"model": {"path": "m", "attn_implementation": "sdpa"}}, tmp_path)
    asked = StageSpec("s", "sft", {"model": {"path": "m"}, "training": {"packing": False}}, tmp_path)
    assert sft.args(flash, ctx).packing and sft.args(flash, ctx).packing_strategy == "bfd"
    assert not sft.args(sdpa, ctx).packing and not sft.args(asked, ctx).packing


def test_lora_on_a_merged_lora_names_it_as_its_base_and_reloads_exactly(tmp_path: Path, tiny_lm: Path) -> None:
    """SFT LoRA, then a second LoRA stage on ${first} (as DPO or GRPO on ${sft} are): the second adapter
    must load over base + first adapter, in tunelab's loaders and in `tunelab merge`."""
    from tunelab.models.loading import load_causal_lm

    def lora_stage(model: str) -> dict:
        training = tiny_training(max_steps=2, learning_rate=5e-2)
        return {"stage": "sft", "model": model, "data": QA_TRAIN, "lora": {"r": 4}, "training": training}

    recipe = tunelab.recipe_from_dict(
        {"output_dir": str(tmp_path / "run"), "stages": {"a": lora_stage(str(tiny_lm)), "b": lora_stage("${a}")}}
    )
    result = tunelab.run(recipe)
    first, second = result.outputs["a"], result.outputs["b"]
    assert json.loads((second / "adapter_config.json").read_text())["base_model_name_or_path"] == str(first)
    tokenizer = AutoTokenizer.from_pretrained(second)
    manual = PeftModel.from_pretrained(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), first).merge_and_unload(), second
    )
    expected = logits(manual, tokenizer)
    torch.testing.assert_close(logits(load_causal_lm({"path": str(second)}), tokenizer), expected)
    without_first = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), second)
    assert not torch.allclose(logits(without_first, tokenizer), expected, atol=1e-4)  # the first adapter matters
    out = CliRunner().invoke(app, ["merge", str(second), str(tmp_path / "merged")])
    assert out.exit_code == 0, out.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-5, rtol=1e-5)
