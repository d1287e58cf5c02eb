"""Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft token x, drawn from the drafter's
distribution q, is accepted with probability min(1, p(x) / q(x)), p being the distribution the target would
sample from (runtime/sampling.probabilities: temperature, top-k, top-p); at the first rejection the token is
drawn from normalize(max(0, p - q)) and the pass ends; when every draft token is accepted one more is drawn
from p. Each token then follows p exactly, so the output has the target's distribution whatever the drafts.
Prompt lookup's drafts are point masses (q(x) = 1): x is accepted with probability p(x), and a rejection draws
from p without x. One torch.Generator draws everything in a fixed order: a seed reproduces the tokens."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ..runtime.sampling import SamplingParams, probabilities
from .verify import Accept, Draft, SpeculativeStats, Verify, speculative_decode


def sampled_accept(params: SamplingParams, generator: torch.Generator | None) -> Accept:
    """The acceptance rule for `params` (temperature > 0), drawing from `generator`."""
    def accept(draft: list[int], q: torch.Tensor | None, logits: torch.Tensor, drawn=None) -> list[int]:
        p = probabilities(logits.float().cpu(), params.temperature, params.top_k, params.top_p)    # (T, V)
        for i, x in enumerate(draft):
            qx = 1.0 if q is None else float(q[i, x])
            u = float(torch.rand((), generator=generator))
            if u * qx < float(p[i, x]):      # u < p(x) / q(x), without dividing by a q(x) of 0
                continue
            if q is None:
                residual = p[i].clone()
                residual[x] = 0
            else:
                residual = (p[i] - q[i].float()).clamp_min(0)
            if not float(residual.sum()) > 0:   # p <= q everywhere only where p == q: rounding, draw from p
                residual = p[i]
            return draft[:i] + [int(torch.multinomial(residual, 1, generator=generator))]
        return draft + [int(torch.multinomial(p[len(draft)], 1, generator=generator))]
    return accept


def speculative_sampling(verify: Verify, draft: Draft, params: SamplingParams, generator: torch.Generator | None,
                         context: list[int], first: int, position: int, max_new_tokens: int, max_seq: int,
                         draft_tokens: int, eos: frozenset[int] = frozenset(),
                         stats: SpeculativeStats | None = None) -> Iterator[int]:
    """Yields sampled tokens after `first` (see verify.speculative_decode); `draft` returns the drafter's q
    with its tokens (None: point masses)."""
    return speculative_decode(verify, draft, sampled_accept(params, generator), context, first, position,
                              max_new_tokens, max_seq, draft_tokens, eos, stats)
