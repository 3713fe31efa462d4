"""The real pretrained SmolLM2-135M-Instruct (a GGUF file from PyPI) through tunelab: GGUF loading,
its ChatML template in prompting, assistant-only masks on templates without generation markers,
SFT, merge and chat. A few steps each; the whole track is the slow test at the end."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import tunelab
from tests.helpers import CHAT_TEST, CHAT_TRAIN, SMOLLM2, tiny_training
from tunelab.cli.app import app
from tunelab.models.chat_templates import TUNELAB_TEMPLATE, assistant_mask

runner = CliRunner()
CONVERSATION = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "Mia has 3 pens. She buys 2 more. How many pens does Mia have now?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And if she gives 1 away?"},
    {"role": "assistant", "content": "4"},
]
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def masked_text(tokenizer, ids: list[int], mask: list[int]) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_model_keys_are_from_pretrained_arguments() -> None:
    """Every key a `model:` mapping takes is a keyword argument transformers' from_pretrained reads."""
    from transformers import PreTrainedModel

    from tunelab.models.spec import LOAD_KEYS

    source = inspect.getsource(PreTrainedModel.from_pretrained)
    params = inspect.signature(PreTrainedModel.from_pretrained).parameters
    for key in LOAD_KEYS[1:]:
        assert key in params or f'kwargs.pop("{key}"' in source, key


@pytest.mark.slow  # the plain copy is every SmolLM2 test's model; test_export's F16 round trip reads it back
def test_gguf_plain_copy_is_the_dequantized_model(smollm2: Path) -> None:
    from tunelab.models.gguf_files import origin

    assert json.loads((smollm2 / "config.json").read_text()).get("quantization_config") is None
    assert origin(smollm2)["source"] == SMOLLM2["path"]
    plain = AutoModelForCausalLM.from_pretrained(smollm2)
    assert plain.config.tie_word_embeddings and plain.lm_head.weight is plain.model.embed_tokens.weight
    folder = tunelab.core.hub.local_path(SMOLLM2["path"])
    flagged = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2["gguf_file"], dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1789]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, flagged(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_assistant_mask_on_chatml_covers_answers_and_end_of_turn_only(smollm2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids, mask = assistant_mask(tokenizer, CONVERSATION, "data")
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert masked_text(tokenizer, ids, mask) == "5<|im_end|>4<|im_end|>"
    assert sum(mask) == 4  # two one-token answers and two end-of-turn tokens: nothing of system or user


def test_assistant_mask_on_a_llama3_style_template(smollm2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    markers = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": markers})  # as in Llama 3's tokenizer
    tokenizer.chat_template = LLAMA3_TEMPLATE
    ids, mask = assistant_mask(tokenizer, CONVERSATION, "data")
    assert masked_text(tokenizer, ids, mask) == "5<|eot_id|>4<|eot_id|>"
    assert "user" not in masked_text(tokenizer, ids, mask)


def test_assistant_mask_equals_trls_on_a_template_with_generation_markers(tiny_lm: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    tokenizer.chat_template = TUNELAB_TEMPLATE
    ids, mask = assistant_mask(tokenizer, CONVERSATION, "data")
    trl = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == trl["input_ids"] and mask == trl["assistant_masks"]


def test_sft_on_smollm2_assistant_only_then_merge_and_chat(tmp_path: Path, smollm2: Path) -> None:
    """LoRA SFT of the GGUF model on chats with assistant_only_loss (ChatML has no generation markers)."""
    training = tiny_training(max_steps=2, per_device_train_batch_size=4, max_length=96, assistant_only_loss=True)
    training.update(gradient_checkpointing=False, learning_rate=1e-3)
    stage = {"stage": "sft", "model": dict(SMOLLM2), "data": CHAT_TRAIN, "lora": {"r": 4}, "training": training}
    recipe = tunelab.recipe_from_dict({"output_dir": str(tmp_path / "run"), "seed": 0, "stages": {"sft": stage}})
    result = tunelab.run(recipe)
    adapter = result.outputs["sft"]
    assert result.metrics["sft"]["train_loss"] > 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == smollm2  # PeftModel users load the plain copy
    recorded = json.loads((adapter / "tunelab_base.json").read_text())
    assert recorded["gguf_file"].endswith(SMOLLM2["gguf_file"])  # and how to rebuild it

    base = AutoModelForCausalLM.from_pretrained(smollm2)
    tuned = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1789]])
    with torch.no_grad():
        expected = tuned(ids).logits
    merged_dir = tmp_path / "merged"
    out = runner.invoke(app, ["merge", str(adapter), str(merged_dir)])
    assert out.exit_code == 0, out.output
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        assert (merged(ids).logits - expected).abs().max() < 1e-4
    assert (
        AutoTokenizer.from_pretrained(merged_dir).chat_template == AutoTokenizer.from_pretrained(smollm2).chat_template
    )

    answer = runner.invoke(
        app, ["chat", str(adapter), "--prompt", "Mia has 3 pens. How many pens?", "max_new_tokens=4"]
    )
    assert answer.exit_code == 0, answer.output
    assert answer.output.strip()


def test_sft_mask_reaches_the_trainer(smollm2: Path) -> None:
    """The rows TRL trains on carry labels on the assistant's tokens only (counted, not assumed)."""
    from datasets import Dataset

    from tunelab.models.chat_templates import tokenize_assistant_only

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ds = tokenize_assistant_only(Dataset.from_list([{"messages": CONVERSATION}] * 2), tokenizer, "data")
    assert ds.column_names == ["input_ids", "assistant_masks"]
    assert [sum(m) for m in ds["assistant_masks"]] == [4, 4]


def test_eval_prompts_through_the_template_and_keeps_what_the_model_saw(tmp_path: Path, smollm2: Path) -> None:
    stage = {
        "stage": "eval",
        "models": {"chat": str(smollm2)},
        "data": CHAT_TEST,
        "generation": {"max_new_tokens": 6},
        "system": "Reply with the number only.",
        "fewshot": {"k": 1},
    }
    plain = {**stage, "models": {"plain": str(smollm2)}, "chat_template": False}
    plain.pop("system")
    recipe = tunelab.recipe_from_dict({"output_dir": str(tmp_path / "run"), "stages": {"a": stage, "b": plain}})
    result = tunelab.run(recipe)
    rows = [json.loads(line) for line in (result.run_dir / "a" / "predictions-chat.jsonl").read_text().splitlines()]
    first = rows[0]["prompt"]
    assert first.startswith("<|im_start|>system\nReply with the number only.<|im_end|>\n<|im_start|>user\n")
    assert first.count("<|im_start|>user") == 2 and first.endswith("<|im_start|>assistant\n")  # one shot + question
    plain_rows = (result.run_dir / "b" / "predictions-plain.jsonl").read_text().splitlines()
    assert "<|im_start|>" not in json.loads(plain_rows[0])["prompt"]
    assert result.metrics["a"]["chat"]["examples"] == 8


# The QLoRA recipe (~8 s more) is in `make test-all`: QLoRA training stays in the default suite (test_quant, the
# GPU check's dry run) and test_recipe validates the recipe against the installed libraries.
@pytest.mark.parametrize("name", ["sft/lora-qwen", pytest.param("sft/qlora-qwen", marks=pytest.mark.slow)])
def test_gpu_recipes_run_as_shipped_on_the_real_model(tmp_path: Path, smollm2: Path, name: str) -> None:
    """The shipped GPU recipes (assistant_only_loss on a template without generation markers, eval during
    training, QLoRA with paged 8-bit AdamW) with only the model, data and sizes swapped for this machine."""
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"model.path={smollm2}",
        "model.dtype=float32",
        "data.path=recipes/data/arith_chat",
        "data.split=train[:8]",
        "eval_data.path=recipes/data/arith_chat",
        "eval_data.split=test[:4]",
        "training.max_steps=1",
        "training.num_train_epochs=1",
        "training.per_device_train_batch_size=2",
        "training.gradient_accumulation_steps=1",
        "training.max_length=96",
        "training.eval_steps=1",
        "training.save_strategy=no",
        "training.bf16=false",
        "training.report_to=none",
    ]
    if name == "sft/qlora-qwen":
        overrides.append("quantization.bnb_4bit_compute_dtype=float32")
    result = tunelab.run(name, overrides)
    metrics = next(iter(result.metrics.values()))
    assert metrics["global_step"] == 1 and metrics["eval_loss"] > 0


