"""The OpenAI-compatible server on the default model (fp32 reference engine, CPU), through the real `openai`
client and raw HTTP: the API, continuous batching seen from outside, and every fault with the server still
answering afterwards. One server (uvicorn in a thread, 8 slots) serves the whole module."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("uvicorn")   # the serve extra; absent on a bare GPU machine
openai = pytest.importorskip("openai")   # the test extra; absent on a bare GPU machine

from monokernel.serve.server import ServeOptions, ServerThread

from servehelp import SERVE_MAX_SEQ, Faults, load_default_engine


PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
           "Water boils at", "My favourite food is", "In 1969, the first", "The quick brown fox"]


@pytest.fixture(scope="module")
def engine():
    return load_default_engine()


@pytest.fixture(scope="module")
def faults():
    return Faults()


@pytest.fixture(scope="module")
def server(engine, faults):
    with ServerThread(engine, ServeOptions(max_batch=8, max_queue=64), wrap_decoder=faults.wrap) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(engine):
    return engine.name


def engine_state(server) -> dict:
    return server.loop.call(lambda s: dict(steps=s.stats.steps, running=s.num_running, waiting=s.num_waiting,
                                           prefill=s.stats.prefill_tokens, aborted=s.stats.aborted)).result(10)


def wait_idle(server, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (state := engine_state(server))["running"] or state["waiting"]:
        assert time.monotonic() < deadline, f"the engine is still busy: {state}"
        time.sleep(0.02)
    return state


def post(server, path: str, content: bytes | str | None = None, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, content=content, timeout=60, **kwargs)


def assert_error(resp: httpx.Response, status: int, *words: str, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    return err


# ---- the API -------------------------------------------------------------------------------------
def test_models_and_health(server, client, model):
    assert [m.id for m in client.models.list().data] == [model]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8


def test_completion(client, model, engine):
    """Greedy text equals the engine's own fixed-batch generate()."""
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    [want] = engine.generate(PROMPTS[0], max_new_tokens=8)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids) and r.usage.completion_tokens == 8


def test_completion_stream(client, model):
    whole = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_sse_ends_with_done(server, model):
    body = {"model": model, "prompt": PROMPTS[2], "max_tokens": 3, "temperature": 0, "stream": True}
    lines = [ln for ln in post(server, "/v1/completions", json.dumps(body)).text.splitlines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]" and len(lines) == 4


def test_chat_multi_turn(client, model, engine):
    """system/user/assistant/user through the model's template; streamed equals whole."""
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    tok = engine.tokenizer
    assert r.usage.prompt_tokens == len(tok.encode(tok.apply_chat_template(messages), add_special_tokens=False))
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings(client, model):
    plain = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    cut = plain.index("\n")   # " Paris.\n\n...": the greedy text has a newline to stop at
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=["\n", "zzz"])
    assert r.choices[0].text == plain[:cut] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=".")
    assert r.choices[0].text == plain[:plain.index(".")]


def test_seed_reproducible(client, model):
    def run(seed):
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell a story."}],
                                              max_tokens=10, temperature=1.0, top_p=0.95, seed=seed)
    a, b = run(11), run(11)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token and c.logprob <= 0
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.top_logprobs[0]) == 2 and lp.text_offset[0] == 0


def test_concurrent_equal_alone(client, model, server):
    """8 clients x 4 requests (greedy, different lengths so requests join and leave the batch at different
    steps): every output equals the same request run alone, token for token."""
    def request(prompt_index: int):
        return client.completions.create(model=model, prompt=PROMPTS[prompt_index], max_tokens=2 + prompt_index // 2,
                                         temperature=0, extra_body={"ignore_eos": True}, logprobs=0)

    def tokens(r):
        return r.choices[0].logprobs.tokens

    alone = [tokens(request(i)) for i in range(len(PROMPTS))]

    def client_run(c: int):
        return [(i, tokens(request(i))) for i in ((c + j) % len(PROMPTS) for j in range(4))]

    with ThreadPoolExecutor(8) as pool:
        results = [x for out in pool.map(client_run, range(8)) for x in out]
    assert len(results) == 32
    for i, toks in results:
        assert toks == alone[i], PROMPTS[i]
    wait_idle(server)


