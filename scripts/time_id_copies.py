"""What converting the token and position tensors costs a step: the megakernel timed with the caller's int64
tensors first copied into the decoder's int32 buffers (two copy kernels a step, what launch() did before it read
the ids in place) and with them read in place. Random bf16 weights, batch 1, median of 200 steps, three rounds.

  python scripts/time_id_copies.py llama-3.2-1b 512 [k=v,... KernelConfig overrides]
"""
import sys

import torch

from monokernel.bench.timing import time_steps
from monokernel.models.presets import preset
from monokernel.models.weights import random_weights
from monokernel.runtime.kv_cache import KVCache
from monokernel.runtime.mega import MegaDecoder
from monokernel.schedule.config import parse_overrides


def main():
    name, ctx = sys.argv[1], int(sys.argv[2])
    overrides = parse_overrides(sys.argv[3] if len(sys.argv) > 3 else "")
    spec = preset(name)
    w = random_weights(spec, torch.bfloat16, "cuda", seed=0)
    cache = KVCache(spec, 1, ctx + 64, torch.bfloat16, "cuda")
    cache.k.normal_()
    cache.v.normal_()
    tok = torch.randint(0, spec.vocab_size, (1,), device="cuda")
    pos = torch.full((1,), ctx, device="cuda")
    mk = MegaDecoder(w, cache, **overrides)

    def copies():
        mk.tokens.copy_(tok, non_blocking=True)
        mk.positions.copy_(pos, non_blocking=True)
        mk.launch(mk.tokens, mk.positions)

    median_ms = lambda step: time_steps(lambda i: step(), steps=200, warmup=20, device="cuda").median_ms
    for r in range(3):
        c, d = median_ms(copies), median_ms(lambda: mk.launch(tok, pos))
        print(f"{name} b1 ctx {ctx} round {r}: with copies {c:.4f} ms, ids in place {d:.4f} ms", flush=True)
    mk.check()


if __name__ == "__main__":
    main()