@pytest.mark.slow
def test_real_model_track_shrunk(tmp_path: Path) -> None:
    """The shipped real-model recipe end to end with a few steps per stage."""
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        "sft.training.max_steps=4",
        "qlora.training.max_steps=2",
        "dpo.training.max_steps=2",
        "grpo.training.max_steps=2",
        "reward.training.max_steps=2",
        "reward.eval_data.split=test[:8]",
        "ppo.training.total_episodes=32",
        "eval.data.split=test[:8]",
        "sft.training.save_strategy=no",
    ]
    result = tunelab.run("real/smollm2-arith", overrides)
    assert set(result.metrics["eval"]) == {"base", "sft", "qlora", "dpo", "grpo", "ppo"}
    assert result.metrics["ppo"]["global_step"] == 2 and result.metrics["reward"]["pairwise_accuracy"] >= 0


def test_attention_on_a_gguf_file_reads_the_chat_turn(smollm2: Path) -> None:
    from tunelab.models.attention import attention_maps

    tokens, maps = attention_maps(f"{SMOLLM2['path']}/{SMOLLM2['gguf_file']}", "Hi")
    assert tokens[0] == "<|im_start|>" and "Hi" in tokens and len(maps) == 30
    plain, _ = attention_maps(str(smollm2), "Hi", chat=False)
    assert plain == ["Hi"]
