"""Round-to-nearest quantisation of dense weights (`--quantize`), gpt-fast style: no calibration data, one pass.

  int8        per output row, symmetric: s = absmax/127 (fp32), c = round(w/s) in -127..127
  int4-gG     per group of G along K, symmetric: s = absmax/7 rounded to the scale type first, c = round(w/s) + 8
              clamped to 0..15 (the same codes and unpacking as GPTQ/compressed-tensors symmetric checkpoints).
              Symmetric by default: no zero points to stream, one fewer operation a weight in the kernel;
              `-zp` formats are the asymmetric variant (s = (max-min)/15, z = round(-min/s)).
  fp8         per output row: s = absmax/448 (fp32), c = e4m3(w/s) (round to nearest even)
  fp8-b128    one scale per 128x128 block, as DeepSeek-V3 / Qwen3 FP8 checkpoints
  int8-g32    GGUF Q8_0: s = absmax/127 a group of 32 (fp16), as llama.cpp quantises it
  int4-g32-min  GGUF Q4_1: s = (max-min)/15 and m = min a group of 32 (fp16), c = round((w-m)/s), as llama.cpp

Scales are rounded to their storage type before the codes are computed, so the codes are the nearest ones for
the scale the kernel will read. The LM head and the embedding stay dense (see quantize_weights).
"""
from __future__ import annotations

import torch

from ..formats import FORMATS, QUANTIZE_ALIASES, Format, get_format
from .tensor import QuantTensor, pack_nibbles

FP8_MAX = 448.0


def _scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales in their storage type, rounded up (a scale rounded down would leave the group's extreme one code
    short of its range), and at least the type's smallest normal: a zero group then quantises to zero codes
    instead of dividing by zero (a scale that underflowed to 0 in fp16)."""
    s = x.clamp(min=torch.finfo(dtype).tiny).to(dtype)
    low = s.float() < x
    return torch.where(low, torch.nextafter(s, torch.full_like(s, float("inf"))), s)   # on the weights' device


def quantize(w: torch.Tensor, fmt: str | Format) -> QuantTensor:
    """Dense (*S, R, K) -> QuantTensor in `fmt`, computed in fp32. Any quantised format is accepted (the tests
    make GGUF-shaped ones this way: `min` formats as Q4_1 does, s = (max-min)/15, m = min); --quantize offers
    the ones of formats.quantize_choices()."""
    f = get_format(QUANTIZE_ALIASES.get(fmt, fmt) if isinstance(fmt, str) else fmt)
    if not f.quantised:
        raise ValueError(f"{f.name} is not a quantised format")
    x = w.float()
    *lead, rows, k = x.shape
    scale_dtype = FORMATS[f.scale_format].torch_dtype
    if f.block_rows > 1:
        return _fp8_blocks(x, f)
    g = f.group_size or k
    # a group size that does not divide K leaves a shorter last group (the formula reads scale k // g either
    # way); its padding is zeros, which change neither an absmax nor a min/max that includes 0
    padded = torch.nn.functional.pad(x, (0, -k % g))
    xg = padded.reshape(*lead, rows, -1, g)
    if f.zero == "min":
        lo, hi = xg.amin(-1), xg.amax(-1)
        s = _scale((hi - lo) / 15, scale_dtype)
        m = lo.to(scale_dtype)
        c = torch.round((xg - m.float()[..., None]) / s.float()[..., None]).clamp(0, 15)
        return QuantTensor(f, pack_nibbles(c.flatten(-2)[..., :k]), s, m, (*lead, rows, k))
    if f.zero == "int":
        lo, hi = xg.amin(-1).clamp(max=0), xg.amax(-1).clamp(min=0)
        s = _scale((hi - lo) / 15, scale_dtype)
        sf = s.float()
        z = torch.round(-lo / sf).clamp(0, 15)
        c = torch.round(xg / sf[..., None] + z[..., None]).clamp(0, 15)
        return QuantTensor(f, pack_nibbles(c.flatten(-2)[..., :k]), s, pack_nibbles(z), (*lead, rows, k))
    amax = xg.abs().amax(-1)
    limit = {4: 7.0, 8: 127.0}.get(f.bits) if f.torch_dtype != torch.float8_e4m3fn else FP8_MAX
    s = _scale(amax / limit, scale_dtype)
    q = xg / s.float()[..., None]
    q = q.flatten(-2)[..., :k]
    if f.torch_dtype == torch.float8_e4m3fn:
        codes = q.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    elif f.bits == 8:
        codes = torch.round(q).clamp(-127, 127).to(torch.int8)
    else:
        codes = pack_nibbles(torch.round(q).clamp(-8, 7) + 8)
    return QuantTensor(f, codes, s, None, (*lead, rows, k))


def _fp8_blocks(x: torch.Tensor, f: Format) -> QuantTensor:
    *lead, rows, k = x.shape
    b = f.block_rows
    pr, pk = -(-rows // b) * b, -(-k // b) * b
    padded = torch.nn.functional.pad(x, (0, pk - k, 0, pr - rows))
    blocks = padded.reshape(*lead, pr // b, b, pk // b, b)
    s = _scale(blocks.abs().amax(dim=(-3, -1)) / FP8_MAX, torch.float32)     # (*S, R/b, K/b)
    scaled = blocks / s[..., :, None, :, None]
    codes = scaled.clamp(-FP8_MAX, FP8_MAX).reshape(*lead, pr, pk)[..., :rows, :k].to(torch.float8_e4m3fn)
    return QuantTensor(f, codes.contiguous(), s, None, (*lead, rows, k))
