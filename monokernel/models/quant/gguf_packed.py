"""llama.cpp GGUF blocks -> QuantTensor, losslessly (the tests check dequantize() against gguf.quants.dequantize
bitwise on random blocks). A tensor's raw data is (rows, row bytes), each row a run of blocks along K:

  Q8_0  34 bytes / 32: fp16 d, 32 int8 q                     w = d*q            -> int8-g32 (as stored)
  Q4_0  18 bytes / 32: fp16 d, 16 bytes of nibbles           w = d*(q - 8)      -> int4-g32
  Q4_1  20 bytes / 32: fp16 d, fp16 m, 16 bytes of nibbles   w = d*q + m        -> int4-g32-min
  Q4_K  144 bytes / 256: fp16 d, dmin, 12 bytes of 6-bit sub-block scales sc and mins mn (8 each), 128 bytes of
        nibbles                                              w = (d*sc)*q - dmin*mn -> int4-g32-min-fp32
  Q6_K  210 bytes / 256: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 sub-scales sc, fp16 d
                                                             w = (d*sc)*(q - 32) -> int8-g16-fp32

The nibbles of Q4_0/Q4_1 hold element j (low) and j + 16 (high) of a block; the canonical layout holds
adjacent elements in a byte, so they are reordered (a permutation: lossless). The K-quants' two-level scales
become one fp32 scale (and min) per sub-block: d*sc and dmin*mn are exact in fp32, so the mapping is lossless
but not byte-for-byte: Q4_K streams 6 bits a weight this way instead of 4.5 and Q6_K 10 instead of 6.56
(a packed two-level K-quant format for the kernel is left to issue 18's kernel half).
"""
from __future__ import annotations

import numpy as np
import torch

from .tensor import QuantTensor, pack_nibbles

# type name -> (elements a block, bytes a block)
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q6_K": (256, 210)}
PACKED = tuple(BLOCKS)


def _f16(b: np.ndarray) -> torch.Tensor:
    """Pairs of bytes (..., 2) little-endian -> fp16 (...)."""
    return torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0].copy())


def from_gguf_blocks(kind: str, raw: np.ndarray, rows: int, k: int) -> QuantTensor:
    """`raw`: uint8 (rows, row bytes) of a GGUF tensor of type `kind` with K = k columns."""
    n, size = BLOCKS[kind]
    if k % n or raw.shape != (rows, k // n * size):
        raise ValueError(f"a {kind} tensor of {rows}x{k}: expected {rows}x{k // n * size} bytes, got {raw.shape}")
    b = np.asarray(raw, dtype=np.uint8).reshape(rows, k // n, size)
    if kind == "Q8_0":
        codes = torch.from_numpy(b[..., 2:].copy().view(np.int8)).reshape(rows, k)
        return QuantTensor("int8-g32", codes, _f16(b[..., 0:2]), None, (rows, k))
    if kind in ("Q4_0", "Q4_1"):
        qs = torch.from_numpy(b[..., -16:].copy())
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, k)          # elements j, then j + 16
        if kind == "Q4_0":
            return QuantTensor("int4-g32", pack_nibbles(q), _f16(b[..., 0:2]), None, (rows, k))
        return QuantTensor("int4-g32-min", pack_nibbles(q), _f16(b[..., 0:2]), _f16(b[..., 2:4]), (rows, k))
    if kind == "Q4_K":
        return _q4_k(b, rows, k)
    return _q6_k(b, rows, k)


def _q4_k(b: np.ndarray, rows: int, k: int) -> QuantTensor:
    d, dmin = _f16(b[..., 0:2]).float(), _f16(b[..., 2:4]).float()              # (rows, nb)
    s = torch.from_numpy(b[..., 4:16].astype(np.int32))                          # (rows, nb, 12)
    lo, hi, mix = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    # sub-blocks 0-3 keep 6 bits in bytes 0-3 (scales) and 4-7 (mins); 4-7 take their low 4 bits from bytes
    # 8-11 and their top 2 bits from the spare top bits of bytes 0-3 (scales) and 4-7 (mins)
    sc = torch.cat([lo & 63, (mix & 15) | ((lo >> 6) << 4)], dim=-1).float()    # (rows, nb, 8)
    mn = torch.cat([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], dim=-1).float()
    scale = (d[..., None] * sc).reshape(rows, -1)
    low = -(dmin[..., None] * mn).reshape(rows, -1)
    qs = torch.from_numpy(b[..., 16:].copy()).reshape(rows, -1, 4, 32)          # 4 chunks of 32 bytes a block
    q = torch.stack([qs & 0x0F, qs >> 4], dim=-2).reshape(rows, k)             # a chunk: 32 low, then 32 high
    return QuantTensor("int4-g32-min-fp32", pack_nibbles(q), scale, low, (rows, k))


def _q6_k(b: np.ndarray, rows: int, k: int) -> QuantTensor:
    ql = torch.from_numpy(b[..., 0:128].copy()).reshape(rows, -1, 2, 64).to(torch.int16)
    qh = torch.from_numpy(b[..., 128:192].copy()).reshape(rows, -1, 2, 32).to(torch.int16)
    sc = torch.from_numpy(b[..., 192:208].copy().view(np.int8)).float()          # (rows, nb, 16)
    d = _f16(b[..., 208:210]).float()
    # each half of 128 elements: element r takes the (r // 64)-th nibble of ql byte r % 64 and the
    # (r // 32)-th bit pair of qh byte r % 32
    low = torch.stack([ql & 15, ql >> 4], dim=-2)                                # (rows, nb, 2, 2, 64)
    high = torch.stack([(qh >> sh) & 3 for sh in (0, 2, 4, 6)], dim=-2)          # (rows, nb, 2, 4, 32)
    q = low.reshape(rows, -1, 2, 128) | (high.reshape(rows, -1, 2, 128) << 4)
    codes = (q - 32).to(torch.int8).reshape(rows, k)
    return QuantTensor("int8-g16-fp32", codes, (d[..., None] * sc).reshape(rows, -1), None, (rows, k))
