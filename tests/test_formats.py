"""Users' data formats (issue 23): each format's public shape, detected and converted into each stage's rows.

The files under tests/data/formats/ are small, in exactly the formats' shapes: OpenAI messages (with tools,
tool_calls and tool results), ShareGPT (with function_call and observation turns), Alpaca (system, history),
prompt/completion, preference pairs (plain, conversational, ShareGPT-style), KTO rows, and vision rows
(TRL's, and ShareGPT's with <image> marks). Conversions are checked row by row; every stage kind that takes a
format validates on it; one stage per target trains a few steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import tunelab
from tests.helpers import PPO_TRAINING, SMOLLM2, fails, run_stages, tiny_training, write
from tunelab.data.sources import load_data

DATA = Path(__file__).parent / "data" / "formats"
Q0 = "Ann has 8 cups. Ann buys 4 more. How many cups does Ann have now?"
Q1 = "Ben has 2 pens. Ben buys 3 more. How many pens does Ben have now?"

# A chat template that renders tools, written for these tests: the schemas in a system block, each call as
# <call>name(arguments as JSON)</call>, tool results in their own turn. No generation markers: tunelab derives
# the assistant mask.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|system|>Functions:{% for t in tools %} {{ t.function.name }}"
    "{{ t.function.parameters | tojson }}{% endfor %}<|end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|assistant|>"
    "{%- for c in m.tool_calls or [] %}<call>{{ c.function.name }}({{ c.function.arguments | tojson }})</call>"
    "{%- endfor %}{{ m.content }}<|end|>\n"
    "{%- elif m.role == 'tool' %}<|tool|>{{ m.content }}<|end|>\n"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)


def load(name: str | dict, target: str, **source: Any) -> tuple[Any, Any]:
    value: Any = str(DATA / name) if isinstance(name, str) else name
    if source:
        value = {"path": value, **source}
    return load_data(value, "stages.s.data", "train", target)


# --- conversions, row by row ---------------------------------------------------------------------------------
def test_auto_detects_each_format_and_says_from_which_columns() -> None:
    expect = {
        ("text.jsonl", "text"): ("text", "column text"),
        ("messages.jsonl", "lm"): ("messages", "column messages ({role, content} turns)"),
        ("sharegpt.json", "lm"): ("sharegpt", "column conversations ({from, value} turns)"),
        ("alpaca.json", "lm"): ("alpaca", "columns instruction, input, output, system, history"),
        ("prompt_completion.jsonl", "lm"): ("prompt_completion", "columns prompt, completion"),
        ("preference.jsonl", "preference"): ("preference", "columns prompt, chosen, rejected"),
        ("sharegpt_preference.json", "preference"): (
            "preference",
            "columns conversations, chosen, rejected (ShareGPT-style pairs)",
        ),
        ("kto.jsonl", "kto"): ("kto", "columns prompt, completion, label"),
        ("vision_sharegpt.json", "vision"): ("vision", "columns images, conversations"),
    }
    for (name, target), (fmt, why) in expect.items():
        _, report = load(name, target)
        (source,) = report.sources
        assert (source.format, source.detected_from, source.rows) == (fmt, why, report.rows), name
        assert report.as_dict()["sources"][0]["path"].endswith(name)


def test_sharegpt_and_alpaca_become_chats() -> None:
    ds, _ = load("sharegpt.json", "lm")
    assert ds.column_names == ["messages"]
    assert ds[0]["messages"] == [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": Q0},
        {"role": "assistant", "content": "12"},
    ]
    ds, _ = load("alpaca.json", "lm")
    assert ds[1]["messages"] == [  # system, then the history pair, then instruction + input joined by a newline
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "What is 1 plus 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": f"Answer with a number.\n{Q1}"},
        {"role": "assistant", "content": "5"},
    ]
    # Prompts for grpo/rloo/ppo: the conversation before the last answer, which becomes the reference.
    ds, _ = load("sharegpt.json", "prompt")
    assert ds[0] == {"prompt": ds[0]["prompt"], "completion": "12"} and ds[0]["prompt"][-1]["content"] == Q0
    ds, _ = load("messages.jsonl", "eval")
    assert ds[0] == {"prompt": Q0, "completion": "12"}


def test_tool_calls_in_openai_and_sharegpt_rows_convert_alike() -> None:
    openai, _ = load("messages_tools.jsonl", "lm")
    sharegpt, _ = load("sharegpt_tools.json", "lm")
    for ds in (openai, sharegpt):
        turns = ds[0]["messages"]
        assert [t["role"] for t in turns] == ["user", "assistant", "tool", "assistant"]
        call = turns[1]["tool_calls"][0]
        assert call["type"] == "function" and call["function"]["name"] == "add"
        assert json.loads(call["function"]["arguments"]) == {"a": 8, "b": 4}  # a JSON string, as OpenAI stores it
        assert turns[2]["content"] == "12"
        assert json.loads(ds[0]["tools"])[0]["function"]["name"] == "add"
    # Schemas of different shapes per row stay exact (no members Arrow would add from other rows).
    assert [t["function"]["name"] for t in json.loads(openai[1]["tools"])] == ["add", "count"]
    assert json.loads(openai[0]["tools"])[0]["function"]["parameters"]["required"] == ["a", "b"]
    assert openai[0]["messages"][2]["tool_call_id"] == "call_0"


def test_preference_rows_plain_conversational_and_sharegpt() -> None:
    ds, _ = load("preference.jsonl", "preference")
    assert ds[0] == {"prompt": Q0, "chosen": "12", "rejected": "13"}
    ds, _ = load("sharegpt_preference.json", "preference")
    assert ds[0] == {
        "prompt": [{"role": "user", "content": Q0}],
        "chosen": [{"role": "assistant", "content": "12"}],
        "rejected": [{"role": "assistant", "content": "13"}],
    }
    ds, _ = load("preference.jsonl", "preference", system="Be exact.")  # a system turn makes plain pairs chats
    assert ds[0]["prompt"] == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": Q0}]
    ds, _ = load("kto.jsonl", "kto")
    assert ds[1] == {"prompt": Q1, "completion": "6", "label": False}


def test_columns_system_and_roles(tmp_path: Path) -> None:
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "1+1?", "answer": "2", "id": 7}) + "\n")
    ds, report = load_data(
        {"path": str(qa), "columns": {"question": "prompt", "answer": "completion"}}, "stages.s.data", "train", "lm"
    )
    assert ds[0] == {"prompt": "1+1?", "completion": "2", "id": 7} and report.sources[0].format == "prompt_completion"
    ds, _ = load("sharegpt.json", "lm", system="Ignored: the rows have one.")
    assert ds[0]["messages"][0]["content"] == "Answer with a number."
    ds, _ = load("messages.jsonl", "lm", system="Be brief.")
    assert ds[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    bots = tmp_path / "bots.json"
    bots.write_text(json.dumps([{"conversations": [{"from": "asker", "value": "hi"}, {"from": "bot", "value": "yo"}]}]))
    ds, _ = load_data(
        {"path": str(bots), "roles": {"asker": "user", "bot": "assistant"}}, "stages.s.data", "train", "lm"
    )
    assert ds[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_vision_sharegpt_marks_become_image_parts() -> None:
    ds, _ = load("vision_sharegpt.json", "vision")
    assert ds[0]["messages"] == [
        {
            "role": "user",
            "content": [{"type": "image", "text": None}, {"type": "text", "text": "How bright is this?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "0"}]},
    ]


def test_streaming_sources_convert_without_loading() -> None:
    """`convert` maps an IterableDataset lazily (the mix helper streams sources through it)."""
    import datasets

    from tunelab.data.formats import convert, detect, first_rows

    stream = datasets.load_dataset("json", data_files=str(DATA / "alpaca.json"), split="train").to_iterable_dataset()
    fmt, _ = detect(stream.column_names, first_rows(stream, 2), "s", "lm")
    out = convert(stream, fmt, "lm", where="s")
    assert isinstance(out, datasets.IterableDataset)
    assert next(iter(out))["messages"][-1] == {"role": "assistant", "content": "12"}


# --- bad input: one line, naming the source ------------------------------------------------------------------
def test_bad_sources_are_one_line_at_validate(tmp_path: Path, tiny_lm: Path) -> None:
    def validate(stage: dict, message: str) -> None:
        fails(["validate", str(write(tmp_path, {"stages": {"s": stage}}))], message)

    def sft(data: Any) -> dict:
        return {"stage": "sft", "model": str(tiny_lm), "data": data, "training": tiny_training()}

    alpaca = str(DATA / "alpaca.json")
    validate(
        sft({"path": alpaca, "format": "sharegtp"}), r"'stages.s.data.format' is 'sharegtp'.*did you mean 'sharegpt'"
    )
    validate(
        sft({"path": alpaca, "format": "sharegpt"}),
        r"'stages.s.data' \(.*alpaca.json\) is `format: sharegpt`, which needs column\(s\) conversations or messages; "
        r"its columns are instruction, input, output, system, history; the closest format is alpaca",
    )
    both = tmp_path / "both.json"
    both.write_text(
        json.dumps([{"conversations": [{"from": "human", "value": "q"}], "instruction": "i", "output": "o"}])
    )
    validate(sft(str(both)), r"could be sharegpt \(column conversations.*\) or alpaca \(.*\): set `format: sharegpt`")
    bots = tmp_path / "bots.json"
    bots.write_text(json.dumps([{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}]))
    validate(sft(str(bots)), r"row 0: role 'bot' does not map to a chat role .*roles: \{bot: assistant\}")
    validate(sft({"path": str(bots), "roles": {"bot": "assistent"}}), r"roles.bot' is 'assistent'.*'assistant'")
    validate(
        sft({"path": alpaca, "columns": {"instrution": "prompt"}}),
        r"`columns:` renames 'instrution', which is not a column \(did you mean 'instruction'\?\)",
    )
    dpo = {"stage": "dpo", "model": str(tiny_lm), "training": tiny_training()}
    validate(
        {**dpo, "data": {"path": str(DATA / "text.jsonl"), "format": "text"}},
        r"is `format: text`, which stage 's' cannot take .*: use format preference",
    )
    validate(
        {**dpo, "data": str(DATA / "text.jsonl")},
        r"is not preference data.*it holds text data \(column text\), which stage 's' cannot take",
    )


# --- every stage kind on the formats it takes ----------------------------------------------------------------
def test_every_stage_kind_validates_on_the_formats_it_takes(tmp_path: Path, tiny_lm: Path, reward_model: Path) -> None:
    single = tmp_path / "alpaca_eval.json"  # eval prompts are one question: no system turn, no history
    single.write_text(json.dumps([{"instruction": "Answer.", "input": Q0, "output": "12"}] * 2))
    lm = str(tiny_lm)
    rewards = ["tunelab.rewards:exact_match"]
    online = {"max_steps": 1, "per_device_train_batch_size": 2, "num_generations": 2, "max_completion_length": 4}
    without_generations = {k: v for k, v in online.items() if k != "num_generations"}

    def stage(kind: str, name: str, **extra: Any) -> dict:
        out = {"stage": kind, "model": lm, "data": str(DATA / name), "chat_template": "tunelab", **extra}
        if kind not in ("eval",):
            out.setdefault("training", tiny_training())
        return out

    stages = {
        "sft_text": stage("sft", "text.jsonl"),
        "sft_messages": stage("sft", "messages.jsonl"),
        "sft_sharegpt": stage("sft", "sharegpt.json"),
        "sft_alpaca": stage("sft", "alpaca.json"),
        "sft_pc": stage("sft", "prompt_completion.jsonl"),
        "sft_tools": stage("sft", "messages_tools.jsonl", chat_template=TOOLS_TEMPLATE),
        "reward": stage("reward", "preference.jsonl"),
        "dpo": stage("dpo", "sharegpt_preference.json"),
        "orpo": stage("orpo", "preference_chat.jsonl"),
        "cpo": stage("cpo", "preference.jsonl"),
        "kto": stage("kto", "kto.jsonl"),
        "kto_pairs": stage("kto", "sharegpt_preference.json"),
        "grpo": stage("grpo", "alpaca.json", rewards=rewards, training=online),
        "rloo": stage("rloo", "sharegpt.json", rewards=rewards, training=online),
        "ppo": stage("ppo", "messages.jsonl", reward_model=str(reward_model), training=dict(PPO_TRAINING)),
        "distill": stage("distill", "alpaca.json", teacher=lm, training=without_generations),
        "eval_messages": stage("eval", "messages.jsonl"),
        "eval_alpaca": {"stage": "eval", "model": lm, "data": str(single)},
        "eval_pc": stage("eval", "prompt_completion.jsonl"),
    }
    assert tunelab.validate(tunelab.recipe_from_dict({"output_dir": str(tmp_path / "out"), "stages": stages}))
    stages["last"] = stage("dpo", "alpaca.json")  # every stage was checked: one more, of data dpo cannot take
    with pytest.raises(tunelab.TunelabError, match=r"'stages.last.data' .* it holds alpaca data"):
        tunelab.validate(tunelab.recipe_from_dict({"output_dir": str(tmp_path / "out"), "stages": stages}))


# --- training: one stage per target --------------------------------------------------------------------------
def test_tool_chat_loss_falls_on_the_assistant_turns_and_calls_only(tiny_lm: Path) -> None:
    from transformers import AutoTokenizer

    from tunelab.models.chat_templates import tokenize_assistant_only

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    tokenizer.chat_template = TOOLS_TEMPLATE
    for name, answer in (("messages_tools.jsonl", "Ann has 12."), ("sharegpt_tools.json", "12")):
        ds, _ = load(name, "lm")
        row = tokenize_assistant_only(ds.select([0]), tokenizer, "data")[0]
        text = tokenizer.decode(row["input_ids"])
        ids = row["input_ids"]
        trained = tokenizer.decode([t for t, m in zip(ids, row["assistant_masks"], strict=True) if m])
        assert text.startswith('<|system|>Functions: add{"type": "object"'), text  # the tools, rendered
        # The call (arguments as a mapping, not a quoted string) and the final answer; never the tool's result.
        assert trained == '<call>add({"a": 8, "b": 4})</call><|end|>' + answer + "<|end|>", trained
        assert "<|tool|>12<|end|>" in text and "<|tool|>" not in trained and "<|user|>" not in trained
        assert trained.count("<|end|>") == 2


def test_sft_trains_on_a_sharegpt_tool_chat(tmp_path: Path, tiny_text_lm: Path) -> None:
    """A tiny Llama with SmolLM2's tokenizer (tool schemas in 128 tokens), given the tools template."""
    stage = {
        "stage": "sft",
        "model": str(tiny_text_lm),
        "data": str(DATA / "sharegpt_tools.json"),
        "chat_template": TOOLS_TEMPLATE,
        "training": tiny_training(max_length=128),
    }
    result = run_stages(tmp_path, {"sft": stage})
    assert math.isfinite(result.metrics["sft"]["train_loss"])
    assert (result.outputs["sft"] / "model.safetensors").is_file()


