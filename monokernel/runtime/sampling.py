"""Next-token choice from logits: greedy, or temperature sampling restricted by top-k and top-p."""
from __future__ import annotations

import math

import torch

from ..errors import InputError


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raises InputError naming the argument; called before any work so a bad request fails fast."""
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k={top_k!r} must be a positive integer or None")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise InputError(f"top_p={top_p!r} must be in (0, 1] or None")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) fp32 -> token ids (B,) long. temperature 0 is argmax (top_k/top_p are then moot)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        # keep exactly k per row (by index, so ties at the k-th value cannot let more through)
        idx = scores.topk(top_k, dim=-1).indices
        scores = torch.full_like(scores, float("-inf")).scatter(-1, idx, scores.gather(-1, idx))
    if top_p is not None and top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.empty_like(scores).scatter(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
