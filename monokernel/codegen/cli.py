"""`monokernel compile`: render and compile the megakernel for a model without a GPU, and report the
compiler's resource use (CI checks the presets compile with zero spills)."""
from __future__ import annotations

import argparse
import json

from ..errors import MonokernelError
from ..models.spec import ModelSpec
from ..schedule.config import GpuInfo, KernelConfig
from .compile import compile_kernel
from .render import render_source


def spec_for(model: str | None) -> ModelSpec:
    """The spec alone (no weights): presets, checkpoint directories, GGUF files, or the default model."""
    from ..models.load import load_spec
    return load_spec(model)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="preset:NAME, a checkpoint directory or a .gguf file (default: the bundled model)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-seq", type=int, default=None, help="KV-cache length (default: min(max_position_embeddings, 4096))")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--sm-count", type=int, default=132, help="blocks of the persistent grid (H100 SXM: 132)")
    p.add_argument("--emit-source", action="store_true", help="print the generated CUDA source and exit")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--fail-on-spill", action="store_true", help="exit 1 when the kernel spills registers")


def run(args: argparse.Namespace) -> int:
    spec = spec_for(args.model)
    max_seq = args.max_seq or min(spec.max_position_embeddings, 4096)
    cfg = KernelConfig(spec, args.batch, max_seq, args.dtype, GpuInfo(sm_count=args.sm_count, arch=args.arch))
    source = render_source(cfg)
    if args.emit_source:
        print(source)
        return 0
    k = compile_kernel(source, args.arch, name=f"{spec.name.replace('/', '_')}-b{args.batch}-{args.dtype}")
    report = {"model": spec.name, "batch": args.batch, "arch": args.arch, "registers": k.registers,
              "shared_memory_bytes": cfg.smem_bytes, "spill_bytes": k.spill_bytes, "stack_bytes": k.stack_bytes,
              "ring_stages": cfg.ring_stages, "slot_bytes": cfg.slot_bytes, "kv_splits": cfg.kv_splits,
              "cubin": str(k.path), "cached": k.cached}
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value}")
    if args.fail_on_spill and k.spill_bytes:
        raise MonokernelError(f"the kernel spills {k.spill_bytes} bytes of registers")
    return 0
