"""`monokernel bench-serve`: a load generator in the style of vLLM's serving benchmark, against a running server.

N streamed completions, sent either by C concurrent clients or at a Poisson rate of R requests/s, each with a
synthetic prompt of about --input-len words and exactly --output-len tokens (ignore_eos). Reports request and
token throughput, time to first token (TTFT), time per output token after the first (TPOT), inter-token latency
(ITL, every gap between streamed tokens) and end-to-end latency, mean and p50/p90/p99, as JSON + Markdown.
Loopback only, at most MAX_REQUESTS requests and --timeout seconds in all.
"""
from __future__ import annotations

import http.client
import json
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ..errors import InputError, MonokernelError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_REQUESTS = 10_000
MAX_IN_FLIGHT = 256            # threads of the rate mode
WORDS = ("the river city light morning stone quiet garden number story music window paper bridge forest "
         "engine summer letter ocean market winter mountain silver orange history planet yellow circle").split()


@dataclass
class Result:
    ok: bool
    start: float
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def add_arguments(p) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--model", default=None, help="model id (default: the server's first, from /v1/models)")
    p.add_argument("--num-requests", type=int, default=32)
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=None, help="clients sending back to back (default 8)")
    load.add_argument("--request-rate", type=float, default=None, help="requests/s, Poisson arrivals")
    p.add_argument("--input-len", type=int, default=32, help="prompt words (about as many tokens)")
    p.add_argument("--output-len", type=int, default=32, help="tokens generated per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run; unfinished requests "
                                                               "count as failed")
    p.add_argument("--out", default="bench-serve", help="directory for bench-serve.json and bench-serve.md")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    host, port = _loopback(args.url)
    if not 1 <= args.num_requests <= MAX_REQUESTS:
        raise InputError(f"--num-requests {args.num_requests} must be in 1..{MAX_REQUESTS}")
    if args.concurrency is not None and args.concurrency < 1:
        raise InputError(f"--concurrency {args.concurrency} must be >= 1")
    if args.request_rate is not None and not args.request_rate > 0:
        raise InputError(f"--request-rate {args.request_rate} must be > 0")
    if args.input_len < 1 or args.output_len < 1:
        raise InputError("--input-len and --output-len must be >= 1")
    model = args.model or _first_model(host, port)
    rng = random.Random(args.seed)
    prompts = [f"{i}. " + " ".join(rng.choice(WORDS) for _ in range(args.input_len - 1))
               for i in range(args.num_requests)]
    mode = (f"rate {args.request_rate:g}/s" if args.request_rate else f"concurrency {args.concurrency or 8}")
    print(f"bench-serve: {args.num_requests} requests to {args.url} ({model}), {mode}, {args.input_len} words in, "
          f"{args.output_len} tokens out", file=sys.stderr)
    deadline = time.monotonic() + args.timeout
    progress = _Progress(args.num_requests, not args.no_progress)

    def one(prompt: str) -> Result:
        r = _request(host, port, model, prompt, args.output_len, deadline)
        progress.tick()
        return r

    t0 = time.perf_counter()
    if args.request_rate:
        results = _at_rate(one, prompts, args.request_rate, rng)
    else:
        with ThreadPoolExecutor(args.concurrency or 8) as pool:
            results = list(pool.map(one, prompts))
    duration = time.perf_counter() - t0
    report = summarize(results, duration, dict(url=args.url, model=model, num_requests=args.num_requests,
                                               mode=mode, input_len=args.input_len, output_len=args.output_len,
                                               seed=args.seed, command=" ".join(sys.argv)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-serve.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench-serve.md").write_text(markdown(report))
    print(markdown(report), end="")
    print(f"bench-serve: wrote {out / 'bench-serve.json'} and {out / 'bench-serve.md'}", file=sys.stderr)
    return 0 if report["failed"] == 0 else 1


def _loopback(url: str) -> tuple[str, int]:
    u = urlparse(url)
    if u.scheme != "http" or u.hostname not in LOOPBACK:
        raise InputError(f"--url {url}: bench-serve only loads a server on this machine (http://127.0.0.1:PORT)")
    return u.hostname, u.port or 80


def _first_model(host: str, port: int) -> str:
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/v1/models")
        data = json.loads(conn.getresponse().read())
        return data["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise MonokernelError(f"no server answers on http://{host}:{port}/v1/models ({e}); start one with "
                              "`monokernel serve` or pass --url") from None


def _request(host: str, port: int, model: str, prompt: str, output_len: int, deadline: float) -> Result:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                       "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    res = Result(ok=False, start=start)
    times: list[float] = []
    try:
        conn = http.client.HTTPConnection(host, port, timeout=max(1.0, deadline - time.monotonic()))
        conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            res.error = f"HTTP {resp.status}: {resp.read()[:200].decode(errors='replace')}"
            return res
        for raw in resp:
            if time.monotonic() > deadline:
                res.error = "timed out (--timeout)"
                conn.close()
                return res
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                res.error = chunk["error"]["message"]
                return res
            if chunk.get("usage"):
                res.output_tokens = chunk["usage"]["completion_tokens"]
                res.prompt_tokens = chunk["usage"]["prompt_tokens"]
            if chunk.get("choices"):
                times.append(time.perf_counter())
        conn.close()
    except (OSError, ValueError, http.client.HTTPException) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    if not times:
        res.error = "no tokens streamed"
        return res
    res.ok = True
    res.ttft, res.latency = times[0] - start, times[-1] - start
    res.itl = [b - a for a, b in zip(times, times[1:])]
    res.output_tokens = res.output_tokens or len(times)
    return res


def _at_rate(one, prompts: list[str], rate: float, rng: random.Random) -> list[Result]:
    results: list[Result | None] = [None] * len(prompts)
    slots = threading.Semaphore(MAX_IN_FLIGHT)

    def worker(i: int):
        try:
            results[i] = one(prompts[i])
        finally:
            slots.release()

    threads = []
    for i in range(len(prompts)):
        slots.acquire()
        t = threading.Thread(target=worker, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(rng.expovariate(rate))
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


class _Progress:
    def __init__(self, total: int, show: bool):
        self.total, self.show, self.done, self.lock = total, show, 0, threading.Lock()
        self.every = max(1, total // 10)

    def tick(self) -> None:
        with self.lock:
            self.done += 1
            if self.show and (self.done % self.every == 0 or self.done == self.total):
                print(f"bench-serve: {self.done}/{self.total} requests done", file=sys.stderr, flush=True)


def _stats(values: list[float], scale: float = 1e3) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    v = sorted(values)

    def pct(q: float) -> float:   # nearest rank
        return v[min(len(v) - 1, max(0, round(q / 100 * len(v) + 0.5) - 1))] * scale

    return {"mean": statistics.fmean(v) * scale, "p50": pct(50), "p90": pct(90), "p99": pct(99)}


def summarize(results: list[Result], duration: float, setup: dict) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {**setup, "completed": len(ok), "failed": setup["num_requests"] - len(ok),
            "errors": sorted({r.error for r in results if not r.ok})[:10],
            "duration_s": duration, "request_throughput": len(ok) / duration,
            "output_token_throughput": out_tokens / duration,
            "total_token_throughput": (in_tokens + out_tokens) / duration,
            "prompt_tokens": in_tokens, "output_tokens": out_tokens,
            "ttft_ms": _stats([r.ttft for r in ok]), "tpot_ms": _stats(tpot),
            "itl_ms": _stats([g for r in ok for g in r.itl]), "e2e_latency_ms": _stats([r.latency for r in ok])}


def markdown(rep: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.1f}"

    rows = [f"| {name} | {f(s['mean'])} | {f(s['p50'])} | {f(s['p90'])} | {f(s['p99'])} |"
            for name, s in (("TTFT", rep["ttft_ms"]), ("TPOT", rep["tpot_ms"]), ("ITL", rep["itl_ms"]),
                            ("E2E latency", rep["e2e_latency_ms"]))]
    return "\n".join([
        f"## bench-serve: {rep['model']} at {rep['url']}", "",
        f"{rep['num_requests']} requests, {rep['mode']}, {rep['input_len']} words in, {rep['output_len']} tokens "
        f"out: {rep['completed']} completed, {rep['failed']} failed in {rep['duration_s']:.1f} s.", "",
        f"- request throughput {rep['request_throughput']:.2f} requests/s",
        f"- output token throughput {rep['output_token_throughput']:.1f} tokens/s "
        f"(total, with prompts: {rep['total_token_throughput']:.1f} tokens/s)", "",
        "| ms | mean | p50 | p90 | p99 |", "|---|---|---|---|---|", *rows, "",
        *([f"errors: {'; '.join(rep['errors'])}", ""] if rep["errors"] else [])]) + "\n"
