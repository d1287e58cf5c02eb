"""Speculative decoding end to end on a real model: for each prompt (summarise, edit code, continue a list), greedy
generation without speculation and with each method and draft length, in one process on the same engine. Reports
the tokens each verify pass yields (the acceptance length, which greedy decoding makes a property of the model and
the prompt, not of the engine) and the decode tokens/s of each run, and checks that every speculative text is the
plain one token for token.

  python scripts/bench_speculative.py --model default --device cpu --methods ngram,model:default --draft-tokens 4,7 \
      --max-new-tokens 96 --out bench/results

writes <out>/<date>-speculative-<device>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

PROMPTS = {
    "summarise": (
        "Summarise the following paragraph in two sentences.\n\n"
        "The Eiffel Tower was built for the 1889 World's Fair in Paris. Its designer, Gustave Eiffel, ran the "
        "engineering company that also built the iron framework of the Statue of Liberty. Many artists of the day "
        "protested against the tower, calling it useless and monstrous, yet it became the most visited paid "
        "monument in the world and the symbol of the city. The tower was nearly torn down in 1909, but it was "
        "saved because its height made it valuable as a radio antenna.\n\nSummary: The Eiffel Tower"),
    "edit-code": (
        "Rename the variable `count` to `total` in this Python function and return the whole function.\n\n"
        "def add_all(values):\n    count = 0\n    for v in values:\n        count = count + v\n"
        "    print('added', len(values), 'values')\n    return count\n\nAnswer:\ndef add_all(values):\n"),
    "continue-list": (
        "The planets of the solar system, in order from the Sun: 1. Mercury, 2. Venus, 3. Earth, 4. Mars,"),
}


def run(args) -> dict:
    from monokernel.runtime.engine import Engine

    eng = Engine.load(None if args.model == "default" else args.model, device=args.device, dtype=args.dtype,
                      engine=args.engine, max_seq=args.max_seq)
    out = {"model": eng.name, "engine": eng.engine, "device": str(eng.device), "dtype": str(eng.dtype),
           "date": datetime.date.today().isoformat(), "command": "python scripts/bench_speculative.py " +
           " ".join(sys.argv[1:]), "torch": torch.__version__, "python": platform.python_version(), "rows": []}
    sampling = dict(temperature=args.temperature, seed=args.seed)
    out["temperature"], out["seed"] = args.temperature, args.seed
    for name, prompt in PROMPTS.items():
        eng.generate([prompt], max_new_tokens=4)          # warm-up: kernels built, caches touched
        plain = eng.generate([prompt], max_new_tokens=args.max_new_tokens, **sampling)[0]
        base = eng.last_stats
        row = {"prompt": name, "method": "none", "draft_tokens": 0, "new_tokens": base.new_tokens,
               "tokens_per_pass": 1.0, "decode_tokens_per_s": _decode_rate(base), "identical": True}
        out["rows"].append(row)
        print(_line(row), file=sys.stderr, flush=True)
        plain_rate = row["decode_tokens_per_s"]
        for method in args.methods.split(","):
            for k in map(int, args.draft_tokens.split(",")):
                got = eng.generate([prompt], max_new_tokens=args.max_new_tokens, speculative=method, draft_tokens=k,
                                   **sampling)[0]
                st, sp = eng.last_stats, eng.last_speculative
                row = {"prompt": name, "method": method, "draft_tokens": k, "new_tokens": st.new_tokens,
                       "passes": sp.passes, "tokens_per_pass": sp.acceptance_length,
                       "accepted": sp.accepted, "drafted": sp.drafted, "decode_tokens_per_s": _decode_rate(st),
                       "identical": got.token_ids == plain.token_ids,
                       "first_difference": next((i for i, (a, b) in enumerate(zip(got.token_ids, plain.token_ids))
                                                 if a != b), None)}
                row["speedup"] = row["decode_tokens_per_s"] / plain_rate
                out["rows"].append(row)
                print(_line(row), file=sys.stderr, flush=True)
    return out


def _decode_rate(st) -> float:
    """Tokens after the first (the prefill's) over the decode time."""
    return (st.new_tokens - 1) / st.decode_s if st.decode_s > 0 else 0.0


def _line(r: dict) -> str:
    sp = f", {r['speedup']:.2f}x" if "speedup" in r else ""
    return (f"bench_speculative: {r['prompt']} {r['method']} K={r['draft_tokens']}: {r['tokens_per_pass']:.2f} tokens a "
            f"pass, {r['decode_tokens_per_s']:.1f} tokens/s{sp}, identical={r['identical']}")


def markdown(res: dict) -> str:
    how = f"temperature {res['temperature']}, seed {res['seed']}" if res["temperature"] else "greedy"
    lines = [f"**{res['model']}**, {res['engine']} engine on {res['device']} ({res['dtype']}, {how}), {res['date']}",
             "",
             f"`{res['command']}`", "",
             "| prompt | method | draft tokens | tokens a pass | decode tokens/s | vs plain | text identical |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['prompt']} | {r['method']} | {r['draft_tokens']} | {r['tokens_per_pass']:.2f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r.get('speedup', 1.0):.2f}x | {r['identical']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--max-seq", type=int, default=1024)
    ap.add_argument("--methods", default="ngram")
    ap.add_argument("--draft-tokens", default="4")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"{res['date']}-speculative-{res['device'].split(':')[0]}" + ("-sampled" if args.temperature else ""))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    must_match = not args.temperature or res["engine"] == "mega"
    return 0 if not must_match or all(r["identical"] for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
