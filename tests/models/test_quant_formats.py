"""Quantised formats: the dequantize() oracle bitwise against each format's published formula, the byte count of
every format against what is stored, round-to-nearest quantisation, and the QuantTensor operations the loaders
and engines use (each must commute with dequantize exactly)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from monokernel.errors import InputError, UnsupportedModelError
from monokernel.models.formats import FORMATS, get_format, quantize_choices, quantize_format
from monokernel.models.presets import preset
from monokernel.models.quant import QuantTensor, dequantize, pack_nibbles, unpack_nibbles
from monokernel.models.quant.gguf_packed import BLOCKS, from_gguf_blocks
from monokernel.models.quant.rtn import quantize
from monokernel.models.quant.tensor import cat_rows, interleave_rows
from monokernel.models.weights import quantize_weights, random_weights
from monokernel.schedule.inputs import KernelInputs

from conftest import TINY_SPECS

QUANTISED = [n for n, f in FORMATS.items() if f.quantised]
# the byte offsets of each GGUF block's fp16 fields: random bytes there could be inf/NaN
_FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}


def _random_blocks(kind: str, rows: int, blocks: int, rng) -> np.ndarray:
    n, size = BLOCKS[kind]
    raw = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    for off in _FP16_FIELDS[kind]:
        raw[..., off:off + 2] = rng.normal(0, 0.05, (rows, blocks)).astype(np.float16).view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, blocks * size)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_gguf_bitwise(kind):
    """GGUF blocks kept packed dequantise bitwise as the gguf package's numpy dequantiser, in fp32 and rounded."""
    rng = np.random.default_rng(list(BLOCKS).index(kind))
    n, _ = BLOCKS[kind]
    rows, k = 7, 3 * n
    raw = _random_blocks(kind, rows, 3, rng)
    expect = gguf_dequantize(raw, getattr(GGMLQuantizationType, kind)).reshape(rows, k)
    qt = from_gguf_blocks(kind, raw, rows, k)
    got = dequantize(qt).numpy()
    assert np.array_equal(got.view(np.uint32), expect.view(np.uint32))
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(dequantize(qt, dtype), torch.from_numpy(expect).to(dtype))
    assert qt.nbytes == qt.format.bytes_for(rows * k, rows)


def test_gguf_bytes():
    """The formats GGUF's Q8_0/Q4_0/Q4_1 map to count exactly the bytes of the GGUF blocks."""
    for kind, name in (("Q8_0", "int8-g32"), ("Q4_0", "int4-g32"), ("Q4_1", "int4-g32-min")):
        n, size = BLOCKS[kind]
        assert FORMATS[name].bytes_for(4096 * 4096, 4096) == 4096 * 4096 // n * size


def test_nibbles():
    v = torch.randint(0, 16, (3, 5, 9), dtype=torch.uint8)
    p = pack_nibbles(v)
    assert p.shape == (3, 5, 5) and torch.equal(unpack_nibbles(p, 9), v)
    assert int(pack_nibbles(torch.tensor([1, 2]))[0]) == 0x21     # element 0 low, element 1 high


