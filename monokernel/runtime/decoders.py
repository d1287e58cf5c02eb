"""Decode-step back ends, as the engine drives them.

The engine prefills through ReferenceModel and then runs one decoder step per token, so a decoder only has
to agree with ReferenceModel on one token per sequence at its own position. Two ways to call one:
  step(tokens (B,), positions (B,)) -> (greedy (B,), logits (B, V))   checked, the results ready to read
  enqueue(tokens, positions)       -> the same tensors, possibly still being computed on the device;
                                      `status` (device int tensor, nonzero = a step failed, or None) is read
                                      back with the tokens, and check() raises the decoder's error.
The engine uses enqueue to keep the GPU a few steps ahead of the host (see Engine._run).
"""
from __future__ import annotations

import torch

from ..reference.model import ReferenceModel
from .kv_cache import KVCache


class ReferenceDecoder:
    """Plain PyTorch: the fallback engine and the oracle."""

    status = None

    def __init__(self, model: ReferenceModel, cache: KVCache):
        self.model, self.cache = model, cache

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.forward(tokens[:, None], positions, self.cache)[:, 0]  # (B, V) fp32
        return logits.argmax(dim=-1), logits

    enqueue = step   # the reference forward reads positions on the host, so it cannot run ahead anyway

    def check(self) -> None:
        pass


class MegaStepper:
    """MegaDecoder (runtime/mega.py) without a host sync per step: MegaDecoder.step checks positions on the
    host and reads the error flag, each a sync that drains the launch queue. Here the engine has checked the
    positions when it accepted the request, and the error flag travels back with each step's tokens."""

    def __init__(self, mega):
        self.mega, self.cache = mega, mega.cache

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mega.step(tokens, positions)

    def enqueue(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.mega.launch(tokens, positions)
        # .long() snapshots the tokens before the next launch overwrites the buffer; the logits buffer must
        # be consumed (sampled) before the next enqueue, which stream order guarantees for device-side sampling
        return self.mega.out_tokens.long(), self.mega.logits

    @property
    def status(self) -> torch.Tensor:
        return self.mega.error

    def check(self) -> None:
        self.mega.check()
