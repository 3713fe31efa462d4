"""Inputs that used to hang, crash or eat memory end in one line, exit code 2, in seconds: malformed GGUF
files, special files (FIFOs) where a file is read, chat templates that loop or render gigabytes,
generation settings the library only rejects at generate time."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.helpers import fails, gguf_source, runner, tiny_training, write

CHATS = {"path": "recipes/data/arith_chat", "split": "train[:8]"}


def chat_sft(model: object, **extra: object) -> dict:
    return {"stage": "sft", "model": model, "data": CHATS, "training": tiny_training(), **extra}


# --- B. malformed GGUF files ----------------------------------------------------------------------


def corrupt(data: bytes, offset: int, value: int) -> bytes:
    """`data` with the uint64 at `offset` replaced by `value`."""
    return data[:offset] + struct.pack("<Q", value) + data[offset + 8 :]


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("cut:12", "the tensor count needs 8 bytes"),
        ("cut:5000", "the tensor count is 272, more than the"),
        ("cut:1000000", "the element count of metadata .tokenizer.ggml.merges. is 48900, more than"),
        ("cut:half", r"tensor '.*' ends at byte \d+, past the end of the file"),
        ("cut:-1", r"tensor .* ends at byte 98362432, past the end of the file \(98362431 bytes\)"),
        ("tensors:62", "the tensor count is 4611686018427387904, more than"),
        ("entries:62", "the metadata entry count is 4611686018427387904, more than"),
        ("string:60", "the length of metadata key 0 is 1152921504606846976, more than"),
    ],
)
def test_malformed_gguf_is_one_line(tmp_path: Path, how: str, message: str) -> None:
    data = gguf_source().read_bytes()
    kind, _, arg = how.partition(":")
    if kind == "cut":
        end = {"half": len(data) // 2, "-1": len(data) - 1}.get(arg) or int(arg)
        data = data[:end]
    else:  # the header: magic, version, then uint64 tensor count, entry count, the first key's length
        offset = {"tensors": 8, "entries": 16, "string": 24}[kind]
        data = corrupt(data, offset, 2 ** int(arg))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "bad.gguf").write_bytes(data)
    path = write(tmp_path, chat_sft(str(tmp_path / "m" / "bad.gguf")))
    fails(["validate", str(path)], r"'.*bad.gguf' is not a readable GGUF file: " + message)


# --- A. special files where a file is read --------------------------------------------------------


def within(seconds: float):
    """A context that fails the test (instead of hanging it) when its body runs longer than `seconds`."""
    import contextlib
    import signal

    class TooSlow(BaseException):
        pass

    @contextlib.contextmanager
    def limit():
        def alarm(signum, frame):
            raise TooSlow

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        except TooSlow:
            pytest.fail(f"still running after {seconds} s")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return limit()


def test_a_fifo_as_the_recipe_is_one_line(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    with within(30):
        fails(["validate", str(fifo)], r"recipe '.*recipe.yaml' is a FIFO \(named pipe\) that gave no end of input")


def test_a_fifo_or_socket_as_include_path_is_one_line(tmp_path: Path, tiny_lm: Path) -> None:
    import os
    import socket

    pytest.importorskip("lm_eval")
    os.mkfifo(tmp_path / "tasks.yaml")
    stage = {"stage": "lm_eval", "model": str(tiny_lm), "tasks": ["tunelab_arith_mc"]}
    with within(60):
        path = write(tmp_path, {**stage, "include_path": str(tmp_path / "tasks.yaml")})
        fails(["validate", str(path)], r"include_path' '.*tasks.yaml' is a FIFO \(named pipe\), not a regular file")
        (tmp_path / "folder").mkdir()
        os.mkfifo(tmp_path / "folder" / "mine.yaml")
        path = write(tmp_path, {**stage, "include_path": str(tmp_path / "folder")})
        fails(["validate", str(path)], r"include_path' holds '.*mine.yaml' is a FIFO \(named pipe\)")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(tmp_path / "sock"))
            path = write(tmp_path, {**stage, "include_path": str(tmp_path / "sock")})
            fails(["validate", str(path)], r"include_path' '.*sock' is a socket, not a regular file")


def test_a_fifo_as_gguf_file_is_one_line(tmp_path: Path) -> None:
    import os

    (tmp_path / "m").mkdir()
    os.mkfifo(tmp_path / "m" / "x.gguf")
    with within(30):
        fails(
            ["validate", str(write(tmp_path, chat_sft(str(tmp_path / "m" / "x.gguf"))))],
            r"gguf_file' '.*x.gguf' is a FIFO \(named pipe\), not a regular file",
        )


def test_a_fifo_as_chat_image_is_one_line(tmp_path: Path, tiny_lm: Path) -> None:
    import os

    os.mkfifo(tmp_path / "cat.png")
    with within(30):
        fails(
            ["chat", str(tiny_lm), "--prompt", "hi", "--image", str(tmp_path / "cat.png")],
            r"--image '.*cat.png' is a FIFO \(named pipe\), not a regular file: reading it could wait forever",
        )


# --- A. chat templates that loop or render gigabytes ----------------------------------------------

LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}"
BARE_LOOPS = "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"
HUGE = [
    "{{ 'x' * 10000000000 }}",
    "{{ 'x' | center(10000000000) }}",
    "{{ '{:>10000000000}'.format('x') }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endfor %}",
    "{{ range(100000) | join('x' * 1000000) }}",
    "{{ ('x' * 5000000).replace('x', 'y' * 5000000) }}",
]


@pytest.mark.parametrize("template", [LOOPS, BARE_LOOPS], ids=["range", "bare"])
def test_a_looping_chat_template_stops_in_seconds(tmp_path: Path, tiny_lm: Path, template: str) -> None:
    import time

    path = write(tmp_path, chat_sft(str(tiny_lm), chat_template=template))
    start = time.monotonic()
    with within(60):
        fails(["validate", str(path)], r"chat template took longer than 5 s to render on row 0: it loops too much")
    assert time.monotonic() - start < 40


@pytest.mark.parametrize("template", HUGE)
def test_a_chat_template_that_renders_gigabytes_stops_at_once(tmp_path: Path, tiny_lm: Path, template: str) -> None:
    import resource

    path = write(tmp_path, chat_sft(str(tiny_lm), chat_template=template))
    with within(60):
        fails(["validate", str(path)], r"chat template rendered more than 8000000 characters on row 0")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 3 * 2**20  # KiB: no gigabytes were built


def test_eval_renders_the_model_template_bounded(tmp_path: Path, tiny_lm: Path) -> None:
    stage = {"stage": "eval", "model": str(tiny_lm), "data": "recipes/data/arith_qa", "chat_template": HUGE[0]}
    with within(60):
        fails(["validate", str(write(tmp_path, stage))], r"'stages.eval.model': the chat template rendered more than")


def test_data_that_looks_like_a_bomb_still_renders(tiny_lm: Path) -> None:
    from transformers import AutoTokenizer

    from tunelab.models.chat_templates import render

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] | trim | replace('users', 'people') | center(40) }}"
        "{{ m['content'].split(' ') | join(' ') }}{{ '%s' % m['content'] }}{% endfor %}"
        "{% for i in range(3) | reverse %}{{ i }}{% endfor %}{{ range(5) | length }}{{ 'ab' * 3 }}"
    )
    text = "100% of 123456789 users {:>123456789}"
    out = render(tokenizer, [{"role": "user", "content": text}], "w")
    assert out.count("123456789") == 6 and out.endswith("2105ababab")


def test_a_good_template_still_renders(tmp_path: Path, tiny_lm: Path) -> None:
    from tunelab.cli.app import app

    ok = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}{{ '\\n' }}{% endfor %}"
    result = runner.invoke(app, ["validate", str(write(tmp_path, chat_sft(str(tiny_lm), chat_template=ok)))])
    assert result.exit_code == 0, result.output


# --- C. every stage that takes `chat_template:` renders an example at validate ----------------------

QA = {"path": "recipes/data/arith_qa", "split": "train[:8]"}
PREF = {"path": "recipes/data/arith_pref", "split": "train[:8]"}
BROKEN = "{% for m in messages %}{{ m['content'] | nosuchfilter }}{% endfor %}"


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("dpo", {"data": PREF}),
        ("kto", {"data": PREF}),
        ("orpo", {"data": PREF}),
        ("cpo", {"data": PREF}),
        ("grpo", {"data": QA, "rewards": ["tunelab.rewards:exact_match"]}),
        ("rloo", {"data": QA, "rewards": ["tunelab.rewards:exact_match"]}),
        ("distill", {"data": QA, "teacher": "TINY"}),
    ],
)
def test_a_broken_chat_template_fails_at_validate_in_every_stage(
    tmp_path: Path, tiny_lm: Path, kind: str, extra: dict
) -> None:
    extra = {k: (str(tiny_lm) if v == "TINY" else v) for k, v in extra.items()}
    stage = {"stage": kind, "model": str(tiny_lm), "chat_template": BROKEN, **extra}
    message = rf"'stages.{kind}.data': the chat template fails to render on row 0"
    fails(["validate", str(write(tmp_path, stage))], message)


def test_a_looping_chat_template_stops_in_a_preference_stage(tmp_path: Path, tiny_lm: Path) -> None:
    stage = {"stage": "dpo", "model": str(tiny_lm), "chat_template": HUGE[1], "data": PREF}
    fails(["validate", str(write(tmp_path, stage))], r"'stages.dpo.data': the chat template rendered more than")


def test_a_reward_model_without_a_template_given_chat_prompts(tmp_path: Path, tiny_lm: Path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_lm, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(tmp_path / "rm")
    stage = {"stage": "grpo", "model": str(tiny_lm), "data": QA, "rewards": [str(tmp_path / "rm")]}
    fails(
        ["validate", str(write(tmp_path, {**stage, "chat_template": "tunelab"}))],
        r"'stages.grpo.rewards\[0\]' is '.*rm', a reward model whose tokenizer has no chat template, but the prompts",
    )
    from tunelab.cli.app import app

    result = runner.invoke(app, ["validate", str(write(tmp_path, stage, "plain.yaml"))])  # plain prompts: fine
    assert result.exit_code == 0, result.output


# --- D. generation settings that GenerationConfig takes but generate() rejects ----------------------


def eval_stage(model: Path, **generation: object) -> dict:
    return {"stage": "eval", "model": str(model), "data": "recipes/data/arith_qa", "generation": generation}


@pytest.mark.parametrize(
    ("generation", "message"),
    [
        ({"do_sample": True, "temperature": 0}, r"temperature' is 0 with do_sample: true: use a value above 0"),
        ({"do_sample": True, "temperature": -1}, r"generation.temperature' is -1 with do_sample: true"),
        ({"do_sample": True, "top_p": -0.5}, r"top_p' is -0.5 with do_sample: true: use a value from 0 to 1"),
        ({"num_beams": 1e6}, r"generation.num_beams' is 1000000: use a whole number from 1 to 1024"),
        ({"max_new_tokens": 1e9}, r"generation.max_new_tokens' is 1000000000: use a whole number from 1 to"),
        ({"max_new_tokens": 2.5}, r"generation.max_new_tokens' is 2.5: a whole number is needed"),
        ({"max_new_tokens": 1000}, r"max_new_tokens' is 1000, more than the model reads \(max_position_embeddings 128"),
        ({"repetition_penalty": 0}, r"generation.repetition_penalty' is 0: use a number above 0"),
    ],
)
def test_generation_settings_generate_would_reject(
    tmp_path: Path, tiny_lm: Path, generation: dict, message: str
) -> None:
    fails(["validate", str(write(tmp_path, eval_stage(tiny_lm, **generation)))], message)


def test_chat_generation_settings_generate_would_reject(tiny_lm: Path) -> None:
    base = ["chat", str(tiny_lm), "--prompt", "hi"]
    fails([*base, "do_sample=true", "temperature=0"], r"temperature' is 0 with do_sample: true")
    fails([*base, "num_beams=1000000"], r"num_beams' is 1000000: use a whole number from 1 to 1024")
    fails([*base, "max_new_tokens=1000"], r"max_new_tokens' is 1000, more than the model reads")


def test_a_400_kb_choice_is_refused_at_validate(tmp_path: Path, tiny_lm: Path) -> None:
    import json

    rows = [{"prompt": "1+1=", "choices": [" 2", " 3"], "label": 0}] * 3
    rows.append({"prompt": "2+2=", "choices": [" 4", " 5" * 200_000], "label": 0})
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage = {"stage": "eval", "model": str(tiny_lm), "data": str(tmp_path / "mc.jsonl"), "reference_column": "label"}
    fails(
        ["validate", str(write(tmp_path, stage))],
        r"'stages.eval.data' row 3: the prompt with its longest choice is \d+ tokens, more than the model reads "
        r"\(max_position_embeddings 128\)",
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"gen_kwargs": "do_sample=true,temperature=0"}, r"gen_kwargs.temperature' is 0 with do_sample: true"),
        ({"gen_kwargs": {"do_sample": True, "temperature": -1}}, r"gen_kwargs.temperature' is -1 with do_sample"),
        ({"gen_kwargs": {"max_gen_toks": 1e9}}, r"gen_kwargs.max_gen_toks' is 1000000000.0: use a whole number"),
        ({"gen_kwargs": {"num_beams": 1000000}}, r"gen_kwargs.num_beams' is 1000000: use a whole number from 1"),
        ({"samples": {"tunelab_arith_mc": [100000]}}, r"samples.tunelab_arith_mc' asks for example 100000, but the"),
        ({"samples": {"tunelab_arith_mc": [-1]}}, r"samples.tunelab_arith_mc' is \[-1\]: give a list of example"),
        ({"samples": {"nosuchtask": [0]}}, r"samples.nosuchtask' is not one of the tasks run here"),
    ],
)
def test_lm_eval_generation_and_samples_out_of_range(tmp_path: Path, tiny_lm: Path, extra: dict, message: str) -> None:
    pytest.importorskip("lm_eval")
    stage = {"stage": "lm_eval", "model": str(tiny_lm), "tasks": ["tunelab_arith_mc"], "batch_size": 4, **extra}
    fails(["validate", str(write(tmp_path, stage))], message)


@pytest.mark.parametrize(
    "gen_kwargs", ["temperature=0", {"temperature": 0.0, "do_sample": False}, {"top_p": 0.9}, "max_gen_toks=8,until=x"]
)
def test_lm_eval_generation_the_harness_takes(tmp_path: Path, tiny_lm: Path, gen_kwargs: object) -> None:
    """The harness's greedy `temperature=0`, and fields generate() only warns about, stay accepted."""
    from tunelab.cli.app import app

    pytest.importorskip("lm_eval")
    stage = {"stage": "lm_eval", "model": str(tiny_lm), "tasks": ["tunelab_arith_mc"], "batch_size": 4}
    result = runner.invoke(app, ["validate", str(write(tmp_path, {**stage, "gen_kwargs": gen_kwargs}))])
    assert result.exit_code == 0, result.output


def test_a_plan_orders_of_magnitude_past_the_device_is_an_error(
    tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunelab.cli.app import app
    from tunelab.models import plan

    monkeypatch.setattr(plan, "device_memory", lambda: ("a 1 GiB device", float(2**30)))
    stage = {**eval_stage(tiny_lm, max_new_tokens=100), "batch_size": 10**6}
    fails(
        ["validate", str(write(tmp_path, stage))],
        r"stage 'eval' would need .* GiB per device even spread over 1024 devices, over 100 times what a 1 GiB "
        r"device has \(1.00 GiB\); most of it is kv cache",
    )
    result = runner.invoke(app, ["validate", str(write(tmp_path, eval_stage(tiny_lm), "fits.yaml"))])
    assert result.exit_code == 0, result.output
