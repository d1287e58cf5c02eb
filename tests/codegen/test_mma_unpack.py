"""The tensor-core path's quantised rows (runtime/mma_tiles.py) read and unpacked as the kernel does
(gemv_mma.cuh mma_codes_segment, numerics.cuh i4x8_to_pairs / i8x4_to_pairs), emulated bit for bit in numpy:
each lane's load at its offset, the AND-OR under 128 (bf16) or 1024 (fp16), the paired subtraction, the
pair's K positions and the group scale it is folded with. Every weight of every row comes out exactly as
dequantize() has it, once each, for every segment, warp-step width and group size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from monokernel.models.formats import FORMATS
from monokernel.models.presets import preset
from monokernel.models.quant import dequantize
from monokernel.models.quant.rtn import quantize
from monokernel.runtime.mma_tiles import mma_rows
from monokernel.schedule.plan import plan_for
from monokernel.schedule.tasks import Op

from conftest import TINY_SPECS


def as_float(bits: np.ndarray, dtype: str) -> np.ndarray:
    """16-bit patterns -> float64 values of bf16 / fp16."""
    bits = bits.astype(np.uint32) & 0xFFFF
    if dtype == "bf16":
        return (bits << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    return bits.astype(np.uint16).view(np.float16).astype(np.float64)


def sub_pairs(a: np.ndarray, b: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The two halves of a - b in the 16-bit type; every result here is a small integer, which the test checks
    is exact in that type (so the hardware's rounding cannot change it)."""
    out = []
    for shift in (0, 16):
        v = as_float(a >> shift, dtype) - as_float(b >> shift, dtype)
        assert np.array_equal(v, np.round(v)) and np.abs(v).max() <= 128
        out.append(v)
    return out[0], out[1]


def i4_pairs(w: np.ndarray, dtype: str, zero=8) -> list[tuple[np.ndarray, np.ndarray]]:
    """numerics.cuh i4x8_to_pairs: the zero point (8, or each row's) under the same exponent, i4_zero_pair."""
    magic = 0x43004300 if dtype == "bf16" else 0x64006400
    zpair = (np.asarray(zero, dtype=np.uint32) * 0x00010001) | magic
    return [sub_pairs(((w >> (4 * p)) & 0x000F000F) | magic, np.broadcast_to(zpair, w.shape), dtype) for p in range(4)]


