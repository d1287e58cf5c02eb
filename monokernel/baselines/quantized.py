"""gpt-fast's weight-only quantised linears inside the torch.compile baseline, over the very quantised values the
reference engine (and later the megakernel) reads, so a quantised bench row compares like with like:

  int8 (per channel)       gpt-fast's WeightOnlyInt8Linear: F.linear(x, codes.to(x.dtype)) * scales, which
                           inductor fuses into one int8-reading matmul
  int4-gG, int4-gG-zp      torchao / gpt-fast's tinygemm: torch._weight_int4pack_mm(x, packed, G, scales_and_zeros)
                           (CUDA; _for_cpu on the CPU), w = (q - 8) * scale + zero: our symmetric codes are the
                           same values with zero = 0; integer zero points z become zero = scale * (8 - z)

The LM head and the embedding are dense, as in our quantised twins. Other formats (fp8, GGUF's) have no gpt-fast
path: building the baseline for them raises NoQuantisedPath, which the bench records as the row's reason.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MonokernelError
from ..models.quant import QuantTensor
from ..models.quant.tensor import unpack_nibbles
from ..models.weights import PackedWeights
from .torch_compile import DecodeModel

# tinygemm packs K in tiles of 16 * inner_k_tiles: 8 (K % 128) where it divides, else 4 or 2 (K % 32)
INNER_K_TILES = (8, 4, 2)


class NoQuantisedPath(MonokernelError):
    """The weight format has no gpt-fast-style quantised path."""


def _kind(qt) -> str:
    if not isinstance(qt, QuantTensor):
        raise NoQuantisedPath(f"{type(qt).__name__} matrices (per-layer or per-part formats) have no gpt-fast path")
    f = qt.format
    if f.name == "int8":
        return "int8"
    if f.bits == 4 and f.zero in (None, "int") and f.group_size in (32, 64, 128):
        return "int4"
    raise NoQuantisedPath(f"{f.name} weights have no gpt-fast-style path (it has int8 per channel and int4 groups)")


class QuantDecodeModel(DecodeModel):
    def _matrices(self, weights: PackedWeights, param) -> None:
        kinds = {n: _kind(getattr(weights, n)) for n in ("w_qkv", "w_o", "w_gu", "w_down")}
        if len(set(kinds.values())) != 1:
            raise NoQuantisedPath(f"matrices of mixed kinds {kinds} have no one gpt-fast path")
        self.quant_kind = kinds["w_qkv"]
        dt, dev = weights.dtype, weights.device
        self.groups = {}
        for name in kinds:
            qt: QuantTensor = getattr(weights, name)
            if self.quant_kind == "int8":
                self.register_buffer(f"{name}_codes", qt.codes, persistent=False)
                self.register_buffer(f"{name}_scales", qt.scales[..., 0].to(dt), persistent=False)
                continue
            packed, sz = zip(*(_tinygemm(qt[i], dt, dev) for i in range(qt.shape[0])))
            self.register_buffer(f"{name}_packed", torch.stack(packed), persistent=False)
            self.register_buffer(f"{name}_sz", torch.stack(sz), persistent=False)
            self.groups[name] = qt.format.group_size
        fmt = weights.w_qkv.format.name
        self.quant_variant = (f"{fmt} weight-only (gpt-fast int8)" if self.quant_kind == "int8" else
                              f"{fmt} weight-only (tinygemm int4pack)")

    def _linear(self, name: str, i: int, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.quant_kind == "int8":
            y = F.linear(x, getattr(self, f"{name}_codes")[i].to(x.dtype)) * getattr(self, f"{name}_scales")[i]
        else:
            mm = torch._weight_int4pack_mm if x.is_cuda else torch._weight_int4pack_mm_for_cpu
            flat = x.reshape(-1, x.shape[-1])
            y = mm(flat, getattr(self, f"{name}_packed")[i], self.groups[name], getattr(self, f"{name}_sz")[i])
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if bias is None else y + bias


def _tinygemm(qt: QuantTensor, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One (N, K) int4 matrix -> tinygemm's packed codes and scales_and_zeros (K/G, N, 2) in `dtype`."""
    n, k = qt.shape
    g = qt.format.group_size
    cuda = torch.device(device).type == "cuda"
    tiles = next((t for t in (INNER_K_TILES if cuda else (2,)) if k % (16 * t) == 0), None)
    if k % g or tiles is None:
        raise NoQuantisedPath(f"K={k} is not a multiple of the group {g} and of 32 (tinygemm's int4 packing)")
    q = unpack_nibbles(qt.codes, k)                                          # (N, K) 0..15
    s = qt.scales.float()                                                    # (N, G)
    zero = torch.zeros_like(s) if qt.format.zero is None else \
        s * (8 - unpack_nibbles(qt.zeros, s.shape[-1]).float())
    sz = torch.stack([s.T, zero.T], dim=-1).to(dtype).contiguous()           # (G, N, 2)
    if cuda:
        # tinygemm takes element 2j in the high nibble, 2j + 1 in the low one (the canonical layout's swap)
        swapped = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(swapped.to(device), tiles)
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    return packed, sz.to(device)
