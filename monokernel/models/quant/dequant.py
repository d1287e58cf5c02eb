"""dequantize(): THE oracle of every quantised format, used by the reference engine and the simulator, and the
definition a kernel's unpacking is tested against. The formula is in models/quant/__init__.py.

Written for the CPU's sake over views of (rows, groups, group) with in-place steps: the reference engine calls
it once a matmul, and temporaries the size of the matrix (repeat_interleave of the scales) cost 3x the time."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .tensor import QuantTensor, RowStack


def _unpack_float(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 nibbles (..., m) -> fp32 (..., 2m): low nibble first; callers cut to n."""
    out = torch.empty((*packed.shape, 2), dtype=torch.float32, device=packed.device)
    out[..., 0] = packed & 0x0F
    out[..., 1] = packed >> 4
    return out.flatten(-2)


def dequantize(qt: QuantTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense matrix (*S, R, K) in `dtype`: computed in fp32 in the formula's order (models/quant/__init__.py),
    then rounded to `dtype`. A RowStack dequantises each part in its own format."""
    if isinstance(qt, RowStack):
        return torch.cat([p.to(dtype) if isinstance(p, torch.Tensor) else dequantize(p, dtype) for p in qt.parts])
    f = qt.format
    *lead, rows, k = qt.shape
    g = f.group_size or k
    groups = f.groups(k)
    c = _unpack_float(qt.codes, k) if f.bits == 4 else qt.codes.float()
    if c.shape[-1] != groups * g:       # a short last group (or an odd K of nibbles): pad to whole groups
        c = F.pad(c[..., :k], (0, groups * g - k))
    c = c.reshape(*lead, rows, groups, g)
    s = qt.scales.float()
    if f.block_rows > 1:                # one scale a block of rows: the scales (small) are expanded, not the codes
        s = s.repeat_interleave(f.block_rows, dim=-2)[..., :rows, :]
    s = s[..., None]
    if f.zero == "int":
        z = _unpack_float(qt.zeros, groups)[..., :groups, None]
        w = c.sub_(z).mul_(s)
    elif f.zero == "min":
        w = c.mul_(s).add_(qt.zeros.float()[..., None])
    elif f.code_offset:
        w = c.sub_(f.code_offset).mul_(s)
    else:
        w = c.mul_(s)
    w = w.reshape(*lead, rows, groups * g)
    if groups * g != k:
        w = w[..., :k]
    return w.to(dtype)