def test_late_request_overtakes(client, model):
    """Continuous batching, seen through stream timestamps: a short request sent while a long one streams gets
    its tokens, and finishes, before the long one does."""
    times: dict[str, list[float]] = {"long": [], "short": []}
    started = threading.Event()

    def stream(name, max_tokens):
        for c in client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
            if c.choices and c.choices[0].text:
                times[name].append(time.monotonic())
                if len(times[name]) == 3:
                    started.set()

    long = threading.Thread(target=stream, args=("long", 30))
    long.start()
    assert started.wait(60)
    stream("short", 3)
    long.join(120)
    assert len(times["long"]) >= 25 and len(times["short"]) >= 2
    assert times["short"][0] < times["long"][-1] and times["short"][-1] < times["long"][-1]


def test_prefix_reuse(client, model, server):
    """The second turn of a chat prefills only what the first turn's slot does not hold."""
    wait_idle(server)
    first = [{"role": "user", "content": "What is the capital of France?"}]
    r1 = client.chat.completions.create(model=model, messages=first, max_tokens=12, temperature=0)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And of Italy?"}]
    before = wait_idle(server)["prefill"]
    r2 = client.chat.completions.create(model=model, messages=second, max_tokens=4, temperature=0)
    computed = wait_idle(server)["prefill"] - before
    assert computed < r2.usage.prompt_tokens - r1.usage.prompt_tokens
    metrics = httpx.get(server.url + "/metrics").text
    assert "monokernel_prefill_computed_tokens_total" in metrics


def test_metrics(server, client, model):
    client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    for name in ("monokernel_queue_length", "monokernel_running_sequences", "monokernel_generated_tokens_total",
                 "monokernel_time_to_first_token_seconds_bucket", "monokernel_inter_token_latency_seconds_count"):
        assert name in text
    generated = next(float(ln.split()[-1]) for ln in text.splitlines()
                     if ln.startswith("monokernel_generated_tokens_total"))
    assert generated >= 3


# ---- bad input and faults ----------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, words, param", [
    (b'{"model": "m", "prompt": ', 400, ["not valid JSON"], None),
    (b'{"model": "m", "prompt": "caf\xff"}', 400, ["not valid UTF-8"], None),
    (b'[1, 2]', 400, ["JSON object"], None),
    (json.dumps({"model": "MODEL", "prompt": "hi", "max_tokens": "5"}), 400, ["valid integer"], "max_tokens"),
    (json.dumps({"model": "MODEL", "prompt": 5}), 400, [], "prompt"),
    (json.dumps({"model": "MODEL", "prompt": "hi", "temperature": "hot"}), 400, [], "temperature"),
    (json.dumps({"model": "MODEL", "prompt": "hi", "frobnicate": 1}), 400, ["frobnicate"], "frobnicate"),
    (json.dumps({"model": "MODEL", "prompt": "hi", "n": 2}), 400, ["n=2 is not supported"], "n"),
    (json.dumps({"model": "MODEL", "prompt": "hi", "echo": True}), 400, ["echo"], "echo"),
    (json.dumps({"model": "MODEL", "prompt": ["a", "b"]}), 400, ["2 prompts"], "prompt"),
    (json.dumps({"model": "MODEL", "prompt": "hi", "max_tokens": 0}), 400, [], "max_tokens"),
    (json.dumps({"prompt": "hi"}), 400, ["model is required"], "model"),
    (json.dumps({"model": "gpt-4", "prompt": "hi"}), 404, ["gpt-4", "does not exist"], "model"),
])
def test_bad_completion_requests(server, model, client, body, status, words, param):
    if isinstance(body, str):
        body = body.replace("MODEL", model)
    assert_error(post(server, "/v1/completions", body, headers={"content-type": "application/json"}), status, *words,
                 param=param)
    assert client.completions.create(model=model, prompt="Hi", max_tokens=1).choices[0].finish_reason


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_bad_chat_requests(server, model, extra, param):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    assert_error(post(server, "/v1/chat/completions", json.dumps(body)), 400, param=param)


