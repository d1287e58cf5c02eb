"""The static KV cache the engine prefills and every decoder over it reads and extends."""
from __future__ import annotations

import torch

from ..errors import InputError
from ..models.spec import ModelSpec


class KVCache:
    """k, v of shape (L, B, KVH, S, D) in the model dtype: the layout ReferenceModel.forward writes and the
    megakernel reads, so a prefill through PyTorch and the kernel's decode steps share one cache."""

    def __init__(self, spec: ModelSpec, batch: int, max_seq: int, dtype: torch.dtype, device):
        shape = (spec.num_layers, batch, spec.num_kv_heads, max_seq, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_seq(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def slot(self, s: int) -> "KVCache":
        """Slot s as a cache of batch 1 over the same storage: what a forward pass writes through it lands in
        the slot."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, s:s + 1], self.v[:, s:s + 1]
        return view

    @torch.no_grad()
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V (B, KVH, T, D) of one layer into positions 0..T-1 (a benchmark's context without a prefill)."""
        T = k.shape[2]
        if T > self.max_seq:
            raise InputError(f"{T} cached positions do not fit max_seq={self.max_seq}")
        self.k[layer, :, :, :T].copy_(k)
        self.v[layer, :, :, :T].copy_(v)
