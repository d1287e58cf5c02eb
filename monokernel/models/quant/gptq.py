"""GPTQ safetensors (AutoGPTQ / GPTQModel / transformers+optimum), 4 bits, -> int4-gG[-zp][-bf16].

Per linear layer (N outputs, K inputs, groups of g along K):
  qweight  int32 (K/8, N)    q[k, n] in bits 4*(k % 8) of qweight[k // 8, n]
  qzeros   int32 (K/g, N/8)  zero[j, n] in bits 4*(n % 8) of qzeros[j, n // 8]; checkpoint_format "gptq" (v1)
                             stores zero - 1, "gptq_v2" the zero itself
  scales   fp16  (K/g, N)
  g_idx    int32 (K,)        the group of each input column: k // g, else act-order (refused)
  W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]),  g = g_idx[k]
Symmetric checkpoints (every zero 8) become the symmetric format: no zero points to stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import CheckpointError, UnsupportedModelError
from .hf_config import Get, check_group, packed_int4, refuse, scale_suffix, trivial_g_idx
from .tensor import QuantTensor, pack_nibbles


def unpack_int32(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their 8 nibbles, nibble i (bits 4i) of word j becoming element 8j + i along `dim`."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nib = torch.stack([(w >> (4 * i)) & 0xF for i in range(8)], dim=dim + 1 if dim >= 0 else dim)
    return nib.flatten(dim, dim + 1 if dim >= 0 else dim).to(torch.uint8)


@dataclass(frozen=True)
class GptqScheme:
    group: int
    v1: bool
    suffixes: tuple[str, ...] = ("qweight", "qzeros", "scales", "g_idx")

    @classmethod
    def from_config(cls, q: dict) -> "GptqScheme":
        bits = q.get("bits", 4)
        if bits != 4:
            raise refuse("bits", bits, "GPTQ checkpoints are read at 4 bits")
        fmt = q.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise refuse("checkpoint_format", fmt, "supported: gptq (v1) and gptq_v2")
        return cls(group=check_group(q.get("group_size")), v1=fmt == "gptq")

    def quantised(self, module: str, has) -> bool:
        return has(f"{module}.qweight")

    def matrix(self, module: str, get: Get) -> QuantTensor:
        qweight, scales, qzeros = packed_int4("GPTQ", module, get)
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
            raise CheckpointError(f"GPTQ {module}: qweight and qzeros must be int32, not {qweight.dtype}/{qzeros.dtype}")
        k, n = qweight.shape[0] * 8, qweight.shape[1]
        g = self.group
        if k % g:
            raise UnsupportedModelError(f"GPTQ {module}: quantization_config.group_size={g} does not divide "
                                        f"K={k}; such checkpoints are not supported")
        if scales.shape != (k // g, n) or qzeros.shape != (k // g, -(-n // 8)):
            raise CheckpointError(f"GPTQ {module}: scales {tuple(scales.shape)} and qzeros {tuple(qzeros.shape)} do "
                                  f"not fit qweight {tuple(qweight.shape)} with group_size {g}")
        try:
            trivial_g_idx(get(f"{module}.g_idx"), k, g, module, "desc_act=True")
        except CheckpointError:
            pass    # no g_idx: groups are k // g
        q = unpack_int32(qweight, 0)                                   # (K, N)
        z = unpack_int32(qzeros, 1)[:, :n].to(torch.int16)             # (K/g, N)
        if self.v1:
            if bool((z == 15).any()):
                raise UnsupportedModelError(f"GPTQ {module}: a v1 zero point stored as 15 reads as 16, which 4 bits "
                                            "cannot hold (the v1 format's zero-0 overflow); use a gptq_v2 checkpoint")
            z = z + 1
        suffix = scale_suffix(scales, module)
        codes = pack_nibbles(q.T.contiguous())
        s = scales.T.contiguous()
        if bool((z == 8).all()):
            return QuantTensor(f"int4-g{g}{suffix}", codes, s, None, (n, k))
        return QuantTensor(f"int4-g{g}-zp{suffix}", codes, s, pack_nibbles(z.T.contiguous()), (n, k))