def test_preference_and_kto_stages_train_on_converted_rows(tmp_path: Path, tiny_lm: Path) -> None:
    training = tiny_training(max_steps=1, per_device_train_batch_size=2, max_length=128)
    stages = {
        "dpo": {"stage": "dpo", "model": str(tiny_lm), "data": str(DATA / "sharegpt_preference.json")},
        "kto": {"stage": "kto", "model": str(tiny_lm), "data": str(DATA / "kto.jsonl")},
    }
    for stage in stages.values():
        stage.update(chat_template="tunelab", training=dict(training))
    result = run_stages(tmp_path, stages)
    assert all(math.isfinite(result.metrics[name]["train_loss"]) for name in stages)


def test_eval_scores_alpaca_rows(tmp_path: Path, tiny_lm: Path) -> None:
    single = tmp_path / "alpaca.json"
    single.write_text(json.dumps([{"instruction": "Answer.", "input": Q0, "output": "12"}] * 3))
    stage = {"stage": "eval", "model": str(tiny_lm), "data": str(single), "generation": {"max_new_tokens": 2}}
    result = run_stages(tmp_path, {"eval": stage})
    (scores,) = result.metrics["eval"].values()
    assert scores["examples"] == 3


def test_grpo_takes_alpaca_prompts(tmp_path: Path, tiny_lm: Path) -> None:
    training = {
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "num_generations": 2,
        "max_completion_length": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
    }
    stage = {
        "stage": "grpo",
        "model": str(tiny_lm),
        "data": str(DATA / "alpaca.json"),
        "chat_template": "tunelab",
        "rewards": ["tunelab.rewards:exact_match"],
        "training": training,
    }
    result = run_stages(tmp_path, {"grpo": stage})
    assert "train_loss" in result.metrics["grpo"]


