"""dequantize(): THE oracle of every quantised format, used by the reference engine and the simulator, and the
definition a kernel's unpacking is tested against. The formula is in models/quant/__init__.py."""
from __future__ import annotations

import torch

from .tensor import QuantTensor, unpack_nibbles


def codes_of(qt: QuantTensor) -> torch.Tensor:
    """The codes as fp32 (*S, R, K), offset removed (symmetric int4: c - 8)."""
    f, k = qt.format, qt.shape[-1]
    c = unpack_nibbles(qt.codes, k) if f.bits == 4 else qt.codes
    c = c.float()
    return c - f.code_offset if f.code_offset else c


def _per_group(t: torch.Tensor, qt: QuantTensor, rows_too: bool) -> torch.Tensor:
    """(*S, R', G) -> (*S, R, K): each scale (zero) over its group of columns (and block of rows)."""
    f, (rows, k) = qt.format, qt.shape[-2:]
    g = f.group_size or k
    t = t.repeat_interleave(g, dim=-1)[..., :k]
    if rows_too and f.block_rows > 1:
        t = t.repeat_interleave(f.block_rows, dim=-2)[..., :rows, :]
    return t


def dequantize(qt: QuantTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense matrix (*S, R, K) in `dtype`: computed in fp32, rounded once."""
    f = qt.format
    c = codes_of(qt)
    s = _per_group(qt.scales.float(), qt, rows_too=True)
    if f.zero == "int":
        z = unpack_nibbles(qt.zeros, f.groups(qt.shape[-1])).float()
        w = (c - _per_group(z, qt, rows_too=False)) * s
    elif f.zero == "min":
        w = c * s + _per_group(qt.zeros.float(), qt, rows_too=False)
    else:
        w = c * s
    return w.to(dtype)
