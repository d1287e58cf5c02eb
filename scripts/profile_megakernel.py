"""Times the megakernel (batch 1, context 512, random bf16 weights) and prints where each block spends
the step, per op, from the kernel's own per-task timestamps. Usage: profile_megakernel.py MODELS OUT.json"""
import sys, torch, json
from monokernel.models.presets import preset
from monokernel.models.weights import random_weights
from monokernel.reference.model import KVCache
from monokernel.runtime.mega import MegaDecoder
out = {}
for name in sys.argv[1].split(","):
    for batch in (1,):
        spec = preset(name)
        w = random_weights(spec, torch.bfloat16, "cuda", seed=0)
        cache = KVCache(spec, batch, 528, torch.bfloat16, "cuda"); cache.k.normal_(); cache.v.normal_()
        mk = MegaDecoder(w, cache)
        tok = torch.randint(0, spec.vocab_size, (batch,), device="cuda"); pos = torch.full((batch,), 512, device="cuda")
        for _ in range(10): mk.launch(tok, pos)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        for _ in range(50): mk.launch(tok, pos)
        ev[1].record(); torch.cuda.synchronize(); mk.check()
        ms = ev[0].elapsed_time(ev[1]) / 50
        mk.enable_profile(); mk.launch(tok, pos); torch.cuda.synchronize()
        s = mk.profile_summary()
        nb = s["blocks"]
        print(f"{name} b{batch}: {ms:.3f} ms/step (mean of 50), profiled span {s['span_us']:.0f} us")
        for k, v in s.items():
            if isinstance(v, dict):
                print(f"  {k:7s} tasks {v['tasks']:5d}  wait/block {v['wait_us']/nb:8.1f} us  work/block {v['work_us']/nb:8.1f} us")
        out[name] = dict(ms=ms, profile=s)
        del mk, w, cache; torch.cuda.empty_cache()
json.dump(out, open(sys.argv[2], "w"), indent=1)
