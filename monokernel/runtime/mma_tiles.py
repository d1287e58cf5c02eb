"""The stored rows of a quantised matrix as the tensor-core path reads them (templates/kernel/gemv_mma.cuh
mma_codes_segment), built once when a MegaDecoder is made.

A row is cut into the plan's K segments (GemvPlan.kseg); each segment is its codes in lane order, then (grouped
formats) its groups' scales, padded to 16 bytes, then (integer-zero int4) its groups' zero points two a byte or
(GGUF Q4_1) its groups' float mins, padded to 16, so one bulk copy a row and segment brings all of them. Within
a segment, a warp step covers `sblock` of K and each of the 4 lanes c of a weight row loads one contiguous piece
of it:
- int4: word q of lane c holds the 8 codes at K 32 q + 8 c + e (e = 0..7) of the step, code e at bit
  4 (e // 2) + 16 (e % 2), so that one AND-OR with 0x000F000F << 4p yields the pair (2p, 2p + 1);
- int8 with a scale a row: word j of lane c holds the 4 codes at K c sblock / 4 + 4 j + e, code e in byte
  (0, 2, 1, 3)[e], so that bytes 0 and 2, then 1 and 3, are the pairs (0, 1) and (2, 3);
- int8 with a scale a group (GGUF Q8_0): as int4, by 32-wide windows, so that each mma sums one group's
  products: words 2 q and 2 q + 1 of lane c hold the 8 codes at K 32 q + 8 c + e, code e in word 2 q + e // 4,
  byte (0, 2, 1, 3)[e % 4].
The pairs (0, 1), (2, 3) of 8 consecutive K meet the inputs' 16-byte vector in that order.
With `scale_swizzle` (tuning mma_scale_swizzle) the scale and min tables are padded to 64 bytes and each row's
16-byte pieces XOR-permuted by `swizzle_key(row)`: lane c reads rows 2c and 2c + 1, which sit 128-byte
multiples apart in a slot (a 4-way bank conflict unswizzled).
"""
from __future__ import annotations

import torch

from ..models.quant import QuantTensor
from ..models.quant.tensor import pack_nibbles, unpack_nibbles
from ..schedule.layout import SWIZZLE_SPAN, GemvPlan

INT4_BIT = [4 * (e // 2) + 16 * (e % 2) for e in range(8)]     # where code e of a word sits
INT8_BYTE = [0, 2, 1, 3]                                       # which byte holds code e of a word


def lane_order(values: torch.Tensor, bits: int, sblock: int, windows: bool = False) -> torch.Tensor:
    """(..., klen) integer codes (uint8: 0..15 for int4, the int8 bytes) -> (..., klen * bits / 8) uint8.
    `windows`: int8 codes by 32-wide windows (a scale a group), as int4's always are."""
    *lead, klen = values.shape
    v = values.to(torch.int32)
    if bits == 4:
        # (steps, window q, lane c, code e) -> (steps, lane c, window q, code e)
        v = v.reshape(*lead, klen // sblock, sblock // 32, 4, 8).transpose(-3, -2)
        word = torch.zeros(v.shape[:-1], dtype=torch.int64, device=v.device)
        for e, bit in enumerate(INT4_BIT):
            word |= v[..., e].to(torch.int64) << bit
    elif windows:
        # (steps, window q, lane c, word h, code e) -> (steps, lane c, window q, word h, code e)
        v = v.reshape(*lead, klen // sblock, sblock // 32, 4, 2, 4).transpose(-4, -3)
        word = torch.zeros(v.shape[:-1], dtype=torch.int64, device=v.device)
        for e, byte in enumerate(INT8_BYTE):
            word |= (v[..., e].to(torch.int64) & 0xFF) << (8 * byte)
    else:
        # (steps, lane c, word j, code e): already in lane order; the bytes of each word permuted
        v = v.reshape(*lead, klen // sblock, 4, sblock // 16, 4)
        word = torch.zeros(v.shape[:-1], dtype=torch.int64, device=v.device)
        for e, byte in enumerate(INT8_BYTE):
            word |= (v[..., e].to(torch.int64) & 0xFF) << (8 * byte)
    shifts = torch.arange(0, 32, 8, device=v.device)
    return ((word[..., None] >> shifts) & 0xFF).to(torch.uint8).reshape(*lead, klen * bits // 8)


def swizzle_key(rows: torch.Tensor) -> torch.Tensor:
    """The XOR key of each matrix row's scale pieces: rows 2c (and 2c + 1) of any 8-row chunk, which lane c reads
    together, get 4 different keys wherever the chunk starts."""
    return (rows >> 1) & 3


def swizzle_pieces(table: torch.Tensor) -> torch.Tensor:
    """(rows, bytes: a multiple of 64) -> the same bytes with 16-byte piece j of each 64 stored at j ^ key(row)."""
    rows, n = table.shape
    key = swizzle_key(torch.arange(rows, device=table.device))[:, None]
    src = torch.arange(4, device=table.device)[None, :] ^ key                   # stored piece j holds piece j ^ key
    t = table.reshape(rows, n // SWIZZLE_SPAN, 4, 16)
    return torch.take_along_dim(t, src[:, None, :, None].expand_as(t), dim=2).reshape(rows, n)


def mma_rows(q: QuantTensor, g: GemvPlan) -> torch.Tensor:
    """The stored rows (..., rows, g.code_row_bytes) uint8 of `q` for an op planned as `g`, layer by layer
    (the unpacked codes of one layer at a time)."""
    *lead, rows, k = q.shape
    if k != g.cols:
        raise ValueError(f"a matrix of K={k} for an op of K={g.cols}")
    if lead:
        return torch.stack([mma_rows(q[i], g) for i in range(lead[0])])
    bits, group = q.format.bits, q.format.group_size
    codes = unpack_nibbles(q.codes, k) if bits == 4 else q.codes.view(torch.uint8)
    scales = q.scales.contiguous().view(torch.uint8) if group else None      # (rows, groups * bytes)
    sb = scales.shape[-1] // (k // group) if group else 0
    if group and k % group:
        raise ValueError(f"{q.format.name}: K={k} is not whole groups of {group}")
    zeros = unpack_nibbles(q.zeros, k // group) if q.format.zero == "int" else None   # (rows, groups)
    mins = q.zeros.contiguous().view(torch.uint8) if q.format.zero == "min" else None  # (rows, groups * bytes)
    parts = []
    pad = SWIZZLE_SPAN if g.scale_swizzle else 16
    for k0 in range(0, k, g.kseg):
        klen = min(g.kseg, k - k0)
        parts.append(lane_order(codes[:, k0:k0 + klen], bits, g.sblock, windows=bool(group)))
        for table in (scales, mins) if group else ():
            if table is not None:
                s = table[:, k0 // group * sb:(k0 + klen) // group * sb]
                s = torch.nn.functional.pad(s, (0, -s.shape[-1] % pad))
                parts.append(swizzle_pieces(s) if g.scale_swizzle else s)
        if zeros is not None:
            z = pack_nibbles(zeros[:, k0 // group:(k0 + klen) // group])
            parts.append(torch.nn.functional.pad(z, (0, -z.shape[-1] % 16)))
    out = torch.cat(parts, dim=-1).contiguous()
    assert out.shape[-1] == g.code_row_bytes, (out.shape, g.code_row_bytes)
    return out
