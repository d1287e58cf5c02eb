"""Builds, into the kernel cache, the kernels a profile_megakernel.py run will ask for, on many cores at
once, so that a run on a lent GPU spends its time running rather than compiling. The GPU is described,
not queried (H100 SXM by default): an entry is reused only if the source rendered there is identical.

  MONOKERNEL_CACHE_DIR=.carry/mkc python scripts/precompile_kernels.py --models llama-3.1-8b \
      --batch 1,8 --context 512,8192 --variant "" --variant attn_key_batch=1   (Tuning knobs, schedule/tuning.py)
"""
import argparse
from concurrent.futures import ProcessPoolExecutor

from monokernel.codegen.fit import fit_kernel
from monokernel.schedule.inputs import GpuInfo, KernelInputs
from monokernel.schedule.tuning import Tuning
from profile_megakernel import EXTRA_SEQ, model_spec   # the same cache length and models as the profile run


def build(job):
    name, fmt, batch, max_seq, var, gpu, t = job
    knobs = ",".join(kv for kv in var.split(",") if kv != "launch=plain")   # profile_megakernel's launch variant
    k = fit_kernel(KernelInputs(model_spec(name), batch * t, max_seq, fmt, "bf16", gpu, t), Tuning.parse(knobs),
                   allow_spills=True)
    return (f"{name} {fmt} b{batch} t{t} max_seq {max_seq} [{var}]: {k.compiled.registers} of {k.register_cap} registers, "
            f"{k.compiled.spill_bytes} B spilled")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--weights", default="bf16", help="formats of the layers' matrices, as profile_megakernel.py")
    ap.add_argument("--context", default="512")
    ap.add_argument("--tokens-per-seq", default="1", help="verify steps: rows a sequence (batch x T rows), as "
                    "`monokernel bench --verify-tokens`")
    ap.add_argument("--variant", action="append", default=None)
    ap.add_argument("--gpu-name", default="NVIDIA H100 80GB HBM3")
    ap.add_argument("--jobs", type=int, default=8)
    args = ap.parse_args()
    gpu = GpuInfo(name=args.gpu_name)
    jobs = [(m, f, b, c + EXTRA_SEQ, v, gpu, t) for m in args.models.split(",") for f in args.weights.split(",")
            for b in map(int, args.batch.split(",")) for t in map(int, args.tokens_per_seq.split(","))
            for c in map(int, args.context.split(",")) for v in (args.variant or [""])]
    with ProcessPoolExecutor(args.jobs) as ex:
        for line in ex.map(build, jobs):
            print(line, flush=True)


if __name__ == "__main__":
    main()
