"""`monokernel chat`: a multi-turn chat in the terminal, streamed, on the request-level engine in this process.

Every turn resends the whole conversation through the chat template; the slot still holds the previous turns'
K/V, so only the new message is prefilled (the stats line after each reply counts it). /reset forgets the
conversation, /exit (or end of input) quits, Ctrl-C stops a reply. With --speculative each
step verifies a draft (speculative/scheduled.py) and the tokens per pass follow the stats line.
"""
from __future__ import annotations

import sys
import time

from ..errors import InputError
from ..cli import add_speculative_arguments
from .cli import add_model_arguments, speculative_hook

HELP = "/reset forgets the conversation, /exit quits, Ctrl-C stops a reply"


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    add_speculative_arguments(p)


def run(args) -> int:
    from ..cli import speculative_arguments, weights_argument
    from ..runtime.engine import Engine
    from ..runtime.sampling import SamplingParams
    from ..runtime.scheduler import Scheduler

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_new_tokens=args.max_new_tokens)
    spec_kw = speculative_arguments(args)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, engine=args.engine, max_seq=args.max_seq,
                         weights=weights_argument(args))
    if engine.tokenizer is None or not engine.tokenizer.chat_template:
        raise InputError(f"model {engine.name!r} has no chat template; use `monokernel generate` for plain prompts")
    hook = speculative_hook(engine, spec_kw)
    sched = Scheduler(engine, 1, speculative=hook)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    tty = sys.stdin.isatty()
    print(f"monokernel chat: {engine.name} ({engine.engine} engine). {HELP}", file=sys.stderr)
    while True:
        if tty:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            history = list(opening)
            print("monokernel: conversation forgotten", file=sys.stderr)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = _turn(sched, history, params)
            if hook is not None:
                print(f"[{hook.stats.summary()}]", file=sys.stderr)
                hook.stats = type(hook.stats)()
        except InputError as e:
            history.pop()
            print(f"monokernel: {e} (/reset starts a new conversation)", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})


def _turn(sched, history: list[dict], params) -> str:
    before = (sched.stats.prefill_tokens, sched.stats.reused_tokens)
    rid = sched.add_request(messages=history, params=params)
    prompt_tokens = len(sched.live[rid].prompt_ids)
    t0, first, n, parts = time.perf_counter(), None, 0, []
    try:
        while sched.has_work:
            for ev in sched.step():
                if ev.error is not None:
                    raise ev.error
                first = first or time.perf_counter()
                n += 1
                parts.append(ev.text)
                print(ev.text, end="", flush=True)
    except KeyboardInterrupt:
        sched.abort(rid)
        print(" [stopped]", end="")
    print()
    computed, reused = sched.stats.prefill_tokens - before[0], sched.stats.reused_tokens - before[1]
    elapsed = time.perf_counter() - (first or t0)
    rate = f", {(n - 1) / elapsed:.1f} tokens/s" if n > 1 and elapsed > 0 else ""
    print(f"[{n} tokens{rate}; prompt {prompt_tokens} tokens: {computed} prefilled, {reused} reused from the last "
          f"turn; first token after {1e3 * ((first or t0) - t0):.0f} ms]", file=sys.stderr)
    return "".join(parts)
