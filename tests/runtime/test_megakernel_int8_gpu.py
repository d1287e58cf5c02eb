"""int8 weight-only (a scale a row) in the megakernel on the GPU (skipped without CUDA): the kernel reads the
packed codes and scales, and its logits match the reference engine, which dequantises the same codes."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from monokernel.models.quant import QuantTensor
from monokernel.reference.model import ReferenceModel

from conftest import HALF_TOL, TINY_SPECS, prefilled, quantised_weights, rel_norm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _on_gpu(w):
    moved = {f.name: getattr(w, f.name).to("cuda") for f in dataclasses.fields(w)
             if isinstance(getattr(w, f.name), (torch.Tensor, QuantTensor))}
    if w.lm_head is w.embed:
        moved["lm_head"] = moved["embed"]
    return dataclasses.replace(w, **moved)


@pytest.mark.parametrize("name", list(TINY_SPECS))
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_int8_logits_match_reference(name, batch):
    from monokernel.runtime.mega import MegaDecoder
    spec = TINY_SPECS[name]
    w = _on_gpu(quantised_weights(spec, "int8", torch.bfloat16, seed=batch))
    assert isinstance(w.w_qkv, QuantTensor) and w.format.name == "int8"
    ref = ReferenceModel(w)
    gen = torch.Generator().manual_seed(batch)
    lengths = [int(x) for x in torch.randint(1, 300, (batch,), generator=gen)]
    c_ref, c_mk = prefilled(ref, batch, 320, lengths, gen)
    mk = MegaDecoder(w, c_mk, timeout_s=20.0)
    assert mk.plan.gemv[next(iter(mk.plan.gemv))].weight_bytes == 1
    pos = torch.tensor(lengths, device="cuda")
    tok = torch.randint(0, spec.vocab_size, (batch,), generator=gen).cuda()
    for _ in range(4):
        mk.logits.fill_(float("nan"))
        nxt, logits = mk.step(tok, pos)
        expect = ref.forward(tok[:, None], pos, c_ref)[:, 0]
        assert torch.isfinite(logits).all() and rel_norm(logits, expect) < HALF_TOL
        tok, pos = expect.argmax(-1), pos + 1


def test_int8_bitwise_deterministic():
    from monokernel.runtime.mega import MegaDecoder
    spec = TINY_SPECS["llama"]
    w = _on_gpu(quantised_weights(spec, "int8", torch.bfloat16, seed=9))
    outs = []
    for _ in range(2):
        c = prefilled(ReferenceModel(w), 2, 320, [7, 40], torch.Generator().manual_seed(1))[1]
        mk = MegaDecoder(w, c)
        tok, pos = torch.tensor([3, 4], device="cuda"), torch.tensor([7, 40], device="cuda")
        seq = []
        for _ in range(50):
            tok, logits = mk.step(tok, pos)
            seq.append(logits.clone())
            pos = pos + 1
        outs.append(torch.stack(seq))
    assert torch.equal(outs[0], outs[1])
