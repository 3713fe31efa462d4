"""`tunelab serve`: the real `openai` client over loopback, on the tiny models and on SmolLM2 (GGUF).

Each test's server listens on a free port it picks (port=0) and is closed by the test; nothing reaches a network.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tunelab
from tests.helpers import SMOLLM2
from tunelab.cli import app

KEY = "test-key"
BASE = "pretrain"  # the tiny model is the pretrain stage's folder: served by its stage name
QUESTION = "Mia has 3 pears. She buys 4 more. How many pears"
SMOL_GGUF = f"{SMOLLM2['path']}/{SMOLLM2['gguf_file']}"


def lora(base: Path, out: Path, seed: int, template: str | None = None) -> Path:
    """A LoRA adapter over `base` with random (non-zero) weights: it answers unlike the base, at once."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    if template is not None:  # an adapter folder with its own tokenizer, as an SFT stage with chat_template writes
        tokenizer = AutoTokenizer.from_pretrained(base)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tunelab.models.chat_templates import TUNELAB_TEMPLATE

    root = tmp_path_factory.mktemp("adapters")
    return {"a": lora(tiny_lm, root / "a", 1, TUNELAB_TEMPLATE), "b": lora(tiny_lm, root / "b", 2)}


@pytest.fixture(scope="module")
def server(tiny_lm: Path, adapters: dict[str, Path]):
    with tunelab.serve(tiny_lm, adapters=adapters, api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def ask(client, model: str, text: str = QUESTION, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kwargs)


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed body) of one request sent without the SDK (for what the SDK will not send)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    return reply.status, json.loads(data)


# --- the API with the OpenAI SDK ------------------------------------------------------------------------


def test_models_list_names_the_base_and_each_adapter(server, client, tiny_lm: Path) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == [BASE, "a", "b"] == server.models
    assert models["a"].owned_by == "tunelab"
    assert models["a"].model_extra["parent"] == BASE
    assert models[BASE].model_extra["root"] == str(tiny_lm)


def test_greedy_answers_equal_tunelab_chat(client, tiny_lm: Path, adapters: dict[str, Path]) -> None:
    """The same prompt rendering (plain text for the base, the adapter's own chat template for `a`) and the same
    greedy decoding as `tunelab.chat`; the adapter there is merged, here it is applied on the fly."""
    for name, path in ((BASE, tiny_lm), ("a", adapters["a"])):
        served = ask(client, name, max_tokens=12).choices[0].message.content
        assert served.strip() == tunelab.chat(path, QUESTION, max_new_tokens=12), name


def test_adapters_are_chosen_per_request(client, tiny_lm: Path) -> None:
    answers = {name: ask(client, name, max_tokens=8).choices[0].message.content for name in (BASE, "a", "b")}
    assert len(set(answers.values())) == 3, answers
    again = ask(client, "b", max_tokens=8).choices[0].message.content  # after a, b, base: b answers as before
    assert again == answers["b"]


