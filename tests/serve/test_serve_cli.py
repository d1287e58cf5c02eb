"""`monokernel serve` as a real process (answering the openai client, loaded by `bench-serve`), `monokernel chat`
fed through stdin, and the commands' argument errors."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("uvicorn")   # the serve extra; absent on a bare GPU machine
openai = pytest.importorskip("openai")   # the test extra; absent on a bare GPU machine

from monokernel import cli
from monokernel.serve.server import free_port

from servehelp import load_default_engine



@pytest.fixture(scope="module")
def served():
    """`python -m monokernel.cli serve` on a free loopback port, stopped with Ctrl-C (SIGINT) at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "monokernel.cli", "serve", "--port", str(port), "--max-batch", "2",
                             "--max-seq", "512"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.stderr.read()}")
        time.sleep(0.2)
    yield url, proc
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0


def test_serve_answers_openai(served):
    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    [m] = client.models.list().data
    r = client.chat.completions.create(model=m.id, messages=[{"role": "user", "content": "Hi!"}], max_tokens=4,
                                       temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens == 4


def test_bench_serve_report(served, tmp_path, capsys):
    url, _ = served
    code = cli.main(["bench-serve", "--url", url, "--num-requests", "4", "--concurrency", "2", "--input-len", "8",
                     "--output-len", "4", "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    rep = json.loads((tmp_path / "bench-serve.json").read_text())
    assert rep["completed"] == 4 and rep["failed"] == 0 and rep["output_tokens"] == 16
    assert rep["output_token_throughput"] > 0 and rep["ttft_ms"]["p50"] > 0 and rep["tpot_ms"]["p99"] > 0
    assert 0 < rep["itl_ms"]["p50"] <= rep["itl_ms"]["p90"] <= rep["itl_ms"]["p99"]
    md = (tmp_path / "bench-serve.md").read_text()
    assert "| TTFT |" in md and "| ITL |" in md and md in capsys.readouterr().out


def test_bench_serve_rate(served, tmp_path):
    url, _ = served
    assert cli.main(["bench-serve", "--url", url, "--num-requests", "3", "--request-rate", "20", "--input-len", "4",
                     "--output-len", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "bench-serve.json").read_text())["mode"] == "rate 20/s"


@pytest.mark.parametrize("argv, message", [
    (["bench-serve", "--url", "http://example.com:8000"], "only loads a server on this machine"),
    (["bench-serve", "--num-requests", "0"], "--num-requests 0 must be in 1..10000"),
    (["bench-serve", "--url", f"http://127.0.0.1:{free_port()}"], "no server answers"),
    (["serve", "--max-batch", "0"], "--max-batch 0 must be >= 1"),
    (["serve", "--max-queue", "-1"], "--max-queue -1 must be >= 0"),
])
def test_argument_errors(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_chat_multi_turn(monkeypatch, capsys):
    """Two turns from stdin: both replies stream to stdout, and the second turn prefills only its new tokens."""
    from monokernel.runtime.engine import Engine

    engine = load_default_engine()
    monkeypatch.setattr(Engine, "load", staticmethod(lambda *a, **k: engine))
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\nAnd of Spain?\n/reset\n"
                                                  "Hello\n/exit\nnever read\n"))
    assert cli.main(["chat", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    stats = [ln for ln in err.splitlines() if ln.startswith("[")]
    assert len(stats) == 3 and len([ln for ln in out.splitlines() if ln.strip()]) == 3
    reused = [int(s.split(" prefilled, ")[1].split()[0]) for s in stats]
    prompt = [int(s.split("prompt ")[1].split()[0]) for s in stats]
    assert reused[1] > prompt[0] // 2   # the first turn's K/V, still in the slot
    assert "conversation forgotten" in err


def test_chat_speculative(monkeypatch, capsys):
    """`chat --speculative ngram` at temperature 0: the replies of plain chat, the tokens per pass after each."""
    from monokernel.runtime.engine import Engine

    engine = load_default_engine()
    monkeypatch.setattr(Engine, "load", staticmethod(lambda *a, **k: engine))
    turns = "Repeat: one two three one two three\nAgain?\n/exit\n"
    replies = []
    for flags in ([], ["--speculative", "ngram", "--draft-tokens", "3"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO(turns))
        assert cli.main(["chat", "--max-new-tokens", "6", "--temperature", "0", *flags]) == 0
        out, err = capsys.readouterr()
        replies.append(out)
    assert replies[0] == replies[1] and err.count("tokens per pass over") == 2


def test_serve_speculative_past_the_megakernel_verify_step(monkeypatch, capsys):
    """--speculative with more draft tokens than the megakernel's verify step takes: refused at startup with the
    reason, nothing served."""
    from monokernel.runtime.engine import Engine

    engine = load_default_engine()
    monkeypatch.setattr(engine, "engine", "mega")
    monkeypatch.setattr(Engine, "load", staticmethod(lambda *a, **k: engine))
    monkeypatch.setattr("monokernel.serve.server.serve", lambda *a: pytest.fail("served"))
    assert cli.main(["serve", "--speculative", "ngram", "--draft-tokens", "8", "--port", str(free_port())]) == 2
    assert "--draft-tokens 8: the megakernel verifies at most 7 draft tokens a pass" in capsys.readouterr().err