def i8_pairs(w: np.ndarray, dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for h in range(2):
        if dtype == "bf16":
            u = w >> (8 * h)
            out.append(sub_pairs((u & 0x007F007F) | 0x43004300, (u & 0x00800080) | 0x43004300, dtype))
        else:
            u = (w ^ 0x80808080) >> (8 * h)
            out.append(sub_pairs((u & 0x00FF00FF) | 0x64006400, np.full_like(w, 0x64806480), dtype))
    return out


def byte_perm(x: np.ndarray, selector: int) -> np.ndarray:
    """__byte_perm(x, 0, selector) for selectors that pick bytes 0-3 of x (4 = a zero byte)."""
    out = np.zeros_like(x)
    for i in range(4):
        sel = (selector >> (4 * i)) & 7
        byte = (x >> np.uint32(8 * sel)) & np.uint32(0xFF) if sel < 4 else np.zeros_like(x)
        out |= byte << np.uint32(8 * i)
    return out


def e4m3_value(codes: np.ndarray) -> np.ndarray:
    """fp8 e4m3 bytes -> float64 through torch's own float8 type (the value the format defines)."""
    t = torch.from_numpy(codes.astype(np.uint8)).view(torch.float8_e4m3fn)
    return t.double().numpy()


def e4m3_pairs(w: np.ndarray, dtype: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """numerics.cuh e4m3x4_to_pairs: bytes 0 and 2, then 1 and 3, each byte's value (cvt.rn.f16x2.e4m3x2 is exact,
    test_e4m3_conversion_is_exact shows the fp16 -> fp32 -> bf16 step is)."""
    out = []
    for sel in (0x0020, 0x0031):
        two = byte_perm(w, sel)
        out.append((e4m3_value(two & 0xFF), e4m3_value((two >> 8) & 0xFF)))
    return out


def kernel_view(stored: np.ndarray, g, dtype: str, scale_kind: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, stored bytes) -> (rows, K) float64: what the kernel multiplies each input by (times its group's
    scale for grouped formats; the int8 row scale comes in the epilogue and is left out here), and for GGUF Q4_1
    (g.mins) the (rows, K) min that the group-sum mma pairs with each input (None otherwise)."""
    rows, k = stored.shape[0], g.cols
    out = np.full((rows, k), np.nan)
    mins = np.full((rows, k), np.nan) if g.mins else None
    bits, sb, seg0 = g.code_bits, g.sblock, 0
    lb = sb * bits // 32
    pad = 64 if g.scale_swizzle else 16
    # mma_codes_segment's x0 / x1: the swizzle key of each matrix row, in 2-byte elements (8 a 16-byte piece)
    xr = ((np.arange(rows) >> 1) & 3) * 8 if g.scale_swizzle else np.zeros(rows, dtype=np.int64)
    for k0 in range(0, k, g.kseg):
        klen = min(g.kseg, k - k0)
        seg = stored[:, seg0:]
        codes = klen * bits // 8
        scale_bytes = -(-(klen // g.group) * 2 // pad) * pad if g.group else 0
        scales = as_float(seg[:, codes:codes + scale_bytes].copy().view("<u2"), scale_kind) if g.group else None
        zero_bytes = -(-(-(-(klen // g.group) // 2)) // 16) * 16 if g.zero_points else scale_bytes if g.mins else 0
        zbytes = seg[:, codes + scale_bytes:][:, :zero_bytes]
        mtable = as_float(zbytes.copy().view("<u2"), scale_kind) if g.mins else None
        for step in range(klen // sb):
            for c in range(4):
                off = step * sb * bits // 8 + c * lb
                words = seg[:, off:off + lb].copy().view("<u4")            # (rows, lb / 4)
                if g.group:     # by 32-wide windows: word q (int4) or words 2q, 2q + 1 (int8)
                    for q in range(sb // 32):
                        grp = (step * sb + 32 * q) // g.group
                        # the kernel's table index: the step's first group XOR the row's key, plus gi
                        sidx = ((step * sb // g.group) ^ xr) + (grp - step * sb // g.group)
                        if bits == 4:
                            zero = (zbytes[:, grp // 2] >> (4 * (grp % 2))) & 0xF if g.zero_points else \
                                0 if g.mins else 8
                            pairs = i4_pairs(words[:, q], dtype, zero)
                        else:
                            pairs = i8_pairs(words[:, 2 * q], dtype) + i8_pairs(words[:, 2 * q + 1], dtype)
                        for p, (lo, hi) in enumerate(pairs):
                            kk = k0 + step * sb + 32 * q + 8 * c + 2 * p
                            s = np.take_along_axis(scales, sidx[:, None], axis=1)[:, 0]
                            assert np.isnan(out[:, kk:kk + 2]).all()
                            out[:, kk], out[:, kk + 1] = lo * s, hi * s
                            if g.mins:     # the ones-mma sums these inputs into the group's sum, times its min
                                mins[:, kk] = mins[:, kk + 1] = np.take_along_axis(mtable, sidx[:, None], axis=1)[:, 0]
                else:
                    for q in range(words.shape[1]):
                        pairs = e4m3_pairs(words[:, q], dtype) if g.fp8 else i8_pairs(words[:, q], dtype)
                        for h, (lo, hi) in enumerate(pairs):
                            kk = k0 + step * sb + c * sb // 4 + 4 * q + 2 * h
                            assert np.isnan(out[:, kk:kk + 2]).all()
                            out[:, kk], out[:, kk + 1] = lo, hi
        seg0 += codes + scale_bytes + zero_bytes
    assert seg0 == stored.shape[1]
    return out, mins


CASES = [(TINY_SPECS["mistral"], "int4-g32", Op.QKV), (TINY_SPECS["mistral"], "int4-g64", Op.DOWN),
         (TINY_SPECS["qwen2"], "int4-g128-zp", Op.DOWN), (TINY_SPECS["mistral"], "int4-g32-zp-bf16", Op.GATEUP),
         (TINY_SPECS["qwen2"], "int4-g128-bf16", Op.GATEUP), (TINY_SPECS["qwen3"], "int4-g32-bf16", Op.OPROJ),
         (TINY_SPECS["qwen3"], "int8", Op.DOWN), (TINY_SPECS["mistral"], "int8", Op.QKV),
         (TINY_SPECS["qwen2"], "int8", Op.GATEUP), (TINY_SPECS["qwen3"], "fp8", Op.GATEUP),
         (TINY_SPECS["mistral"], "fp8", Op.DOWN),
         # GGUF Q8_0 and Q4_1
         (TINY_SPECS["qwen3"], "int8-g32", Op.DOWN), (TINY_SPECS["mistral"], "int8-g32", Op.QKV),
         (TINY_SPECS["qwen2"], "int8-g32", Op.GATEUP), (TINY_SPECS["mistral"], "int4-g32-min", Op.GATEUP),
         (TINY_SPECS["qwen2"], "int4-g32-min", Op.DOWN), (TINY_SPECS["qwen3"], "int4-g32-min", Op.OPROJ)]


@pytest.mark.parametrize("spec,fmt,op", CASES, ids=[f"{s.name}-{f}-{o.name}" for s, f, o in CASES])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_lanes_unpack_to_dequantize(spec, fmt, op, dtype):
    check_lanes(spec, fmt, op, dtype)


def check_lanes(spec, fmt, op, dtype, mutate=lambda q: q, **knobs):
    knobs = {"mma_kseg_max": 64, **knobs}     # several segments
    g = plan_for(spec, 1, 256, weights=fmt, activations=dtype, gemv_mma=True, **knobs).gemv[op]
    assert g.kseg < g.cols and g.sblock in (32, 64, 128)
    assert g.scale_swizzle == bool(knobs.get("mma_scale_swizzle"))
    w = torch.randn(g.rows, g.cols, generator=torch.Generator().manual_seed(g.cols))
    q = quantize(w, fmt)
    stored = mma_rows(mutate(q), g).numpy()
    kind = "bf16" if q.scales.dtype == torch.bfloat16 else "fp16"
    view, mins = kernel_view(stored, g, dtype, kind)
    assert not np.isnan(view).any()
    if fmt in ("int8", "fp8"):     # the codes themselves; the epilogue multiplies a row's sum by its scale
        np.testing.assert_array_equal(view, q.codes.double().numpy())
        view = view * q.scales.double().numpy().reshape(-1, 1)
    if mins is not None:           # Q4_1: d*q from the codes' mma, m from the group sums' (exact in fp32)
        assert not np.isnan(mins).any()
        view = view + mins
    np.testing.assert_array_equal(view.astype(np.float32), dequantize(q, torch.float32).numpy())


GROUPED = [c for c in CASES if FORMATS[c[1]].group_size]
# K 4096 in segments of 2048 int4 / 1024 int8 codes: tables of 64-128 bytes, every piece of a span holding scales
WIDE = [(TINY_SPECS["qwen2"].with_(intermediate_size=4096), f, Op.DOWN) for f in ("int4-g32-min", "int8-g32",
                                                                                   "int4-g128-zp", "int4-g32")]


@pytest.mark.parametrize("spec,fmt,op,kseg", [(*c, 64) for c in GROUPED] + [(*c, 512) for c in WIDE],
                         ids=[f"{s.name}-{f}-{o.name}-k{k}" for s, f, o, k in
                              [(*c, 64) for c in GROUPED] + [(*c, 512) for c in WIDE]])
def test_swizzled_lanes_unpack_to_dequantize(spec, fmt, op, kseg):
    """mma_scale_swizzle=1: the tables padded to 64 bytes and XOR-swizzled by row, read at the kernel's index
    ((first group of the step) ^ key(row)) + gi, still give dequantize() bit for bit."""
    check_lanes(spec, fmt, op, "bf16", mma_kseg_max=kseg, mma_scale_swizzle=True)


def test_swizzle_read_unswizzled_fails(monkeypatch):
    """Tables stored without the swizzle but read with it (every key 0 at store) miss dequantize(): the swizzled
    read is not a no-op."""
    import monokernel.runtime.mma_tiles as tiles
    monkeypatch.setattr(tiles, "swizzle_key", lambda rows: rows * 0)
    spec, fmt, op = WIDE[0]
    with pytest.raises(AssertionError):
        check_lanes(spec, fmt, op, "bf16", mma_kseg_max=512, mma_scale_swizzle=True)


@pytest.mark.parametrize("fmt", ["int4-g128", "int4-g32-min", "int8-g32"])
def test_swizzle_spreads_scale_banks(fmt):
    """On the 8B preset's slots the 4 rows 2c (and 2c + 1) lanes c read a group's scale from fall in one bank
    unswizzled (rows 128-byte multiples apart) and in 4 banks swizzled, wherever a chunk starts."""
    for swz in (False, True):
        p = plan_for(preset("llama-3.1-8b"), 1, 512, weights=fmt, activations="bf16", mma_scale_swizzle=swz)
        for op in (Op.QKV, Op.DOWN):
            g = p.gemv[op]
            assert g.row_stride % 128 == 64 and g.scale_swizzle == swz
            codes = g.kseg * g.code_bits // 8
            for row0 in (0, 2, 6, 216, 218, 434):
                for step in (0, 1, 7):
                    first = step * g.sblock // g.group
                    for gi in range(g.sblock // g.group):
                        for odd in (0, 1):
                            r = row0 + 2 * np.arange(4) + odd                  # matrix rows of lanes c = 0..3
                            x = ((r >> 1) & 3) * 8 if swz else 0
                            addr = (2 * np.arange(4) + odd) * g.row_stride + codes + 2 * ((first ^ x) + gi)
                            banks = len(set((addr // 4) % 32))
                            assert banks == (4 if swz else 1), (fmt, op, row0, step, gi, odd, banks)


def test_int8_every_code_both_halves():
    """Every int8 code in each byte of a word comes out as itself, bf16 and fp16."""
    codes = np.arange(-128, 128, dtype=np.int8)
    for byte in range(4):
        words = np.zeros((256, 4), dtype=np.int8)
        words[:, byte] = codes
        words[:, (byte + 1) % 4] = codes[::-1]
        w = words.view("<u4")[:, 0]
        for dtype in ("bf16", "fp16"):
            pairs = i8_pairs(w, dtype)
            got = {0: pairs[0][0], 2: pairs[0][1], 1: pairs[1][0], 3: pairs[1][1]}
            assert np.array_equal(got[byte], codes.astype(np.float64))


def test_8b_int4_plan_segments_are_whole():
    """The 8B preset's int4 rows: 4096 codes and their 32 scales a segment, one 16-byte load a lane a step."""
    p = plan_for(preset("llama-3.1-8b"), 1, 512, weights="int4-g128", activations="bf16")
    for op in (Op.QKV, Op.OPROJ, Op.GATEUP, Op.DOWN):
        g = p.gemv[op]
        assert g.sblock == 128 and g.kseg == 4096 and g.seg_bytes == 2048 + 64 and g.row_stride % 128 == 64
    assert p.gemv[Op.DOWN].code_row_bytes == 3 * 2112 + 1024 + 32


def test_e4m3_conversion_is_exact():
    """Every finite e4m3 value passes the kernel's chain unchanged: to fp16 (the hardware pair conversion), to
    fp32, to bf16 (round to nearest, here never rounding) or kept in fp16."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    finite = torch.isfinite(codes.float())
    exact = codes.double()[finite]
    h = codes.to(torch.float16)[finite]
    assert torch.equal(h.double(), exact)
    assert torch.equal(h.float().to(torch.bfloat16).double(), exact)


def mma_slots_k(base: int, half: int) -> np.ndarray:
    """The K position each of the 16 k-slots of an m16n8k16 mma meets in mma_codes_segment's windows: slot s is
    lane c = (s % 8) // 2's input 2 (s // 8) + s % 2 of its vector at K base + 8 c, plus 4 for the second mma."""
    s = np.arange(16)
    return base + 8 * ((s % 8) // 2) + 4 * half + 2 * (s // 8) + s % 2


def grouped_chunk(view: np.ndarray, mins: np.ndarray | None, g, x: np.ndarray, scales: np.ndarray,
                  mtable: np.ndarray | None) -> np.ndarray:
    """One chunk of 8 rows through the loop of mma_codes_segment in matrix form, float64: per window the two code
    mma (A: the inputs at mma_slots_k, B: the unpacked codes there), and for Q4_1 the two mma against ones (the
    group's input sums S, equal in every column), folded a group as d += (u + v) * s + S * m."""
    d = np.zeros((16, 8))
    codes = view / np.repeat(scales, g.group, axis=1)        # exact: view is code times scale
    for grp in range(g.cols // g.group):
        u = np.zeros((16, 8))
        sx = np.zeros((16, 8))
        for base in range(grp * g.group, (grp + 1) * g.group, 32):
            for half in (0, 1):
                k = mma_slots_k(base, half)
                u += x[:, k] @ codes[:, k].T
                sx += x[:, k] @ np.ones((16, 8))
                if mins is not None:      # the lanes pair each input with its group's min (kernel_view)
                    assert (mins[:, k] == mtable[:, grp:grp + 1]).all()
        d += u * scales[:, grp] + (sx * mtable[:, grp] if mtable is not None else 0)
    return d


@pytest.mark.parametrize("fmt", ["int4-g32-min", "int8-g32", "int4-g64"])
def test_group_sums_match_formula(fmt):
    """The group fold and, for GGUF Q4_1, the min term m * S_g (S_g from an mma of the inputs against ones):
    the loop's sums for 16 sequences x 8 rows equal x @ dequantize(q).T, the float formula."""
    spec = TINY_SPECS["qwen2"]
    g = plan_for(spec, 16, 256, weights=fmt, activations="bf16", mma_kseg_max=64, gemv_mma=True).gemv[Op.DOWN]
    gen = torch.Generator().manual_seed(3)
    q = quantize(torch.randn(g.rows, g.cols, generator=gen), fmt)
    view, mins = kernel_view(mma_rows(q, g).numpy(), g, "bf16", "fp16")
    x = torch.randn(16, g.cols, generator=gen).to(torch.bfloat16).double().numpy()
    for r0 in (0, 8, g.rows - 8):
        rows = slice(r0, r0 + 8)
        mtable = q.zeros[rows].double().numpy() if mins is not None else None
        got = grouped_chunk(view[rows], None if mins is None else mins[rows], g, x,
                            q.scales[rows].double().numpy(), mtable)
        np.testing.assert_allclose(got, x @ dequantize(q, torch.float64)[rows].numpy().T, rtol=1e-12, atol=1e-12)


def _codes_by_rows(monkeypatch):
    """int8-g32's codes in the per-row int8 order (each lane a contiguous quarter of the step): an mma then
    mixes two groups"""
    import monokernel.runtime.mma_tiles as tiles
    orig = tiles.lane_order
    monkeypatch.setattr(tiles, "lane_order", lambda v, bits, sb, windows=False: orig(v, bits, sb))


def _mins_first(q):
    """Q4_1's mins stored where its scales go, and the scales after them"""
    import dataclasses
    return dataclasses.replace(q, scales=q.zeros, zeros=q.scales)


def _mins_dropped(q):
    """Q4_1 read as if the min term were not there (the codes offset by 8, as symmetric int4)"""
    import dataclasses
    return dataclasses.replace(q, format=FORMATS["int4-g32"], zeros=None)


@pytest.mark.parametrize("fmt,mutation", [("int8-g32", "codes-by-rows"), ("int4-g32-min", "mins-first"),
                                          ("int4-g32-min", "mins-dropped")])
def test_layout_mutations_fail(fmt, mutation, monkeypatch):
    """Each mutation of the new formats' stored layout makes the lane emulation fail: the test can fail."""
    mutate = {"mins-first": _mins_first, "mins-dropped": _mins_dropped}.get(mutation, lambda q: q)
    if mutation == "codes-by-rows":
        _codes_by_rows(monkeypatch)
    with pytest.raises(AssertionError):
        check_lanes(TINY_SPECS["qwen2"], fmt, Op.DOWN, "bf16", mutate)


def test_min_term_dropped_fails():
    """The group-sum emulation without the min term (no ones-mma) misses the formula."""
    spec = TINY_SPECS["qwen2"]
    g = plan_for(spec, 16, 256, weights="int4-g32-min", activations="bf16", gemv_mma=True).gemv[Op.DOWN]
    q = quantize(torch.randn(g.rows, g.cols, generator=torch.Generator().manual_seed(5)), "int4-g32-min")
    view, mins = kernel_view(mma_rows(q, g).numpy(), g, "bf16", "fp16")
    x = torch.randn(16, g.cols, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16).double().numpy()
    got = grouped_chunk(view[:8], None, g, x, q.scales[:8].double().numpy(), None)
    assert not np.allclose(got, x @ dequantize(q, torch.float64)[:8].numpy().T, rtol=1e-6)


@pytest.fixture(scope="module")
def default_gguf():
    """The bundled model's GGUF tensors and spec, read once (opening the file takes ~7 s on 2 cores)."""
    from monokernel.errors import CheckpointError
    from monokernel.models.gguf_loader import _open, _spec_from_metadata
    from monokernel.models.load import default_model_path
    pytest.importorskip("gguf")
    try:
        path = default_model_path()
    except CheckpointError as e:
        pytest.skip(str(e))
    reader, tensors = _open(path)
    return tensors, _spec_from_metadata(reader, tensors, name=path.stem)


@pytest.mark.parametrize("tensor,op", [("blk.0.ffn_down.weight", Op.DOWN), ("blk.1.attn_output.weight", Op.OPROJ),
                                       ("token_embd.weight", Op.QKV)])
def test_default_gguf_bytes_to_lanes(default_gguf, tensor, op):
    """The bundled model's own GGUF bytes (Q4_1 layers, the Q8_0 embedding as a stand-in Q8_0 matrix): file blocks
    -> QuantTensor -> stored rows -> each lane's registers -> exactly gguf's own dequantiser, bitwise in fp32."""
    import gguf
    from monokernel.models.quant.gguf_packed import from_gguf_blocks
    tensors, spec = default_gguf
    t = tensors[tensor]
    k, rows = (int(d) for d in t.shape)
    raw = np.asarray(t.data).reshape(rows, -1)[:64]          # 64 rows: the layout is per row
    q = from_gguf_blocks(t.tensor_type.name, raw, 64, k)
    fmt = {"Q4_1": "int4-g32-min", "Q8_0": "int8-g32"}[t.tensor_type.name]
    g = plan_for(spec, 1, 256, weights=fmt, activations="bf16").gemv[op]
    g = type(g)(**{**g.__dict__, "rows": 64})
    assert g.cols == k and g.group == 32
    view, mins = kernel_view(mma_rows(q, g).numpy(), g, "bf16", "fp16")
    view = view + (mins if mins is not None else 0)
    expect = gguf.quants.dequantize(raw, t.tensor_type).astype(np.float32)
    np.testing.assert_array_equal(view.astype(np.float32), expect)
