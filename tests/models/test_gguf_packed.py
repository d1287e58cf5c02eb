"""GGUF files kept packed: a tiny model written with Q8_0/Q4_0/Q4_1 (quantised by the gguf package) and
Q4_K/Q6_K (random blocks) matrices loads with them packed, and its logits equal the dequantised load's bitwise;
a type without a packed format (Q5_K) is dequantised at load with a notice."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from monokernel.models.gguf_loader import load_gguf_checkpoint
from monokernel.models.quant import QuantTensor
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.kv_cache import KVCache

from hf_tiny import tiny_hf_model
from test_loaders import VOCAB, _write_gguf, tiny_tokenizer  # noqa: F401 (tiny_tokenizer: a fixture)

_FP16_FIELDS = {Q.Q4_K: (0, 2), Q.Q6_K: (208,), Q.Q5_K: (0, 2)}


def _model(hidden: int, inter: int) -> transformers.PreTrainedModel:
    return tiny_hf_model(VOCAB, hidden, inter)


def _quantising_writer(monkeypatch, kind_of):
    """GGUFWriter.add_tensor storing the matrices `kind_of(name)` names in that type: the gguf package's
    quantiser where it has one, else random blocks with small finite fp16 scales (K-quants)."""
    add = gguf.GGUFWriter.add_tensor
    rng = np.random.default_rng(0)

    def add_tensor(self, name, tensor, *args, **kwargs):
        kind = kind_of(name) if tensor.ndim == 2 else None
        if kind is None:
            return add(self, name, tensor, *args, **kwargs)
        if kind in _FP16_FIELDS:
            n, size = gguf.GGML_QUANT_SIZES[kind]
            rows, blocks = tensor.shape[0], tensor.shape[1] // n
            raw = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
            for off in _FP16_FIELDS[kind]:
                raw[..., off:off + 2] = (rng.normal(0, 2e-4, (rows, blocks)).astype(np.float16)
                                         .view(np.uint8).reshape(rows, blocks, 2))
            data = raw.reshape(rows, -1)
        else:
            data = gguf.quants.quantize(tensor.astype(np.float32), kind)
        return add(self, name, data, raw_dtype=kind)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", add_tensor)


def _logits(weights):
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    cache = KVCache(weights.spec, 2, 16, weights.dtype, "cpu")
    return ReferenceModel(weights).forward(tokens, torch.zeros(2, dtype=torch.long), cache)


@pytest.mark.parametrize("mix", ["q4_0-q4_1-q8_0", "q4_k-q6_k"])
def test_packed_equals_dequantised(tmp_path, monkeypatch, tiny_tokenizer, mix):
    """Packed GGUF matrices (rotary rows un-permuted as packed rows) give the dequantised load's logits bitwise,
    in fp32 and in bf16; per-layer format mixes (Q4_K_M style) are kept per layer."""
    if mix == "q4_k-q6_k":
        model = _model(256, 512)
        # Q4_K_M style: most matrices Q4_K, v and down of layer 0 Q6_K
        kinds = lambda name: (Q.Q6_K if name in ("blk.0.attn_v.weight", "blk.0.ffn_down.weight") else Q.Q4_K) \
            if name.startswith("blk.") or name == "output.weight" else None
        expect = {"w_qkv": ["int4-g32-min-fp32+int4-g32-min-fp32+int8-g16-fp32", "int4-g32-min-fp32"], "w_down": ["int8-g16-fp32", "int4-g32-min-fp32"]}
    else:
        model = _model(64, 96)
        kinds = lambda name: {"attn_q": Q.Q4_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_0}.get(name.split(".")[-2], Q.Q4_1) \
            if name.startswith("blk.") else Q.Q8_0
        expect = {"w_qkv": ["int4-g32"], "w_down": ["int4-g32-min"], "embed": ["int8-g32"], "lm_head": ["int8-g32"]}
    _quantising_writer(monkeypatch, kinds)
    path = _write_gguf(tmp_path / "m.gguf", model, tiny_tokenizer)
    monkeypatch.undo()
    for dtype in (torch.float32, torch.bfloat16):
        _, packed, _ = load_gguf_checkpoint(path, dtype, "cpu")
        _, dense, _ = load_gguf_checkpoint(path, dtype, "cpu", packed=False)
        assert packed.quantised and not dense.quantised
        formats = packed.formats()
        assert {k: formats[k] for k in expect} == expect
        assert packed.nbytes < dense.nbytes / (2.5 if dtype == torch.float32 else 1.4)
        assert torch.equal(_logits(packed), _logits(dense))
        # the rotary un-permutation acts on packed rows: q's rows dequantise to the dense q rows
        assert torch.equal(packed.matrix("w_qkv", 1), dense.w_qkv[1])


def test_unpacked_type_notice(tmp_path, monkeypatch, tiny_tokenizer, capsys):
    """A type with no packed format (Q5_K) is dequantised at load, with one notice naming it."""
    model = _model(256, 512)
    _quantising_writer(monkeypatch, lambda name: Q.Q5_K if name.endswith("ffn_up.weight") else
                       Q.Q4_K if name.startswith("blk.") else None)
    path = _write_gguf(tmp_path / "m.gguf", model, tiny_tokenizer)
    monkeypatch.undo()
    _, w, _ = load_gguf_checkpoint(path, torch.float32, "cpu")
    err = capsys.readouterr().err
    assert err.count("Q5_K tensors are dequantised to float32 at load") == 1
    # gate (Q4_K) and up (Q5_K, dense) cannot share one packed w_gu: the layer's w_gu is dense
    assert isinstance(w.w_qkv, QuantTensor) and w.formats()["w_gu"] == ["fp32"]


def test_simulator_on_mixed_formats(tmp_path, monkeypatch, tiny_tokenizer):
    """The simulated schedule on a Q4_K_M-style GGUF (a w_qkv whose v rows are Q6_K, layers whose ffn_down formats
    differ) matches the reference engine: row tiles crossing the q/k/v boundary take each part's rows."""
    import random

    from monokernel.schedule.build import build_schedule
    from monokernel.schedule.inputs import GpuInfo
    from monokernel.schedule.plan import plan_for
    from monokernel.schedule.simulate import Simulator

    model = _model(256, 512)
    _quantising_writer(monkeypatch, lambda name: (Q.Q6_K if name in ("blk.0.attn_v.weight", "blk.1.ffn_down.weight")
                                                  else Q.Q4_K) if name.startswith("blk.") else None)
    path = _write_gguf(tmp_path / "m.gguf", model, tiny_tokenizer)
    monkeypatch.undo()
    spec, w, _ = load_gguf_checkpoint(path, torch.float32, "cpu")
    ref = ReferenceModel(w)
    sim = Simulator(build_schedule(plan_for(spec, 3, 32, gpu=GpuInfo(sm_count=7), min_kv_chunk=4)), w)
    tok, pos = torch.tensor([5, 77, 300]), torch.tensor([0, 0, 0])
    caches = [KVCache(spec, 3, 32, torch.float32, "cpu") for _ in range(2)]
    for _ in range(2):
        out, logits = sim.step(tok, pos, caches[0], random.Random(0))
        expect = ref.forward(tok[:, None], pos, caches[1])[:, 0]
        torch.testing.assert_close(logits, expect, rtol=1e-4, atol=1e-4)
        tok, pos = out, pos + 1
