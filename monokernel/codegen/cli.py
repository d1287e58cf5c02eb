"""`monokernel compile`: render and compile the megakernel for a model without a GPU, and report the
compiler's resource use (CI checks the presets compile with zero spills)."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError
from ..models.spec import ModelSpec
from ..schedule.inputs import GpuInfo, KernelInputs
from ..schedule.plan import make_plan
from ..schedule.tuning import Tuning
from ..models.formats import FORMATS
from .compile import KERNEL_ARCH, check_arch

KERNEL_QUANT_FORMATS = [n for n, f in FORMATS.items() if f.quantised and f.kernel]
from .fit import fit_kernel
from .render import render_source


def spec_for(model: str | None) -> ModelSpec:
    """The spec alone (no weights): presets, checkpoint directories, GGUF files, or the default model."""
    from ..models.load import load_spec
    return load_spec(model)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="preset:NAME, a checkpoint directory or a .gguf file (default: the bundled model)")
    p.add_argument("--batch", type=int, default=1, help="rows of the batch")
    p.add_argument("--tokens-per-seq", type=int, default=1,
                   help="rows per sequence: 1 for a decode step, T > 1 for a verify step of T positions (speculative)")
    p.add_argument("--max-seq", type=int, default=None, help="KV-cache length (default: min(max_position_embeddings, 4096))")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="activations and KV cache")
    p.add_argument("--weights", choices=["dense", *KERNEL_QUANT_FORMATS], default="dense",
                   help="the layers' matrices: dense (in --dtype), int8 codes with a scale a row, or symmetric int4 "
                        "with a scale a group")
    p.add_argument("--arch", default=KERNEL_ARCH, help=f"the kernel is written for {KERNEL_ARCH} (Hopper) only")
    p.add_argument("--sm-count", type=int, default=132, help="blocks of the persistent grid (H100 SXM: 132)")
    p.add_argument("--tuning", default="", help="knobs written k=v,k=v (schedule/tuning.py), e.g. gemv_mma=1,kv_splits=4")
    p.add_argument("--emit-source", action="store_true", help="print the generated CUDA source and exit")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--fail-on-spill", action="store_true",
                   help="exit 1 when the kernel spills registers (the engine refuses such a kernel)")


def run(args: argparse.Namespace) -> int:
    check_arch(args.arch)        # before the model is read or anything is written to the cache
    if args.batch < 1 or (args.max_seq is not None and args.max_seq < 1) or args.sm_count < 1:
        raise InputError("--batch, --max-seq and --sm-count must be positive integers")
    spec = spec_for(args.model)
    max_seq = args.max_seq or min(spec.max_position_embeddings, 4096)
    inputs = KernelInputs(spec, args.batch, max_seq, args.dtype if args.weights == "dense" else args.weights, args.dtype,
                          GpuInfo(sm_count=args.sm_count, arch=args.arch), args.tokens_per_seq)
    tuning = Tuning.parse(args.tuning)
    if args.emit_source:
        print(render_source(make_plan(inputs, tuning)))
        return 0
    fitted = fit_kernel(inputs, tuning, allow_spills=True)
    k = fitted.compiled
    report = {**fitted.report(), "plan": fitted.plan.summary()}
    if args.json:
        print(json.dumps(report))
    else:
        _print_tree(report)
    if args.fail_on_spill and k.spill_bytes:
        # exit 1, not the usage-error 2: the command worked and the kernel failed the check
        print(f"monokernel: error: the kernel spills {k.spill_bytes} bytes of registers "
              f"({k.registers} used of {fitted.register_cap})", file=sys.stderr)
        return 1
    return 0


def _print_tree(d: dict, indent: int = 0) -> None:
    for key, value in d.items():
        if isinstance(value, dict):
            print(" " * indent + f"{key}:")
            _print_tree(value, indent + 2)
        else:
            print(" " * indent + f"{key}: {value}")
