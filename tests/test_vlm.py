"""Vision-language fine-tuning (`vlm_build`, `vlm_sft`, image+text eval, `tunelab chat --image`).

No pretrained VLM ships on PyPI, so the models are built here: the fast tests use a LLaVA whose
language model is a 2-layer Llama built from a config with SmolLM2's tokenizer and chat template,
and a 2-layer SigLIP vision tower; the slow ones use the real SmolLM2-135M-Instruct as the
language model. Outputs are reloaded with the libraries' loaders (`LlavaForConditionalGeneration`,
`AutoModelForImageTextToText`, `AutoProcessor`, `PeftModel`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.helpers import TINY_VISION, fails, same, tiny_training, weights
from tunelab.cli.app import app

runner = CliRunner()
VQA = "recipes/data/digits_vqa"
VQA_TRAIN = {"path": VQA, "split": "train[:16]"}
VQA_TEST = {"path": VQA, "split": "test[:4]"}
LM_ONLY = r".*language_model.*\.(q_proj|v_proj)"  # peft regex: LoRA on the language model only


def _write(tmp_path: Path, stages: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "seed": 3, "stages": stages}, sort_keys=False))
    return path


def _sft(model: str, **extra) -> dict:
    training = tiny_training(max_steps=3, learning_rate=1e-3, max_length=None)
    return {"stage": "vlm_sft", "model": model, "data": VQA_TRAIN, "training": training, **extra}


def test_llava_built_from_a_causal_lm_keeps_its_text_logits(tiny_vlm: Path, tiny_text_lm: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    vlm = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    lm = AutoModelForCausalLM.from_pretrained(tiny_text_lm)
    processor = AutoProcessor.from_pretrained(tiny_vlm)
    ids = processor.tokenizer("Which digit is this?", return_tensors="pt")
    with torch.no_grad():
        a, b = vlm(**ids).logits[..., : lm.config.vocab_size], lm(**ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert type(vlm).__name__ == "LlavaForConditionalGeneration" and type(processor).__name__ == "LlavaProcessor"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == vlm.config.image_token_id
    from tunelab.vision.prompting import turns  # eval/chat prompts: images first, or where <image> marks them

    assert turns("Q?", 1)[-1]["content"] == [{"type": "image"}, {"type": "text", "text": "Q?"}]
    assert turns("Q?<image>", 1)[-1]["content"] == [{"type": "text", "text": "Q?"}, {"type": "image"}]


def test_batches_of_mixed_image_sizes_carry_loss_on_assistant_tokens_only(tiny_vlm: Path, tmp_path: Path) -> None:
    """Images of 20, 28 and 40 px in one batch (resized by the processor), one row with two turns: labels
    fall on each assistant answer and its <|im_end|>, nowhere else (no system, user or image token)."""
    import datasets
    from PIL import Image

    from tunelab.vision.collator import collator
    from tunelab.vision.data import load_images
    from tunelab.vision.models import load_processor

    rows = []
    for i, size in enumerate((20, 28, 40)):
        Image.new("L", (size, size), color=40 * i).save(tmp_path / f"{i}.png")
        user = {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Which digit?"}]}
        turns = [user, {"role": "assistant", "content": [{"type": "text", "text": str(i)}]}]
        if i == 2:  # a second exchange, without an image
            turns += [
                {"role": "user", "content": [{"type": "text", "text": "Is it even?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "yes"}]},
            ]
        rows.append({"images": [f"{i}.png"], "messages": turns})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_images(
        datasets.load_dataset("json", data_files=str(tmp_path / "train.jsonl"), split="train"),
        str(tmp_path / "train.jsonl"),
        "data",
    )
    processor = load_processor(tiny_vlm, "model")

    class Args:
        max_length, pad_to_multiple_of, dataset_text_field = None, None, "text"

    batch = collator(processor, Args, True, "data")([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    tok = processor.tokenizer
    kept = [tok.decode([t for t in row.tolist() if t != -100]) for row in batch["labels"]]
    assert kept == ["0<|im_end|>", "1<|im_end|>", "2<|im_end|>yes<|im_end|>"]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum() == 3 * 4  # 4 patches per image, every row expanded
    full = collator(processor, Args, False, "data")([ds[i] for i in range(3)])  # TRL's own labels: every token
    assert (full["labels"] != -100).sum() > 5 * (batch["labels"] != -100).sum()


def test_lora_vlm_sft_trains_evaluates_reloads_and_chats(tiny_vlm: Path, tmp_path: Path) -> None:
    """LoRA on the language model + the projector trained whole; eval before/after on image+text prompts;
    the adapter reloads with PeftModel over LlavaForConditionalGeneration; report.md shows sample images;
    `tunelab chat --image` answers."""
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    lora = {"r": 4, "lora_alpha": 8, "target_modules": LM_ONLY, "modules_to_save": ["multi_modal_projector"]}
    stages = {
        "vlm": _sft(str(tiny_vlm), lora=lora, freeze_vision=True),
        "eval": {
            "stage": "eval",
            "models": {"before": str(tiny_vlm), "after": "${vlm}"},
            "data": VQA_TEST,
            "generation": {"max_new_tokens": 3},
        },
    }
    path = _write(tmp_path, stages)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"before", "after"} and metrics["eval"]["after"]["examples"] == 4
    assert metrics["vlm"]["frozen_vision_params"] > 0 and metrics["vlm"]["global_step"] == 3
    rows = [json.loads(line) for line in (out / "eval" / "predictions-after.jsonl").read_text().splitlines()]
    assert rows[0]["images"][0].endswith(".png") and "reference" in rows[0]
    report = (out / "report.md").read_text()
    assert "sample images and answers" in report and "eval/samples/00.png" in report
    assert (out / "eval" / "samples" / "00.png").is_file()

    base = LlavaForConditionalGeneration.from_pretrained(tiny_vlm)
    before = {k: v.clone() for k, v in base.model.vision_tower.state_dict().items()}
    model = PeftModel.from_pretrained(base, out / "vlm")
    processor = AutoProcessor.from_pretrained(out / "vlm")
    after = model.base_model.model.model.vision_tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen tower
    trained = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert trained and all("language_model" in n for n in trained)  # LoRA on the language model only
    assert any("multi_modal_projector" in n and "modules_to_save" in n for n, _ in model.named_parameters())
    assert processor.chat_template and "<image>" in processor.chat_template

    first = json.loads(Path(VQA, "test.jsonl").read_text().splitlines()[0])
    chat = runner.invoke(
        app,
        [
            "chat",
            str(out / "vlm"),
            "--image",
            f"{VQA}/{first['images'][0]}",
            "--prompt",
            first["prompt"],
            "max_new_tokens=3",
        ],
    )
    assert chat.exit_code == 0, chat.output
    assert chat.output.strip() == rows[0]["output"].strip()  # the eval's greedy answer to the same image and prompt


def test_full_fine_tune_with_frozen_vision_reloads_with_the_family_class(tiny_vlm: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    path = _write(tmp_path, {"vlm": _sft(str(tiny_vlm), freeze_vision=True)})
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    base = LlavaForConditionalGeneration.from_pretrained(tiny_vlm)
    tuned = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out" / "vlm")
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path / "out" / "vlm")).__name__ == type(tuned).__name__
    tower = [
        torch.equal(a, b)
        for a, b in zip(base.model.vision_tower.parameters(), tuned.model.vision_tower.parameters(), strict=True)
    ]
    projector = [
        torch.equal(a, b)
        for a, b in zip(
            base.model.multi_modal_projector.parameters(), tuned.model.multi_modal_projector.parameters(), strict=True
        )
    ]
    assert all(tower) and not any(projector)


@pytest.mark.slow  # 18 s: bitsandbytes' CPU 4-bit path
def test_qlora_and_lora_on_the_vision_tower(tiny_vlm: Path, tmp_path: Path) -> None:
    """QLoRA (4-bit base on CPU) with LoRA on every linear layer, vision tower included."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    lora = {"r": 4, "target_modules": "all-linear", "modules_to_save": ["multi_modal_projector"]}
    quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    path = _write(tmp_path, {"vlm": _sft(str(tiny_vlm), lora=lora, quantization=quant)})
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_vlm), tmp_path / "out" / "vlm")
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert any("vision_tower" in n for n in names) and any("language_model" in n for n in names)


