"""The decode-step interface every back end implements: the reference, the megakernel and the baselines.

The engine prefills through ReferenceModel and then runs one decoder step per token, and the bench times
the same steps, so a decoder only has to agree with ReferenceModel on one token per sequence at its own
position. The engine uses `enqueue` to keep the GPU a few steps ahead of the host (see Engine._run).
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..errors import InputError
from ..reference.model import ReferenceModel
from .kv_cache import KVCache


@runtime_checkable
class Decoder(Protocol):
    """One decode step of a fixed batch of B sequences.

    step(tokens (B,), positions (B,)) -> (greedy (B,) int, logits (B, V) fp32)
        checked: bad positions and failed steps raise here, the results are ready to read.
    enqueue(tokens, positions) -> the same tensors, possibly still being computed on the device and possibly
        the decoder's own buffers, rewritten by its next step (copy what must outlive it); `positions` go
        unchecked and no host synchronisation happens where the back end allows it, so errors surface later:
    status: a device int tensor, nonzero once an enqueued step failed (read back with the tokens), or None
        when every failure raises at the call;
    check(): raises the error of a failed step (a synchronisation).
    write_kv(layer, k, v): K/V (B, KVH, T, D) of one layer into cache positions 0..T-1, for a context
        without a prefill (the bench's seeded random K/V).
    """

    @property
    def status(self) -> torch.Tensor | None: ...

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def enqueue(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def check(self) -> None: ...

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None: ...


def check_positions(positions: torch.Tensor, max_seq: int) -> None:
    """Raises InputError unless every position lies in the cache; reads them on the host (a synchronisation)."""
    pos = positions.cpu()
    if int(pos.min()) < 0 or int(pos.max()) >= max_seq:
        raise InputError(f"positions {pos.tolist()} outside the KV cache (0..{max_seq - 1})")


class ReferenceDecoder:
    """Plain PyTorch: the fallback engine and the oracle."""

    status = None

    def __init__(self, model: ReferenceModel, cache: KVCache):
        self.model, self.cache = model, cache

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_positions(positions, self.cache.max_seq)   # a negative one would index from the end
        return self.enqueue(tokens, positions)

    @torch.no_grad()
    def enqueue(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the forward reads the positions on the host, so this cannot run ahead of it anyway
        logits = self.model.forward(tokens[:, None], positions, self.cache)[:, 0]  # (B, V) fp32
        return logits.argmax(dim=-1), logits

    def check(self) -> None:
        pass

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.write(layer, k, v)