def test_streaming_sends_the_same_answer_in_pieces(client, tiny_lm: Path) -> None:
    whole = ask(client, BASE, max_tokens=12)
    pieces, finishes, usages = [], [], []
    stream = ask(client, BASE, max_tokens=12, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finishes.append(choice.finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert len(pieces) > 3  # token by token, not one piece
    assert usages == [whole.usage]


def test_completions_n_logprobs_and_usage_counts(client, tiny_lm: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    reply = client.completions.create(model=BASE, prompt=QUESTION, max_tokens=10, n=2, logprobs=3)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text == reply.choices[1].text  # greedy twice
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    # at most 3 alternatives: two tokens may decode to the same text (partial UTF-8 bytes), one key in OpenAI's dict
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    # greedy: each chosen token is its step's most likely one
    assert all(
        max(top.values()) == pytest.approx(lp)
        for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True)
    )
    assert reply.usage.prompt_tokens == len(tokenizer(QUESTION)["input_ids"])
    # the tokens generated (a barely trained model's need not be how the tokenizer splits the text: see the
    # SmolLM2 test for that count)
    assert reply.usage.completion_tokens == 2 * len(logprobs.tokens)


def test_chat_logprobs_and_usage_match_the_tokenizer(client, adapters: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from tunelab.models.chat_templates import render

    tokenizer = AutoTokenizer.from_pretrained(adapters["a"])  # the adapter's own tokenizer, with its template
    reply = ask(client, "a", max_tokens=12, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)
    prompt = render(tokenizer, [{"role": "user", "content": QUESTION}], "test")
    assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert reply.usage.completion_tokens == len(content)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stop_strings_end_the_answer_before_them(client, tiny_lm: Path) -> None:
    whole = ask(client, BASE, max_tokens=20).choices[0].message.content
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    assert stop.strip() and stop in whole
    cut = ask(client, BASE, max_tokens=20, stop=[stop, "never appears"])
    assert cut.choices[0].message.content == whole[: whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = ask(client, BASE, max_tokens=20, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole[: whole.index(stop)]


def test_seed_reproduces_a_sampled_answer(client, tiny_lm: Path) -> None:
    def sampled(seed: int) -> list[str]:
        reply = ask(client, BASE, max_tokens=16, temperature=1.5, seed=seed, n=2)
        return [c.message.content for c in reply.choices]

    first = sampled(7)
    assert sampled(7) == first
    assert first[0] != first[1] or sampled(8) != first  # n=2 draws two answers; another seed others


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client, tiny_lm: Path) -> None:
    import openai

    base = BASE
    messages = [{"role": "user", "content": "hi"}]
    cases = [  # (body, status, code, param)
        ({"model": "nope", "messages": messages}, 404, "model_not_found", "model"),
        ({"model": base}, 400, "missing_required_parameter", "messages"),
        ({"model": base, "messages": "hi"}, 400, "invalid_type", "messages"),
        ({"model": base, "messages": messages, "max_tokens": 0}, 400, "integer_below_min_value", "max_tokens"),
        ({"model": base, "messages": messages, "max_tokens": "5"}, 400, "invalid_type", "max_tokens"),
        ({"model": base, "messages": messages, "max_tokens": 10_000}, 400, "context_length_exceeded", "messages"),
        ({"model": base, "messages": messages, "temperature": -1}, 400, "decimal_below_min_value", "temperature"),
        ({"model": base, "messages": messages, "n": 0}, 400, "integer_below_min_value", "n"),
        ({"model": base, "messages": messages, "bogus": 1}, 400, "unrecognized_argument", "bogus"),
    ]
    for body, status, code, param in cases:
        got, reply = raw(server, "POST", "/v1/chat/completions", json.dumps(body).encode())
        assert (got, reply["error"]["code"], reply["error"]["param"]) == (status, code, param), (body, reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"}
        assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]
    got, reply = raw(server, "POST", "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert (got, reply["error"]["code"]) == (400, "invalid_json")
    got, reply = raw(server, "POST", "/v1/completions", b"x" * (5 * 2**20))
    assert (got, reply["error"]["code"]) == (413, "request_too_large")
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}):
        got, reply = raw(server, "GET", "/v1/models", headers=headers)
        assert got == 401 and reply["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(client, "nope")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    assert raw(server, "GET", "/health")[1]["status"] == "ok"  # no key needed
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)  # one keep-alive connection
    conn.request("POST", "/v1/nope", body=b'{"model": "x"}', headers={"Authorization": f"Bearer {KEY}"})
    reply = conn.getresponse()
    assert (reply.status, json.loads(reply.read())["error"]["code"]) == (404, "unknown_url")
    conn.request("GET", "/health")  # the unread body of the 404 is not taken for this request
    assert conn.getresponse().status == 200
    conn.close()
    assert ask(client, base, max_tokens=3).choices[0].message.content  # still serving


def test_a_hundred_concurrent_requests_are_batched_and_each_answered_as_alone(server, client, tiny_lm: Path) -> None:
    names = [BASE, "a", "b"]
    prompts = [f"Tom has {i} apples. He gives away {i % 3}. How many" for i in range(10)]
    alone = {(n, p): ask(client, n, p, max_tokens=10).choices[0].message.content for n in names for p in prompts[:4]}
    alone |= {(names[0], p): ask(client, names[0], p, max_tokens=10).choices[0].message.content for p in prompts[4:]}
    work = [(names[i % 3], prompts[i % 4]) if i % 2 else (names[0], prompts[4 + i % 6]) for i in range(100)]
    before = server.engine.largest_batch
    with ThreadPoolExecutor(100) as pool:
        got = list(pool.map(lambda w: ask(client, w[0], w[1], max_tokens=10).choices[0].message.content, work))
    assert got == [alone[w] for w in work]
    assert server.engine.largest_batch > max(before, 8)  # answered together, not one by one


def test_close_finishes_requests_in_flight_then_refuses(tiny_lm: Path) -> None:
    import openai

    server = tunelab.serve(tiny_lm)
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=80,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    first = next(iter(stream))
    closer = threading.Thread(target=server.close, kwargs={"drain": 30})
    closer.start()
    time.sleep(0.3)
    rest = list(stream)
    closer.join(30)
    assert first.choices[0].delta.role == "assistant"
    assert rest[-1].choices[0].finish_reason == "length"  # all 80 tokens, though close() came mid-answer
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=2)


def test_half_a_request_blocks_no_one_and_times_out(tiny_lm: Path) -> None:
    import openai

    with tunelab.serve(tiny_lm, read_timeout=1.0) as server:
        loris = socket.create_connection((server.host, server.port))
        loris.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model":')
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=10)
        start = time.monotonic()
        assert client.completions.create(model=BASE, prompt="Tom has", max_tokens=3).choices[0].text
        assert time.monotonic() - start < 5
        loris.settimeout(5)
        assert loris.recv(100) == b""  # the server gave up on it after read_timeout
        loris.close()


def test_quantized_base_serves_through_bitsandbytes(tiny_lm: Path, adapters: dict[str, Path]) -> None:
    import openai
    from bitsandbytes.nn import Linear8bitLt

    with tunelab.serve(tiny_lm, adapters={"b": adapters["b"]}, quantization={"load_in_8bit": True}) as server:
        layer = server.engine.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        assert isinstance(layer, Linear8bitLt)
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
        assert all(ask(client, name, max_tokens=3).choices[0].finish_reason for name in (BASE, "b"))


def fake_run(root: Path, tiny_lm: Path, adapters: dict[str, Path]) -> Path:
    """A run folder as tunelab writes one: pretrain (a full model), sft and dpo (adapters on pretrain), eval."""
    import shutil

    run = root / "run"
    shutil.copytree(tiny_lm, run / "pretrain")
    for stage, source in (("sft", adapters["a"]), ("dpo", adapters["b"])):
        shutil.copytree(source, run / stage)
        config = json.loads((run / stage / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(run / "pretrain")
        (run / stage / "adapter_config.json").write_text(json.dumps(config))
    (run / "eval").mkdir()
    stages = {s: {"status": "completed", "kind": s} for s in ("pretrain", "sft", "dpo", "eval")}
    (run / "run.json").write_text(json.dumps({"tool": "tunelab", "stages": stages}))
    return run


def test_a_run_folder_serves_its_final_model_and_each_adapter_stage(tiny_lm, adapters, tmp_path) -> None:
    from tunelab.serving.sources import plan

    run = fake_run(tmp_path, tiny_lm, adapters)
    served = plan(str(run))
    assert served.names == ["pretrain", "sft", "dpo"]
    assert Path(served.base["path"]) == run / "pretrain"
    assert plan(str(run / "sft")).names == ["pretrain", "sft"]  # a stage folder: by its stage's name
    assert plan(str(run / "sft"), [f"extra={run / 'dpo'}"]).names == ["pretrain", "sft", "extra"]


def test_reasoning_is_split_at_the_marker_as_eval_splits_it() -> None:
    from tunelab.models.prompting import strip_reasoning
    from tunelab.serving.engine import Event
    from tunelab.serving.protocol import Choice

    text = "let me think</think>  The answer is 7."
    for pieces in (["let me th", "ink</thi", "nk>  The ans", "wer is 7."], [text]):
        choice, sent = Choice("</think>"), []
        for piece in pieces:
            sent.append(choice.add(Event("delta", text=piece)))
        sent.append(choice.add(Event("end", finish="stop")))
        assert choice.answer() == ("let me think", strip_reasoning(text, "</think>"))
        assert "".join(s.get("reasoning_content", "") for s in sent) == "let me think"
        assert "".join(s.get("content", "") for s in sent) == "The answer is 7."
    plain = Choice("</think>")
    assert plain.add(Event("delta", text="no marker")) == {}  # held until the marker or the end
    assert plain.add(Event("end", finish="stop")) == {"content": "no marker"}
    assert plain.answer() == (None, "no marker")


# --- SmolLM2-135M-Instruct (GGUF) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2: Path):
    with tunelab.serve(SMOL_GGUF) as running:
        yield running


def test_smollm2_gguf_answers_as_tunelab_chat_does(smol, smollm2: Path) -> None:
    import openai
    from transformers import AutoTokenizer

    from tunelab.models.chat_templates import render

    client = openai.OpenAI(base_url=smol.url, api_key="none", max_retries=0, timeout=120)
    assert smol.models == [SMOL_GGUF]
    question = "What is the capital of France?"
    reply = ask(client, SMOL_GGUF, question, max_tokens=16)
    assert "Paris" in reply.choices[0].message.content
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompt = render(tokenizer, [{"role": "user", "content": question}], "test")
    assert reply.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    content = tokenizer(reply.choices[0].message.content, add_special_tokens=False)["input_ids"]
    assert reply.usage.completion_tokens == len(content)  # the EOS that ended it is no part of the answer
    system = "Answer in one word."
    served = client.chat.completions.create(
        model=SMOL_GGUF,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=16,
    )
    assert served.choices[0].message.content.strip() == tunelab.chat(
        SMOL_GGUF, question, system=system, max_new_tokens=16
    )


def test_a_client_that_leaves_mid_stream_stops_its_generation(smol) -> None:
    import openai

    client = openai.OpenAI(base_url=smol.url, api_key="none", max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model=SMOL_GGUF,
        messages=[{"role": "user", "content": "Count from 1 to 1000."}],
        max_tokens=1000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    for _ in range(4):
        next(chunks)
    stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(f == "cancelled" for _, _, f, _ in smol.engine.finished):
        time.sleep(0.1)
    ((_, _, finish, tokens),) = [e for e in smol.engine.finished if e[2] == "cancelled"]
    assert tokens < 200, tokens  # stopped soon after the client left, far from max_tokens
    assert smol.engine.load() == {"running": 0, "waiting": 0}


# --- the command line ---------------------------------------------------------------------------------------

runner = CliRunner()


def one_line_error(args: list[str], expected: str) -> None:
    start = time.monotonic()
    result = runner.invoke(app, ["serve", *args])
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0], lines[0]
    assert time.monotonic() - start < 10  # refused before any weights load


def test_bad_command_lines_are_one_line_before_loading(tiny_lm: Path, adapters: dict[str, Path], tmp_path) -> None:
    import shutil

    one_line_error([str(tmp_path / "missing")], "missing")
    one_line_error([str(tiny_lm), "--adapter", "no-equals-sign"], "is not NAME=PATH")
    one_line_error([str(tiny_lm), "--adapter", f"x={tmp_path}"], "is not a LoRA adapter")
    other = shutil.copytree(tiny_lm, tmp_path / "other-base")
    one_line_error([str(other), "--adapter", f"a={adapters['a']}"], "was trained on")
    one_line_error([str(tiny_lm), "--backend", "vllm"], "--backend vllm needs")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    one_line_error([str(tmp_path / "broken")], "broken")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error([str(tiny_lm), "--port", str(port)], f"port {port} on 127.0.0.1 is in use")


@pytest.mark.slow
def test_sigterm_drains_the_request_in_flight_and_exits_0(tiny_lm: Path) -> None:
    import openai

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(tunelab.__file__).parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve", str(tiny_lm), "--port", str(port), "--max-batch", "4"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert "serving" in process.stderr.readline()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        stream = client.completions.create(
            model=BASE, prompt="Tom has", max_tokens=120, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        next(chunks)
        process.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"
        assert process.wait(30) == 0
        assert "draining" in process.stderr.read()
    finally:
        process.kill()
