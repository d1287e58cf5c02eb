"""gpt-fast's quantised torch.compile baselines on the GPU (skipped without CUDA): compiled int8 and tinygemm
int4 over the same quantised values as the reference engine's packed weights."""
from __future__ import annotations

import pytest
import torch

from monokernel.baselines.torch_compile import TorchCompileDecoder
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.decoders import ReferenceDecoder
from monokernel.runtime.kv_cache import KVCache

from conftest import HALF_TOL, TINY_SPECS, rel_norm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("fmt", ["int8", "int4-g128", "int4-g64-zp"])
@pytest.mark.parametrize("batch", [1, 8])
def test_compiled_quantised_baseline(fmt, batch):
    spec = TINY_SPECS["qwen2"]
    w = random_weights(spec, torch.bfloat16, "cuda", 0, fmt)
    tc = TorchCompileDecoder(w, batch, 64, compile=True)
    ref = ReferenceDecoder(ReferenceModel(w), KVCache(spec, batch, 64, torch.bfloat16, "cuda"))
    tok = torch.randint(0, spec.vocab_size, (batch,), device="cuda")
    pos = torch.arange(batch, device="cuda")
    for _ in range(4):
        (_, l1), (g2, l2) = tc.step(tok, pos), ref.step(tok, pos)
        assert rel_norm(l1, l2) < HALF_TOL, (fmt, batch)
        tok, pos = g2, pos + 1
