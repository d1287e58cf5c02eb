"""The reference engine on quantised tiny models of every architecture: computing from packed weights (one
dequantize() a matmul) gives exactly the logits of the same weights dequantised at load, prefill and decode."""
from __future__ import annotations

import pytest
import torch

from monokernel.reference.model import ReferenceModel
from monokernel.runtime.kv_cache import KVCache

from conftest import QUANT_CASES, TINY_SPECS, quantised_weights


@pytest.mark.parametrize("fmt", list(QUANT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_equals_dequantised(fmt, dtype):
    spec = TINY_SPECS[QUANT_CASES[fmt]]
    packed = quantised_weights(spec, fmt, dtype, head=fmt == "int8-g32")
    dense = packed.dequantized()
    assert packed.quantised and not dense.quantised and packed.nbytes < dense.nbytes
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (3, 6), generator=gen)
    logits = []
    for w in (packed, dense):
        model, cache = ReferenceModel(w), KVCache(spec, 3, 16, dtype, "cpu")
        prefill = model.forward(tokens, torch.zeros(3, dtype=torch.long), cache)
        step = model.forward(prefill[:, -1].argmax(-1)[:, None], torch.full((3,), 6), cache)
        logits.append((prefill, step))
    assert torch.isfinite(logits[0][1]).all()
    assert torch.equal(logits[0][0], logits[1][0]) and torch.equal(logits[0][1], logits[1][1])
