"""Times the megakernel on random bf16 weights and prints where each block spends the step, per op, from
the kernel's own per-task timestamps. Each --variant is a set of Tuning knobs (schedule/tuning.py) timed in turn on
the same weights and cache, so variants are compared within one run.

  python scripts/profile_megakernel.py --models llama-3.2-1b,llama-3.1-8b --context 512 \
      --variant "" --variant gemv_mma=1 --json out.json

--sample T[,K[,P]] times every row sampled in the kernel at temperature T (top-k K, top-p P) instead of greedy.
"""
import argparse
import json
import os

import numpy as np

import torch

from monokernel.models.load import load_spec
from monokernel.models.weights import quantize_weights, random_weights
from monokernel.runtime.kv_cache import KVCache
from monokernel.runtime.mega import MegaDecoder
from monokernel.schedule.tuning import Tuning


EXTRA_SEQ = 64   # cache positions past the context


def model_spec(name: str):
    """A preset by name, or "default": the bundled model's shape (its layers are GGUF Q4_1: --weights int4-g32-min)."""
    return load_spec(None if name == "default" else f"preset:{name}")


def time_steps(mk: MegaDecoder, tok, pos, steps: int) -> float:
    for _ in range(10):
        mk.launch(tok, pos)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    ev[0].record()
    for i in range(steps):
        mk.launch(tok, pos)
        ev[i + 1].record()
    torch.cuda.synchronize()
    mk.check()
    return sorted(ev[i].elapsed_time(ev[i + 1]) for i in range(steps))[steps // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b", help="presets, or default (the bundled model)")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--context", default="512")
    ap.add_argument("--variant", action="append", default=None,
                    help="k=v,k=v Tuning knobs ('' = defaults); launch=plain times a plain (not cooperative) launch")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--weights", default="bf16", help="formats of the layers' matrices, comma-separated (e.g. "
                    "bf16,int8,int4-g128): random bf16 weights quantised round-to-nearest")
    ap.add_argument("--sample", default=None, metavar="T[,K[,P]]",
                    help="every row sampled in the kernel: temperature, top-k, top-p (default: greedy)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--raw", default=None, help="folder for each run's raw stamps (.npz) to analyse offline")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        spec = model_spec(name)
        w = random_weights(spec, torch.bfloat16, "cuda", seed=0)
        for fmt in args.weights.split(","):
            profile_format(args, name, spec, w if fmt == "bf16" else quantize_weights(w, fmt), fmt, rows)
        del w
        torch.cuda.empty_cache()
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


def set_sampling(mk: MegaDecoder, sample: str | None, batch: int) -> str:
    """The --sample words on every row (seeds 1..B); what the printed line says of them."""
    if not sample:
        return ""
    t, k, p = (sample.split(",") + [None, None])[:3]
    ks = None if k is None else [int(k)] * batch
    ps = None if p is None else [float(p)] * batch
    mk.set_sampling([float(t)] * batch, list(range(1, batch + 1)), ks, ps)
    return f" sampled at {t}" + (f", top-k {k}" if k else "") + (f", top-p {p}" if p else "")


def profile_format(args, name, spec, w, fmt, rows):
    """Times and profiles one weight format of a model over the batches, contexts and variants."""
    for batch in map(int, args.batch.split(",")):
        for ctx in map(int, args.context.split(",")):
            cache = KVCache(spec, batch, ctx + EXTRA_SEQ, torch.bfloat16, "cuda")
            cache.k.normal_()
            cache.v.normal_()
            tok = torch.randint(0, spec.vocab_size, (batch,), device="cuda")
            pos = torch.full((batch,), ctx, device="cuda")
            for var in args.variant or [""]:
                knobs = ",".join(kv for kv in var.split(",") if kv != "launch=plain")
                mk = MegaDecoder(w, cache, tuning=Tuning.parse(knobs))
                mk.kernel.cooperative = "launch=plain" not in var.split(",")
                sample = set_sampling(mk, args.sample, batch)
                ms = time_steps(mk, tok, pos, args.steps)
                mk.enable_profile()
                mk.launch(tok, pos)
                torch.cuda.synchronize()
                s = mk.profile_summary()
                nb = s["blocks"]
                print(f"{name} {fmt} b{batch} ctx{ctx} [{var or 'default'}]{sample} splits={mk.plan.attn.splits} "
                      f"ring={mk.plan.smem.ring_stages}: {ms:.3f} ms/step (median of {args.steps}), "
                      f"profiled span {s['span_us']:.0f} us", flush=True)
                for k, v in s.items():
                    if isinstance(v, dict):
                        print(f"  {k:7s} tasks {v['tasks']:5d}  wait/block {v['wait_us'] / nb:8.1f} us"
                              f"  work/block {v['work_us'] / nb:8.1f} us  path: sight {v.get('sight_us', 0):7.1f}"
                              f" median work {v.get('median_work_us', 0):8.1f} straggle {v.get('straggle_us', 0):7.1f} us")
                print(f"  last to finish a phase [block, times, SM]: {s.get('last_blocks')}")
                if args.raw:
                    os.makedirs(args.raw, exist_ok=True)
                    tag = f"{name}-{fmt}-b{batch}-ctx{ctx}-{var.replace(',', '_').replace('=', '') or 'default'}"
                    np.savez_compressed(os.path.join(args.raw, tag + ".npz"), **mk.profile_raw())
                rows.append(dict(model=name, weights=fmt, batch=batch, context=ctx, variant=var, sample=args.sample, ms=ms,
                                 config=mk.plan.summary(), profile=s))
                del mk
            del cache
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