def test_vlm_sft_trains_on_sharegpt_vision_rows(tmp_path: Path, tiny_vlm: Path) -> None:
    training = tiny_training(max_steps=2, learning_rate=1e-3, max_length=None, per_device_train_batch_size=2)
    stage = {
        "stage": "vlm_sft",
        "model": str(tiny_vlm),
        "data": str(DATA / "vision_sharegpt.json"),
        "training": training,
    }
    result = run_stages(tmp_path, {"vlm": stage})
    assert math.isfinite(result.metrics["vlm"]["train_loss"])


@pytest.mark.slow
def test_smollm2_sft_on_alpaca(tmp_path: Path, smollm2: Path) -> None:
    """SmolLM2-135M-Instruct (its GGUF file) fine-tuned on Alpaca rows, through its own ChatML template, with
    the loss on the answers only: the loss falls over a few steps."""
    stage = {
        "stage": "sft",
        "model": dict(SMOLLM2),
        "data": str(DATA / "alpaca.json"),
        "lora": {"r": 8, "target_modules": "all-linear"},
        "training": tiny_training(
            max_steps=6, learning_rate=3e-3, max_length=128, assistant_only_loss=True, logging_steps=1
        ),
    }
    result = run_stages(tmp_path, {"sft": stage})
    assert result.metrics["sft"]["train_loss"] > 0
    history = json.loads((result.outputs["sft"] / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
