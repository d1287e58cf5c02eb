"""Next-token choice: the per-request SamplingParams, and greedy or temperature sampling restricted by
top-k and top-p.

Where the megakernel runs, every sampled request (temperature > 0, with or without top-k and top-p) is drawn
inside the kernel by the Gumbel-max trick over the kept tokens (monokernel/gumbel.py, `in_kernel` below): no
logits travel to the host but for the rows the kernel flags (a top_k above gumbel.TOP_CANDIDATES, or a top-p
nucleus longer than that), which the decoder draws from the logits by the same rule. Every request on the
reference engine is sampled here on the host with torch.multinomial, as before. The two rules draw from the
same distribution (`probabilities`) but not the same tokens for one seed."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops; checked at construction (InputError naming the
    field), so a bad request fails before any work. `stop` takes a string or strings and keeps a tuple."""

    temperature: float = 0.0            # 0 = greedy (top_k and top_p are then moot)
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None             # seeds the sampler when temperature > 0; None = unseeded
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()          # stop strings: the text ends before the first one found

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature={t!r} must be a finite number >= 0 (0 = greedy)")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise InputError(f"top_k={k!r} must be a positive integer or None")
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise InputError(f"top_p={p!r} must be in (0, 1] or None")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed={self.seed!r} must be an integer or None")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"max_new_tokens={n!r} must be an integer >= 1")
        stop = self.stop
        stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
            raise InputError(f"stop={self.stop!r}: stop strings must be non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))   # frozen: the normalised form replaces the argument

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def in_kernel(self) -> bool:
        """Whether a decoder that samples in the kernel draws this request there: any temperature > 0, top-k
        and top-p included (the kernel draws by gumbel.py's rule, the decoder where the kernel flags a row)."""
        return self.temperature > 0


def probabilities(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> the distribution (B, V) fp32 that sample() draws from at temperature > 0: softmax of
    logits / temperature over the top-k tokens and the smallest top-p head of them."""
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
    return scores.softmax(dim=-1)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) fp32 -> token ids (B,) long. temperature 0 is argmax (top_k/top_p are then moot)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