def test_unknown_model_client(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi")


def test_unknown_route(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_prompt_too_long(server, model, engine):
    prompt = " hello" * (SERVE_MAX_SEQ + 100)
    n = len(engine.tokenizer.encode(prompt))
    err = assert_error(post(server, "/v1/completions", json.dumps({"model": model, "prompt": prompt})), 400,
                       f"{n} tokens", str(SERVE_MAX_SEQ), param="prompt")
    assert err["code"] == "context_length_exceeded"


def test_max_tokens_past_context(server, model):
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": SERVE_MAX_SEQ}
    assert_error(post(server, "/v1/completions", json.dumps(body)), 400, f"max_tokens={SERVE_MAX_SEQ}",
                 str(SERVE_MAX_SEQ), "lower max_tokens", param="max_tokens")


@pytest.mark.parametrize("as_ids", [False, True])
def test_200k_token_prompt(server, model, client, as_ids):
    """A 200 000-token prompt (as text or ids) is refused quickly with the numbers; the server goes on."""
    prompt = [42] * 200_000 if as_ids else "a " * 200_000
    t0 = time.monotonic()
    resp = post(server, "/v1/completions", json.dumps({"model": model, "prompt": prompt}))
    assert time.monotonic() - t0 < 30
    assert_error(resp, 400, str(SERVE_MAX_SEQ), "200000 tokens" if as_ids else "tokens", param="prompt")
    assert client.completions.create(model=model, prompt="Hi", max_tokens=2, temperature=0).usage


def test_disconnect_frees_slot(server, model):
    """A client that goes away mid-stream: its request is aborted and its slot freed within a step or two."""
    wait_idle(server)
    body = {"model": model, "prompt": PROMPTS[1], "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", content=json.dumps(body), timeout=60) as resp:
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
        closed = engine_state(server)
        assert closed["running"] == 1
    deadline = time.monotonic() + 10
    while (state := engine_state(server))["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert state["aborted"] == closed["aborted"] + 1
    # the server notices on its next write to the closed socket, then the abort lands before the next step
    assert state["steps"] - closed["steps"] <= 3


def test_disconnect_non_streamed(server, model):
    """A non-streamed request whose client gives up is aborted too."""
    wait_idle(server)
    before = engine_state(server)["aborted"]
    body = {"model": model, "prompt": PROMPTS[1], "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
    state = wait_idle(server, timeout=10)
    assert state["aborted"] == before + 1


def test_body_too_large(server, model):
    small = ServeOptions(max_batch=1, max_body_bytes=1000)
    with ServerThread(server.loop.scheduler.engine, small) as srv:
        big = json.dumps({"model": model, "prompt": "x" * 2000})
        assert_error(post(srv, "/v1/completions", big), 413, "1000 bytes")
        assert post(srv, "/v1/completions", json.dumps({"model": model, "prompt": "Hi", "max_tokens": 1})).is_success


def test_engine_fault(server, client, model, faults, engine):
    """A decoder step that raises: its requests get a 500, the engine resets, later requests are served."""
    faults.armed = True
    with pytest.raises(openai.InternalServerError, match="injected fault"):
        client.completions.create(model=model, prompt=PROMPTS[4], max_tokens=6, temperature=0)
    assert not faults.armed
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["failed_steps"] >= 1
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert r.choices[0].text == engine.generate(PROMPTS[0], max_new_tokens=8)[0].text
    faults.armed = True   # streamed: the 200 is sent already, so the error comes as the last event
    body = {"model": model, "prompt": PROMPTS[4], "max_tokens": 6, "stream": True}
    lines = [ln for ln in post(server, "/v1/completions", json.dumps(body)).text.splitlines() if ln]
    assert "injected fault" in lines[-2] and '"server_error"' in lines[-2] and lines[-1] == "data: [DONE]"
    assert client.completions.create(model=model, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


# ---- servers of their own ------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [429, 503])
def test_queue_full(engine, status):
    """One slot and one queue place: the third concurrent request is refused with the configured status."""
    with ServerThread(engine, ServeOptions(max_batch=1, max_queue=1, queue_full_status=status)) as srv:
        body = json.dumps({"model": engine.name, "prompt": PROMPTS[1], "max_tokens": 200, "stream": True,
                           "ignore_eos": True})
        with httpx.stream("POST", srv.url + "/v1/completions", content=body, timeout=60) as first, \
                httpx.stream("POST", srv.url + "/v1/completions", content=body, timeout=60) as second:
            lines = first.iter_lines()   # kept: a dropped iterator closes the stream, and the server aborts it
            next(lines)
            assert first.status_code == second.status_code == 200
            third = post(srv, "/v1/completions", body)
            err = assert_error(third, status, "--max-queue")
            assert err["code"] == "queue_full"
        wait_idle(srv)   # the closed streams are aborted once the server notices
        r = httpx.post(srv.url + "/v1/completions", timeout=60,
                       json={"model": engine.name, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200


def test_api_key(engine):
    with ServerThread(engine, ServeOptions(max_batch=1, api_key="sesame")) as srv:
        body = {"model": engine.name, "prompt": "Hi", "max_tokens": 1}
        assert_error(httpx.post(srv.url + "/v1/completions", json=body), 401, "--api-key")
        ok = httpx.post(srv.url + "/v1/completions", json=body, headers={"authorization": "Bearer sesame"})
        assert ok.status_code == 200
        assert httpx.get(srv.url + "/health").status_code == 200   # probes need no key
