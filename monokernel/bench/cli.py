"""`monokernel bench`: the megakernel against torch.compile and transformers, same process, same inputs.

  monokernel bench --model preset:llama-3.1-8b --batch 1,16 --context 512,8192

writes <out>/<date>-<gpu>.json, .md and .png (see BENCHMARKS.md for how to read them). The JSON and the
Markdown are rewritten after every row, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from ..errors import MonokernelError
from .engines import ENGINES

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MODELS = ["preset:llama-3.2-1b", "preset:llama-3.1-8b"]


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected non-negative integers")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(not (v >= 0 and v < float("inf")) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected finite numbers >= 0")
    return values


def _engines(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ENGINES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown engine(s) {', '.join(bad) or '(none)'}; known: {', '.join(ENGINES)}")
    return names


def _weights(text: str) -> list[str]:
    from .runner import weights_format

    names = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [n if weights_format(n) is None else weights_format(n).name for n in names] or ["dense"]
    except MonokernelError as e:
        raise argparse.ArgumentTypeError(str(e).replace("quantize=", "")) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=None, metavar="preset:NAME|PATH",
                   help="model(s): repeat the flag or give a comma list (default: "
                        f"{','.join(DEFAULT_MODELS)}); presets get seeded random weights")
    p.add_argument("--engines", type=_engines, default=["monokernel", "torch-compile", "hf"],
                   help=f"comma list of {', '.join(ENGINES)} (default: monokernel,torch-compile,hf); "
                        "hf-compile is transformers with torch.compile(mode='reduce-overhead')")
    p.add_argument("--batch", type=_ints, default=[1, 4, 8, 16], help="comma list (default: 1,4,8,16)")
    p.add_argument("--context", type=_ints, default=[512, 2048, 8192, 32768],
                   help="cached positions when decoding starts, comma list (default: 512,2048,8192,32768)")
    p.add_argument("--verify-tokens", type=_ints, default=[1], metavar="T,...",
                   help="rows a sequence scores in one launch, comma list: 1 decodes; T in 2..8 times the "
                        "megakernel's verify step of speculative decoding (the last token and T - 1 drafts; "
                        "other engines have no such rows); default: 1")
    p.add_argument("--temperatures", type=_floats, default=[0.0], metavar="X,...",
                   help="temperatures of the megakernel's timed steps, comma list: 0 greedy; X > 0 draws every row "
                        "inside the kernel (the other engines have no such rows); default: 0")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="the sampled rows' top-k, drawn in the kernel (default: none)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--weights", type=_weights, default=["dense"], metavar="dense|FORMAT,...",
                   help="weight formats, comma list: dense (as stored, in --dtype), or --quantize formats (int8, "
                        "int4, int4-g64, fp8, ...: each model's round-to-nearest twin); quantised rows run on the "
                        "reference engine (add it to --engines); default: dense")
    p.add_argument("--steps", type=int, default=100, help="timed steps per row (default: 100)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before them (default: 20)")
    p.add_argument("--agreement-steps", type=int, default=16,
                   help="greedy-agreement steps at the start of each row (default: 16)")
    p.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    p.add_argument("--append", action="store_true",
                   help="merge into today's <date>-<gpu>.json there instead of writing a new -N file")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--devices", default=None, metavar="all|cuda:0,cuda:1,...",
                   help="run the (model, batch, context) rows in parallel, one process per GPU at a time, "
                        "merged into one result (a full table in the time of its slowest rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tc-attention", choices=["math", "sdpa"], default="math",
                   help="torch-compile baseline's attention: written out for inductor (gpt-fast) or SDPA")
    p.add_argument("--no-compile", action="store_true",
                   help="debugging only: run the torch-compile and hf-compile engines uncompiled")
    p.add_argument("--no-progress", action="store_true")


def _models(values: list[str] | None) -> list[str]:
    out = []
    for v in values or DEFAULT_MODELS:
        out += [m.strip() for m in v.split(",") if m.strip()]
    return out


def _child_args(args: argparse.Namespace) -> list[str]:
    """The flags every per-row process of a --devices run gets (model, batch, context, device: its own)."""
    out = ["--engines", ",".join(args.engines), "--dtype", args.dtype, "--weights", ",".join(args.weights),
           "--verify-tokens", ",".join(map(str, args.verify_tokens)),
           "--temperatures", ",".join(map(str, args.temperatures)),
           *(["--top-k", str(args.top_k)] if args.top_k else []),
           "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--agreement-steps", str(args.agreement_steps), "--seed", str(args.seed),
           "--tc-attention", args.tc_attention]
    return out + (["--no-compile"] if args.no_compile else [])


def _command(given: list[str] | None = None) -> str:
    argv = given if given is not None else sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    return "monokernel bench " + shlex.join(argv)


def run(args: argparse.Namespace) -> int:
    from . import report
    from .runner import BenchConfig, run_benchmark

    if args.steps < 1 or args.warmup < 0 or args.agreement_steps < 0:
        raise MonokernelError("--steps must be >= 1, --warmup and --agreement-steps >= 0")
    if args.top_k is not None and (args.top_k < 1 or not any(args.temperatures)):
        raise MonokernelError(f"--top-k {args.top_k}: top-k restricts sampled rows, so it needs K >= 1 and a "
                              "temperature above 0 in --temperatures (e.g. --temperatures 0,0.8 --top-k 50)")
    from ..schedule.inputs import MAX_TOKENS_PER_SEQ
    if any(not 1 <= t <= MAX_TOKENS_PER_SEQ for t in args.verify_tokens):
        raise MonokernelError(f"--verify-tokens {','.join(map(str, args.verify_tokens))}: each T must be in "
                              f"1..{MAX_TOKENS_PER_SEQ}")
    cfg = BenchConfig(models=_models(args.model), engines=args.engines, batches=args.batch, contexts=args.context,
                      tokens_per_seq=args.verify_tokens, temperatures=args.temperatures, top_k=args.top_k,
                      dtype=DTYPES[args.dtype], weights=args.weights, steps=args.steps, warmup=args.warmup,
                      agreement_steps=args.agreement_steps, device=args.device, seed=args.seed,
                      compile=not args.no_compile, tc_attention=args.tc_attention, progress=not args.no_progress,
                      command=_command(getattr(args, "argv", None)))
    out_dir = Path(args.out)
    state: dict = {}

    def checkpoint(result: dict) -> None:
        if "paths" not in state:
            state["paths"] = report.output_paths(out_dir, result, args.append)
            path = state["paths"]["json"]
            state["base"] = json.loads(path.read_text()) if args.append and path.exists() else None
        merged = result if state["base"] is None else report.merge(state["base"], result)
        report.write_reports(merged, state["paths"], with_plot=False)

    if args.devices:
        if args.device:
            raise MonokernelError("give --device (one device) or --devices (several), not both")
        from .parallel import Job, parse_devices, run_parallel

        jobs = [Job(m, b, c) for m in cfg.models for b in cfg.batches for c in cfg.contexts]
        result = run_parallel(jobs, parse_devices(args.devices), _child_args(args), cfg.command, checkpoint,
                              lambda msg: print(msg, file=sys.stderr, flush=True))
    else:
        result = run_benchmark(cfg, checkpoint=checkpoint)
        checkpoint(result)
    merged = result if state["base"] is None else report.merge(state["base"], result)
    written = report.write_reports(merged, state["paths"])
    print(report.markdown(merged))
    for kind, path in written.items():
        print(f"bench: wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monokernel bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
        args.argv = argv          # the command recorded in the results
        return run(args)
    except MonokernelError as e:
        print(f"monokernel bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
