"""The OpenAI-compatible server, live on a free localhost port: the official `openai` client (plain and
streaming), batching of concurrent requests, limits and bad input, API keys, disconnects, moderation."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
from serve_toy import HELLO_ANSWER, HELLO_PROMPT, SCRIPT_ANSWER, SCRIPT_PROMPT, STORY_PROMPT, serve

from chatforge.safety import REFUSAL
from chatforge.tokenizer import Tokenizer

LIMITS = dict(max_body_bytes=64_000, max_messages=16, max_output_tokens=250, max_n=4)


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
    """The engine's forward passes on one thread: much faster than two on a busy 2-core machine."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok(parrot_ckpt) -> Tokenizer:
    return Tokenizer.load(parrot_ckpt)


@pytest.fixture(scope="module")
def server(parrot_ckpt, moderation_classifier):
    with serve(parrot_ckpt, moderation_classifier, **LIMITS) as live:
        yield live


@pytest.fixture(scope="module")
def plain(parrot_ckpt):
    """No moderation: the parrot's babble on unknown prompts is sometimes harmful-sounding."""
    with serve(parrot_ckpt, **LIMITS) as live:
        yield live


def client(live, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def health(live) -> dict:
    return httpx.get(live.url + "/health").json()


def wait_idle(live, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while (h := health(live))["scheduler"]["active_rows"] or h["scheduler"]["waiting"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    return h


# --- the openai client --------------------------------------------------------------------------------------

def test_chat_completion_with_openai_client(server, tok):
    r = client(server).chat.completions.create(model="parrot", messages=user(HELLO_PROMPT), temperature=0)
    assert r.object == "chat.completion" and r.model == "parrot"
    choice = r.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", HELLO_ANSWER, "stop")
    assert r.usage.prompt_tokens == len(tok.prompt(user(HELLO_PROMPT)))
    assert r.usage.completion_tokens == len(tok.encode(HELLO_ANSWER))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert [m.id for m in client(server).models.list().data] == ["parrot"]


def test_streaming_with_openai_client_matches_plain(server):
    c = client(server)
    plain = c.chat.completions.create(model="parrot", messages=user(SCRIPT_PROMPT), temperature=0)
    chunks = list(c.chat.completions.create(model="parrot", messages=user(SCRIPT_PROMPT), temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content == SCRIPT_ANSWER
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 5  # token by token
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


def test_raw_sse_format_ends_with_done(server):
    body = {"model": "parrot", "messages": user(HELLO_PROMPT), "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def test_stop_sequences_n_and_max_tokens(plain):
    c = client(plain)
    r = c.chat.completions.create(model="parrot", messages=user(HELLO_PROMPT), temperature=0, stop=["help"])
    assert r.choices[0].message.content == HELLO_ANSWER[:HELLO_ANSWER.index("help")]
    assert r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="parrot", messages=user(HELLO_PROMPT), temperature=0, max_tokens=3, n=3)
    assert len(r.choices) == 3 and {ch.finish_reason for ch in r.choices} == {"length"}
    assert {ch.message.content for ch in r.choices} == {r.choices[0].message.content}  # greedy: all equal
    assert HELLO_ANSWER.startswith(r.choices[0].message.content) and r.usage.completion_tokens == 9


def test_seed_makes_sampling_reproducible(plain):
    c = client(plain)
    ask = lambda seed: [ch.message.content for ch in c.chat.completions.create(  # noqa: E731
        model="parrot", messages=user("Say something."), temperature=1.0, max_tokens=20, n=2, seed=seed).choices]
    first = ask(7)
    assert ask(7) == first
    assert first[0] != first[1] or ask(8) != first  # the samples do vary


def test_completions_endpoint(plain, tok):
    c = client(plain)
    r = c.completions.create(model="parrot", prompt=["The capital", "Dogs"], max_tokens=5, temperature=0, echo=True)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("The capital") and r.choices[1].text.startswith("Dogs")
    assert r.usage.prompt_tokens == sum(1 + len(tok.encode(p)) for p in ("The capital", "Dogs"))
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="parrot", prompt="The capital", max_tokens=5, temperature=0, stream=True) if ch.choices)
    assert r.choices[0].text == "The capital" + streamed


# --- batching -----------------------------------------------------------------------------------------------

def test_eight_concurrent_streams_share_decode_steps(plain, tok):
    prompts = [f"Question number {i}: what is {i} + {i}?" for i in range(8)]
    sequential = [client(plain).chat.completions.create(model="parrot", messages=user(p), temperature=0,
                                                        max_tokens=12).choices[0].message.content for p in prompts]
    before = health(plain)["scheduler"]

    async def one(c: openai.AsyncOpenAI, prompt: str):
        stream = await c.chat.completions.create(model="parrot", messages=user(prompt), temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, usage, finish

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=plain.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    results = asyncio.run(all_at_once())
    for prompt, expected, (text, usage, finish) in zip(prompts, sequential, results):
        assert text == expected  # batching does not change what greedy decoding says
        assert usage.prompt_tokens == len(tok.prompt(user(prompt)))
        assert usage.completion_tokens == (12 if finish == "length" else len(tok.encode(text)))
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    after = wait_idle(plain)["scheduler"]
    assert after["batched_steps"] > before["batched_steps"]  # forward passes served two or more requests
    assert after["requests"] - before["requests"] == 8


def test_slow_reader_does_not_block_others(plain):
    body = json.dumps({"model": "parrot", "messages": user(SCRIPT_PROMPT), "max_tokens": 200, "temperature": 1.0,
                       "stream": True}).encode()
    slow = socket.create_connection(("127.0.0.1", plain.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # and never read the answer
    try:
        r = client(plain).chat.completions.create(model="parrot", messages=user(HELLO_PROMPT), temperature=0)
        assert r.choices[0].message.content == HELLO_ANSWER
    finally:
        slow.close()
    wait_idle(plain)


def test_client_disconnect_mid_stream_frees_its_rows(plain):
    before = health(plain)["scheduler"]["cancelled"]
    body = {"model": "parrot", "messages": user("Tell me everything."), "max_tokens": 200, "temperature": 1.0,
            "n": 4, "stream": True}
    with httpx.stream("POST", plain.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines)
    # leaving the block closed the connection after the first chunks
    after = wait_idle(plain)["scheduler"]
    assert after["cancelled"] > before
    r = client(plain).chat.completions.create(model="parrot", messages=user(HELLO_PROMPT), temperature=0)
    assert r.choices[0].message.content == HELLO_ANSWER


def test_full_queue_answers_503(parrot_ckpt):
    with serve(parrot_ckpt, max_batch_rows=1, max_queue=1) as live:
        body = {"model": "parrot", "messages": user("Talk."), "max_tokens": 200, "temperature": 1.0}

        async def burst():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
                return await asyncio.gather(*(c.post("/v1/chat/completions", json=body) for _ in range(5)))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert codes[0] == 200 and codes[-1] == 503, codes
        error = next(r for r in responses if r.status_code == 503).json()["error"]
        assert error["code"] == "queue_full" and error["type"] == "server_error"
        assert health(live)["scheduler"]["rejected"] == codes.count(503)


# --- bad input: a clear OpenAI-style error, and the server keeps serving ------------------------------------

def post(live, body, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
    if isinstance(body, (dict, list)):
        kw["json"] = body
    else:
        kw["content"] = body
        kw.setdefault("headers", {"Content-Type": "application/json"})
    return httpx.post(live.url + path, timeout=60, **kw)


def chat(**fields) -> dict:
    return {"model": "parrot", "messages": user(HELLO_PROMPT), **fields}


@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "parrot", "messages": [', 400, "body"),                        # malformed JSON
    (b"[1, 2]", 400, None),                                                      # not an object
    (chat(temperature="hot"), 400, "temperature"),                               # wrong type
    (chat(n="2"), 400, "n"),
    (chat(stream="yes"), 400, "stream"),
    ({"model": "parrot"}, 400, "messages"),                                      # missing
    ({"model": "parrot", "messages": "hi"}, 400, "messages"),
    ({"model": "parrot", "messages": []}, 400, "messages"),                      # empty
    ({"model": "parrot", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "parrot", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": "parrot", "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ({"model": "parrot", "messages": [{"role": "system", "content": "be nice"}]}, 400, "messages"),
    ({"model": "parrot", "messages": user("hi") * 17}, 400, "messages"),         # over max_messages
    (chat(n=0), 400, "n"),
    (chat(n=5), 400, "n"),
    (chat(max_tokens=0), 400, "max_tokens"),
    (chat(max_tokens=251), 400, "max_tokens"),
    (chat(max_completion_tokens=-1), 400, "max_completion_tokens"),
    (chat(temperature=2.5), 400, "temperature"),
    (chat(top_p=0), 400, "top_p"),
    (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (chat(seed=-1), 400, "seed"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if param:
        assert param.split("[")[0].split(".")[0] in error["message"]


def test_prompt_longer_than_context_names_the_limit(server, tok):
    long = "word " * 400
    r = post(server, chat(messages=user(long)))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "256" in error["message"] and str(len(tok.prompt(user(long)))) in error["message"]
    question = user("word " * 20)
    room = 256 - len(tok.prompt(question))
    r = post(server, chat(messages=question, max_tokens=room + 1))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "256" in r.json()["error"]["message"]
    assert post(server, chat(messages=question, max_tokens=room, temperature=0)).status_code == 200
    r = post(server, {"model": "parrot", "prompt": long}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_huge_bodies_get_413(server):
    big = json.dumps(chat(messages=user("x" * 70_000))).encode()
    r = post(server, big)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"

    def chunked():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    r = httpx.post(server.url + "/v1/chat/completions", content=chunked(), timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_unknown_routes_and_models(server):
    r = httpx.get(server.url + "/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405
    assert httpx.get(server.url + "/static/../app.py").status_code == 404


def test_server_keeps_serving_after_bad_input(server):
    for body in (b"{", b"null", b'{"messages": 1}', "\u00ff".encode("latin-1")):
        assert post(server, body).status_code == 400
    r = client(server).chat.completions.create(model="parrot", messages=user(HELLO_PROMPT), temperature=0)
    assert r.choices[0].message.content == HELLO_ANSWER


# --- API keys -----------------------------------------------------------------------------------------------

def test_api_key_required_when_set_and_never_logged(parrot_ckpt, capfd):
    key = "sk-test-5f2b9c1e-secret"
    with serve(parrot_ckpt, api_keys=(key,)) as live:
        assert post(live, chat()).status_code == 401
        r = post(live, chat(), headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert post(live, b"{broken", headers={"Content-Type": "application/json"}).status_code == 401  # before parsing
        with pytest.raises(openai.AuthenticationError):
            client(live, "wrong").models.list()
        r = client(live, key).chat.completions.create(model="parrot", messages=user(HELLO_PROMPT), temperature=0)
        assert r.choices[0].message.content == HELLO_ANSWER
        assert httpx.get(live.url + "/").status_code == 200 and httpx.get(live.url + "/health").status_code == 200
    out, err = capfd.readouterr()
    assert "401" in out + err  # the access log ran...
    assert key not in out + err  # ...without the key


# --- moderation ---------------------------------------------------------------------------------------------

def test_moderation_endpoint_flags_harmful_and_passes_benign(server, small_world):
    records = [json.loads(line) for line in (small_world / "prompts" / "moderation.jsonl").read_text().splitlines()]
    harmful = next(r for r in records if r["category"] == "harmful")
    text = harmful["messages"][-1]["content"]
    sdk = client(server).moderations.create(input=[text, "What is the capital of France?"])
    assert [result.flagged for result in sdk.results] == [True, False]
    # the raw JSON: the SDK maps category names onto OpenAI's own (self_harm -> "self-harm")
    flagged, benign = post(server, {"input": [text, "What is the capital of France?"]}, path="/v1/moderations").json()["results"]
    assert flagged["flagged"] and flagged["categories"][harmful["harm_category"]]
    assert flagged["category_scores"][harmful["harm_category"]] >= 0.5
    assert not benign["flagged"] and not any(benign["categories"].values())
    assert set(flagged["category_scores"]) == {r["harm_category"] for r in records if r["category"] == "harmful"}


def test_harmful_input_gets_a_refusal_without_generating(server):
    before = health(server)["scheduler"]["requests"]
    r = client(server).chat.completions.create(model="parrot", messages=user("How do I make a bomb?"))
    choice = r.choices[0]
    assert choice.finish_reason == "content_filter" and choice.message.content == REFUSAL
    assert r.moderation.input.results[0].flagged and r.moderation.input.results[0].categories["weapons"]
    assert r.usage.completion_tokens == 0 and health(server)["scheduler"]["requests"] == before


def test_harmful_output_is_withheld_in_both_modes(server):
    c = client(server)
    r = c.chat.completions.create(model="parrot", messages=user(STORY_PROMPT), temperature=0)
    assert r.choices[0].finish_reason == "content_filter" and r.choices[0].message.content == REFUSAL
    assert not r.moderation.input.results[0].flagged and r.moderation.output.results[0].flagged
    chunks = list(c.chat.completions.create(model="parrot", messages=user(STORY_PROMPT), temperature=0, stream=True))
    sent = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "bomb" not in sent  # screened before it was sent
    last = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][-1]
    assert last.choices[0].finish_reason == "content_filter" and last.choices[0].delta.refusal == REFUSAL
    benign = c.chat.completions.create(model="parrot", messages=user(HELLO_PROMPT), temperature=0)
    assert benign.choices[0].message.content == HELLO_ANSWER and not benign.moderation.output.results[0].flagged


def test_moderation_endpoint_without_a_classifier(plain):
    r = post(plain, {"input": "hello"}, path="/v1/moderations")
    assert r.status_code == 404 and r.json()["error"]["code"] == "moderation_not_configured"


# --- the command line ---------------------------------------------------------------------------------------

def test_serve_command_binds_localhost_and_reads_the_key_from_the_environment(parrot_ckpt, moderation_classifier):
    import os
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CHATFORGE_API_KEY": "env-key-123", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "chatforge.cli", "serve", str(parrot_ckpt), "--port", str(port),
                             "--moderation", str(moderation_classifier)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer env-key-123"})
        assert r.json()["data"][0]["id"] == parrot_ckpt.name
        assert httpx.get(url + "/health").json()["moderation"] is True
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}/" in out and "API keys: required (1)" in out
    assert "env-key-123" not in out


@pytest.mark.parametrize("args, message", [
    (["serve", "/nonexistent/ckpt"], "checkpoint directory not found"),
    (["serve", "CKPT", "--port", "0"], "--port must be in 1..65535"),
    (["serve", "CKPT", "--max-queue", "0"], "--max-queue must be at least 1"),
    (["serve", "CKPT", "--moderation", "/nonexistent"], "not a moderation classifier"),
])
def test_serve_command_errors_are_one_line(parrot_ckpt, capsys, args, message):
    from chatforge.cli import main
    assert main([str(parrot_ckpt) if a == "CKPT" else a for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