def test_nan_loss_stops_in_one_line_naming_the_last_good_checkpoint(
    tiny_vlm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vlm_sft trains through the divergence guard as every Trainer stage does: a loss that turns NaN after
    the first step stops the run with one line naming checkpoint-1, exit 2, and no model saved."""
    from trl import SFTTrainer

    original = SFTTrainer.compute_loss

    def nan_after_first_step(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = original(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.state.global_step < 1:
            return out
        return (out[0] * float("nan"), out[1]) if return_outputs else out * float("nan")

    monkeypatch.setattr(SFTTrainer, "compute_loss", nan_after_first_step)
    training = tiny_training(max_steps=3, learning_rate=1e-3, max_length=None, save_strategy="steps", save_steps=1)
    result = runner.invoke(app, ["run", str(_write(tmp_path, {"vlm": _sft(str(tiny_vlm), training=training)}))])
    errors = [line[line.index("error: ") :] for line in result.output.splitlines() if "error: " in line]
    assert result.exit_code == 2 and "Traceback" not in result.output and len(errors) == 1, result.output
    assert re.search(r"error: 'stages.vlm' stopped: '(loss|grad_norm)' became nan at step 2", errors[0]), errors[0]
    assert re.search(r"the last good checkpoint is .*checkpoint-1\. Lower training.learning_rate", errors[0]), errors[0]
    record = json.loads((tmp_path / "out" / "vlm" / "stage.json").read_text())
    assert record["status"] == "failed" and not (tmp_path / "out" / "vlm" / "model.safetensors").exists()


def test_plan_counts_the_vision_tower(tiny_vlm: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, {"vlm": _sft(str(tiny_vlm))})
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    assert "vision tower + projector" in result.output


def _bad(tmp_path: Path, rows: list[dict], images: dict[str, object] | None = None) -> dict:
    from PIL import Image

    for name, value in (images or {}).items():
        if isinstance(value, bytes):
            (tmp_path / name).write_bytes(value)
        else:
            value.save(tmp_path / name) if isinstance(value, Image.Image) else None
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"path": str(tmp_path / "data.jsonl")}


def _row(images: list[str], placeholders: int = 1) -> dict:
    user = [{"type": "image", "text": None}] * placeholders + [{"type": "text", "text": "Which digit?"}]
    return {
        "images": images,
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": "3"}]},
        ],
    }


def test_bad_input_is_one_line_at_validate(tiny_vlm: Path, tiny_text_lm: Path, tmp_path: Path) -> None:
    from PIL import Image

    def validate(stage: dict, message: str) -> None:
        fails(["validate", str(_write(tmp_path, {"vlm": stage}))], message)

    good = Image.new("L", (16, 16))
    data = _bad(tmp_path, [_row(["a.png"]), _row(["gone.png"])], {"a.png": good})
    validate(_sft(str(tiny_vlm), data=data), r"row 1: image 'gone.png' does not exist")
    data = _bad(tmp_path, [_row(["a.png"]), _row(["broken.png"])], {"a.png": good, "broken.png": b"not a png"})
    validate(_sft(str(tiny_vlm), data=data), r"row 1: image 'broken.png' cannot be read")
    data = _bad(tmp_path, [_row(["a.png"]), _row(["a.png", "a.png"])], {"a.png": good})
    validate(_sft(str(tiny_vlm), data=data), r"row 1 has 1 image placeholder\(s\) in its messages but 2 image")
    validate(
        _sft(str(tiny_vlm), data={"path": "recipes/data/arith_chat", "split": "train[:4]"}), "has no `images` column"
    )
    validate(_sft(str(tiny_text_lm)), r"is a text-only model \(LlamaForCausalLM\)")
    validate(_sft(str(tiny_text_lm), freeze_vision=True), "has no vision tower")
    sft_stage = {"stage": "sft", "model": str(tiny_text_lm), "data": VQA_TRAIN, "training": tiny_training()}
    validate(sft_stage, "holds images: train image+text models with the `vlm_sft` stage")
    validate(_sft(str(tiny_vlm), training=tiny_training(packing=True)), "does not pack")
    lora = {"r": 4, "target_modules": "all-linear"}
    validate(_sft(str(tiny_vlm), lora=lora, freeze_vision=True), "trains the vision tower")
    chat_test = {"path": "recipes/data/arith_chat", "split": "test[:4]"}
    validate({"stage": "eval", "model": str(tiny_vlm), "data": chat_test}, "has no `images` column, but the models")
    mixed = {"stage": "eval", "models": {"vlm": str(tiny_vlm), "text": str(tiny_text_lm)}, "data": VQA_TEST}
    validate(mixed, "mixes image+text models and a text-only one ('text')")
    # A processor that cannot be found beside the model: a folder with the weights only.
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_vlm / name, bare / name)
    validate(_sft(str(bare)), "has no processor beside the model")
    # An image mode the processor rejects: two channels (LA) without RGB conversion.
    nocvt = tmp_path / "nocvt"
    shutil.copytree(tiny_vlm, nocvt)
    config = json.loads((nocvt / "processor_config.json").read_text())
    config["image_processor"]["do_convert_rgb"] = False
    (nocvt / "processor_config.json").write_text(json.dumps(config))
    rgb, la = Image.new("RGB", (16, 16)), Image.new("LA", (16, 16))
    data = _bad(tmp_path, [_row(["rgb.png"]), _row(["la.png"])], {"rgb.png": rgb, "la.png": la})
    validate(_sft(str(nocvt), data=data), r"row 1: the processor rejects it \(images of mode LA\)")


def test_validate_checks_a_vlm_build_pipeline_before_it_runs(tiny_text_lm: Path, tmp_path: Path) -> None:
    """The processor a vlm_build stage will write is made (without weights) at validate, so the data of
    the stages after it is checked before anything trains."""
    stages = {
        "build": {"stage": "vlm_build", "language": str(tiny_text_lm), "vision": TINY_VISION},
        "vlm": _sft("${build}", freeze_vision=True),
        "eval": {"stage": "eval", "models": {"before": "${build}", "after": "${vlm}"}, "data": VQA_TEST},
    }
    result = runner.invoke(app, ["validate", str(_write(tmp_path, stages))])
    assert result.exit_code == 0, result.output
    from PIL import Image

    stages["vlm"]["data"] = _bad(tmp_path, [_row(["a.png"], placeholders=2)], {"a.png": Image.new("L", (8, 8))})
    fails(["validate", str(_write(tmp_path, stages))], "row 0 has 2 image placeholder")


# ---------------------------------------------------------------- slow: real SmolLM2, kill/resume, 2 processes


@pytest.fixture(scope="session")
def smol_vlm(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    """SmolLM2-135M-Instruct with a tiny SigLIP tower and projector (the recipe's base model)."""
    from tunelab.vision.models import build_llava

    return build_llava({"path": str(smollm2)}, tmp_path_factory.mktemp("smol-vlm") / "vlm")


CLI = [sys.executable, "-m", "tunelab.cli.app"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_vlm: Path, tmp_path: Path) -> None:
    import time

    lora = {"r": 4, "target_modules": LM_ONLY, "modules_to_save": ["multi_modal_projector"]}
    training = tiny_training(max_steps=30, learning_rate=1e-3, max_length=None, save_strategy="steps", save_steps=5)
    stage = {**_sft(str(tiny_vlm), lora=lora), "training": training, "data": {"path": VQA, "split": "train[:64]"}}
    straight, killed = _write(tmp_path, {"s": stage}, "straight.yaml"), tmp_path / "killed.yaml"
    killed.write_text(straight.read_text().replace(str(tmp_path / "out"), str(tmp_path / "killed")))
    subprocess.run([*CLI, "run", str(straight)], env=ENV, check=True, capture_output=True)
    proc = subprocess.Popen([*CLI, "run", str(killed)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "killed" / "s").glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([*CLI, "run", str(killed), "--resume"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    record = json.loads((tmp_path / "killed" / "s" / "stage.json").read_text())
    assert record["metrics"]["resumed_from_step"] >= 5
    assert same(weights(tmp_path / "out" / "s"), weights(tmp_path / "killed" / "s"), atol=1e-5)


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(tiny_vlm: Path, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.torch import load_file

    lora = {"r": 4, "target_modules": LM_ONLY, "modules_to_save": ["multi_modal_projector"]}

    def recipe(name: str, batch: int) -> Path:
        training = tiny_training(max_steps=6, per_device_train_batch_size=batch, learning_rate=1e-3, max_length=None)
        stage = {**_sft(str(tiny_vlm), lora=lora), "training": training, "data": {"path": VQA, "split": "train[:48]"}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / name), "seed": 1, "stages": {"s": stage}}))
        return path

    for argv in ([*CLI, "run", str(recipe("one", 8))], [*CLI, "launch", "--num-processes", "2", str(recipe("two", 4))]):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=ENV)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())["s"]
    assert metrics["world_size"] == 2 and metrics["ranks_in_sync"] == 1
    a, b = (load_file(tmp_path / n / "s" / "adapter_model.safetensors") for n in ("one", "two"))
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5 / sum(float((a[k] ** 2).sum()) for k in a) ** 0.5
    assert diff < 0.05, diff
    assert np.isfinite(metrics["train_loss"])


@pytest.mark.slow
def test_shipped_recipe_gains_and_its_output_loads_and_chats(tmp_path: Path) -> None:
    """The shipped CPU recipe end to end: exact match before -> after rises; the adapter loads with
    PeftModel over the family's class; `tunelab chat --image` answers a held-out digit."""
    out = tmp_path / "run"
    result = subprocess.run(
        [*CLI, "run", "recipes/vlm/smollm2-digits.yaml", f"output_dir={out}"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["eval"]
    assert metrics["after"]["exact_match"] >= metrics["before"]["exact_match"] + 0.4, metrics  # 0 -> 0.525 measured
    digits = [json.loads(line) for line in (out / "eval" / "predictions-after.jsonl").read_text().splitlines()]
    digits = [r["exact_match"] for r in digits if r["prompt"] == "Which digit is this?"]
    assert sum(digits) / len(digits) > 0.2  # reads the image: chance is 0.10
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(out / "build"), out / "vlm_sft")
    AutoProcessor.from_pretrained(out / "vlm_sft")
    row = json.loads(Path(VQA, "test.jsonl").read_text().splitlines()[0])
    chat = subprocess.run(
        [*CLI, "chat", str(out / "vlm_sft"), "--image", f"{VQA}/{row['images'][0]}", "--prompt", row["prompt"]],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip()
