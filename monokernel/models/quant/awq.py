"""AWQ GEMM safetensors (AutoAWQ, transformers), 4 bits with zero points, -> int4-gG-zp[-bf16].

Per linear layer (N outputs, K inputs, groups of g along K), packed along N eight to an int32 word in the
order [0, 2, 4, 6, 1, 3, 5, 7]: nibble i (bits 4i) of word j holds column 8j + ORDER[i].
  qweight  int32 (K, N/8)
  qzeros   int32 (K/g, N/8)   the zeros themselves (no offset)
  scales   fp16  (K/g, N)
  W[n, k] = (q[k, n] - zero[k // g, n]) * scales[k // g, n]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import CheckpointError, UnsupportedModelError
from .hf_config import Get, check_group, packed_int4, refuse, scale_suffix
from .tensor import QuantTensor, pack_nibbles

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 (..., M) -> uint8 (..., 8M) in column order."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty((*w.shape, 8), dtype=torch.uint8)
    for i, col in enumerate(ORDER):
        out[..., col] = ((w >> (4 * i)) & 0xF).to(torch.uint8)
    return out.flatten(-2)


@dataclass(frozen=True)
class AwqScheme:
    group: int
    suffixes: tuple[str, ...] = ("qweight", "qzeros", "scales")

    @classmethod
    def from_config(cls, q: dict) -> "AwqScheme":
        bits = q.get("bits", q.get("w_bit", 4))
        if bits != 4:
            raise refuse("bits", bits, "AWQ checkpoints are read at 4 bits")
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise refuse("version", q.get("version"), "only the GEMM packing is read (GEMV, Marlin and ExLlama "
                         "repack it differently)")
        if q.get("zero_point", True) is not True:
            raise refuse("zero_point", q.get("zero_point"), "AWQ GEMM checkpoints carry zero points")
        return cls(group=check_group(q.get("group_size", q.get("q_group_size")), key="group_size"))

    def quantised(self, module: str, has) -> bool:
        return has(f"{module}.qweight")

    def matrix(self, module: str, get: Get) -> QuantTensor:
        qweight, scales, qzeros = packed_int4("AWQ", module, get)
        k, n = qweight.shape[0], qweight.shape[1] * 8
        g = self.group
        if k % g:
            raise UnsupportedModelError(f"AWQ {module}: quantization_config.group_size={g} does not divide K={k}")
        if scales.shape != (k // g, n) or qzeros.shape != (k // g, n // 8):
            raise CheckpointError(f"AWQ {module}: scales {tuple(scales.shape)} and qzeros {tuple(qzeros.shape)} do "
                                  f"not fit qweight {tuple(qweight.shape)} with group_size {g}")
        q, z = unpack_awq(qweight), unpack_awq(qzeros)                    # (K, N), (K/g, N)
        suffix = scale_suffix(scales, module)
        return QuantTensor(f"int4-g{g}-zp{suffix}", pack_nibbles(q.T.contiguous()), scales.T.contiguous(),
                           pack_nibbles(z.T.contiguous()), (n, k))