@pytest.mark.parametrize("name", QUANTISED)
@pytest.mark.parametrize("shape", [(3, 256, 384), (130, 96)], ids=["stack", "ragged"])
def test_bytes_for_is_what_is_stored(name, shape):
    """bytes_for counts codes, scales and zero points exactly as a QuantTensor stores them (odd row counts,
    a K that a group of 128 does not divide: a shorter last group)."""
    f = FORMATS[name]
    *lead, rows, k = shape
    codes = torch.zeros((*lead, rows, -(-k * f.bits // 8)), dtype=f.torch_dtype)
    scales = torch.ones((*lead, -(-rows // f.block_rows), f.groups(k)), dtype=FORMATS[f.scale_format].torch_dtype)
    zeros = {None: None, "int": torch.zeros((*lead, rows, -(-f.groups(k) // 2)), dtype=torch.uint8),
             "min": torch.zeros_like(scales)}[f.zero]
    qt = QuantTensor(f, codes, scales, zeros, shape)
    assert qt.nbytes == int(np.prod(lead or [1])) * f.bytes_for(rows * k, rows)


def test_int4_formula_hand_built():
    """One row of each int4 kind against the formula written out by hand."""
    q = torch.tensor([[0, 15, 8, 3, 7, 9]], dtype=torch.uint8)
    s = torch.tensor([[0.5]], dtype=torch.float16)       # one (short) group of 32
    sym = QuantTensor(get_format("int4-g32"), pack_nibbles(q), s, None, (1, 6))
    assert dequantize(sym).tolist() == [[-4.0, 3.5, 0.0, -2.5, -0.5, 0.5]]
    z = pack_nibbles(torch.tensor([[2]], dtype=torch.uint8))
    zp = QuantTensor("int4-g32-zp", pack_nibbles(q), s, z, (1, 6))
    assert dequantize(zp).tolist() == [[(c - 2) * 0.5 for c in (0, 15, 8, 3, 7, 9)]]
    mn = QuantTensor("int4-g32-min", pack_nibbles(q), s, torch.tensor([[-1.0]], dtype=torch.float16), (1, 6))
    assert dequantize(mn).tolist() == [[c * 0.5 - 1 for c in (0, 15, 8, 3, 7, 9)]]


def test_fp8_block_formula():
    """fp8-b128: one fp32 scale a 128x128 block, ragged edges included (130 x 200)."""
    gen = torch.Generator().manual_seed(0)
    codes = (torch.randn(130, 200, generator=gen) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(2, 2, generator=gen) + 0.5
    qt = QuantTensor("fp8-b128", codes, s, None, (130, 200))
    expect = codes.float() * s.repeat_interleave(128, 0)[:130].repeat_interleave(128, 1)[:, :200]
    assert torch.equal(dequantize(qt), expect)


@pytest.mark.parametrize("name", ["int8", "int4-g32", "int4-g64", "int4-g128", "int4-g128-bf16", "int4-g32-zp",
                                  "int4-g128-zp", "fp8", "fp8-b128"])
def test_rtn(name):
    """Round-to-nearest: every weight within half a step of its scale (int), or e4m3's relative precision (fp8)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 192, 384, generator=gen) * 0.05
    w[0, 3] = 0.0                                  # a zero row must not divide by zero
    qt = quantize(w, name)
    back = dequantize(qt)
    assert torch.isfinite(back).all() and torch.equal(back[0, 3], torch.zeros(384))
    f = qt.format
    if f.torch_dtype == torch.float8_e4m3fn:
        assert float((back - w).norm() / w.norm()) < 0.04
        return
    g = f.group_size or 384
    step = qt.scales.float().repeat_interleave(g, -1)
    assert bool(((back - w).abs() <= step / 2 + 1e-6 + 1e-3 * step).all())


def test_quantised_twins():
    """A preset's quantised twin drawn layer by layer equals quantising its dense draw (CPU), and keeps the
    embedding and LM head dense."""
    spec = TINY_SPECS["qwen2"]
    dense = random_weights(spec, torch.float32, seed=3)
    for name in ("int8", "int4-g64", "fp8"):
        twin = random_weights(spec, torch.float32, seed=3, weights=name)
        ref = quantize_weights(dense, name)
        for m in ("w_qkv", "w_o", "w_gu", "w_down"):
            a, b = getattr(twin, m), getattr(ref, m)
            assert a.format.name == quantize_format(name).name
            assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)) and torch.equal(a.scales, b.scales)
        assert isinstance(twin.lm_head, torch.Tensor) and torch.equal(twin.embed, dense.embed)
        assert twin.bytes_per_step() == spec.weight_bytes_per_step(name, "fp32", "fp32")


def test_operations_commute_with_dequantize():
    """Row slices, layer index, row permutation, gathers, q/k/v concatenation and gate/up interleaving of packed
    matrices dequantise to the same operation on the dense ones."""
    gen = torch.Generator().manual_seed(2)
    for name in ("int4-g32-zp", "int4-g32-min", "int8", "fp8"):
        if name == "int4-g32-min":
            a = from_gguf_blocks("Q4_1", _random_blocks("Q4_1", 3 * 8, 2, np.random.default_rng(0)), 24, 64)
            stack = QuantTensor(a.format, torch.stack([a.codes] * 2), torch.stack([a.scales] * 2),
                                torch.stack([a.zeros] * 2), (2, 24, 64))
        else:
            stack = quantize(torch.randn(2, 24, 64, generator=gen), name)
        dense = dequantize(stack)
        assert torch.equal(dequantize(stack[1]), dense[1])
        assert torch.equal(dequantize(stack[1, 5:17]), dense[1, 5:17])
        perm = torch.randperm(24, generator=gen)
        assert torch.equal(dequantize(stack[0].permute_rows(perm)), dense[0][perm])
        idx = torch.tensor([[3, 3, 0], [23, 1, 2]])
        assert torch.equal(dequantize(stack[0].take_rows(idx)), dense[0][idx.reshape(-1)])
        assert torch.equal(dequantize(cat_rows([stack[0], stack[1][:8]])), torch.cat([dense[0], dense[1][:8]]))
        mixed = torch.stack([dense[0], dense[1]], dim=1).reshape(48, 64)
        assert torch.equal(dequantize(interleave_rows(stack[0], stack[1])), mixed)


def test_format_errors():
    """Format names: --quantize takes only what round-to-nearest makes; the megakernel refuses every quantised
    format it has no trait for by name and points at the reference engine."""
    assert quantize_format("int4").name == "int4-g128" and quantize_format("INT4-G64").name == "int4-g64"
    assert {"int8", "int4", "int4-g64", "fp8", "int8-g32", "int4-g32-min"} <= set(quantize_choices())
    for bad in ("int4-g32-min-fp32", "int8-g16-fp32", "bf16", "int3"):
        with pytest.raises(InputError, match=f"quantize={bad!r} is not a format round-to-nearest can produce"):
            quantize_format(bad)
    assert FORMATS["int8"].kernel                       # the first format with a kernel trait (templates' gemv)
    KernelInputs(preset("llama-3.2-1b"), 1, 4096, "int8", "bf16")
    for name in (n for n in QUANTISED if not FORMATS[n].kernel):
        with pytest.raises(UnsupportedModelError, match=rf"quantised weights \({name}\) are not in the megakernel "
                                                         r"yet; use engine='reference'"):
            KernelInputs(preset("llama-3.2-1b"), 1, 4096, name, "bf16")
