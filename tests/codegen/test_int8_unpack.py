"""The kernel's int8 unpacking (numerics.cuh i8x4_to_f), emulated bit for bit in numpy: XOR 0x80 a byte,
the byte permute that puts it under the exponent of 2^23, the subtraction of 2^23 + 128. Every code of every
byte lane comes out exactly as its integer, so the kernel's dot products see the codes dequantize() scales."""
from __future__ import annotations

import numpy as np
import torch

from monokernel.models.quant import dequantize
from monokernel.models.quant.rtn import quantize


def byte_perm(x: np.ndarray, y: int, selector: int) -> np.ndarray:
    """CUDA's __byte_perm for selectors 0..7 a nibble: byte i of the result is byte (selector >> 4i) & 7 of
    (y << 32 | x)."""
    both = (np.uint64(y) << np.uint64(32)) | x.astype(np.uint64)
    out = np.zeros_like(x, dtype=np.uint32)
    for i in range(4):
        sel = (selector >> (4 * i)) & 7
        byte = ((both >> np.uint64(8 * sel)) & np.uint64(0xFF)).astype(np.uint32)
        out |= byte << np.uint32(8 * i)
    return out


def codes_as_floats(words: np.ndarray) -> np.ndarray:
    """(n,) uint32 words of 4 int8 codes -> (n, 4) float32, as i8x4_to_f computes them."""
    u = words ^ np.uint32(0x80808080)
    lanes = [byte_perm(u, 0x4B000000, 0x7440 + i).view(np.float32) - np.float32(8388736.0) for i in range(4)]
    return np.stack(lanes, axis=1)


def test_every_code_in_every_lane():
    codes = np.arange(-128, 128, dtype=np.int8)
    for lane in range(4):
        words = np.zeros((256, 4), dtype=np.int8)
        words[:, lane] = codes
        words[:, (lane + 1) % 4] = codes[::-1]          # a neighbour that must not leak in
        got = codes_as_floats(words.view(np.uint32)[:, 0])
        assert np.array_equal(got, words.astype(np.float32))


def test_unpacked_rows_scale_to_dequantize():
    """A quantised row read as the kernel reads it (16-byte loads of 16 codes, little-endian words), times the
    row's scale, is dequantize() of it: the kernel's int8 operands are the oracle's weights."""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    q = quantize(w, "int8")
    words = q.codes.contiguous().numpy().view(np.uint32)          # (24, 16): 4 codes a word
    floats = codes_as_floats(words.reshape(-1)).reshape(24, 64)
    scaled = torch.from_numpy(floats) * q.scales.float().reshape(24, 1)
    assert torch.equal(scaled, dequantize(q, torch.float32))
