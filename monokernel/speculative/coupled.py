"""Speculative sampling by shared randomness, the rule of a request the megakernel samples (SamplingParams.
in_kernel: temperature > 0, top-k and top-p included). The target draws its token at every verified row by the
in-kernel sampler's rule and Gumbel-max keys (seed, position, vocabulary index; monokernel/gumbel.py), in the
kernel itself (or the decoder, for a row the kernel flags); a draft token is accepted while it equals the
target's draw for its position, and the pass yields the target's draws up to and
including the first that differs (the kernel counts them into its acceptance word, as for greedy).

Each yielded token is the one plain decoding with the same seed draws at its position: the row that draws it
sees the same prefix (every draft before it was confirmed) and the same key. So the output does not merely have
the target's distribution, it is the plain in-kernel sampled stream token for token, whatever the drafts; the
drafts decide only how many tokens a launch yields. This is the drafter-invariant speculative decoding of
Daliri, Musco and Suresh (2024). A draft model draws its drafts with the same keys on its own logits (Gumbel
coupling), so where its distribution q is close to the target's p the two draws agree: a draft is accepted with
probability at least (1 - d) / (1 + d), d the total-variation distance between p and q, against the 1 - d of the
standard rule (sampling.py, which needs q and a host draw); prompt lookup's drafts are accepted with probability
p(x), exactly as under the standard rule. On the reference engine sampled requests keep the standard rule."""
from __future__ import annotations

import numpy as np
import torch

from .. import gumbel
from .greedy import greedy_accept


def coupled_accept(draft: list[int], q, logits: torch.Tensor, drawn: torch.Tensor | None) -> list[int]:
    """The accepted draft prefix and the target's own draw after it: `drawn` (T,), the rows' tokens by the
    in-kernel sampler's rule (q and the logits are moot: what decides is the draws)."""
    if drawn is None:
        raise ValueError("coupled_accept needs the target's draws: a Verify that returns (logits, drawn)")
    return greedy_accept(draft, q, logits, drawn)     # the same prefix rule, confirmed against the draws


def draw_rows(logits: torch.Tensor, params, seed: int, position: int) -> torch.Tensor:
    """The in-kernel sampler's tokens for logits (T, V) of rows at positions position .. position + T - 1 under
    `params` (SamplingParams: temperature, top_k, top_p), by its numpy model: what a verify pass that ran
    without the kernel (the reference model) draws. (T,) long."""
    rows = logits.float().cpu().numpy()
    t = rows.shape[0]
    words = gumbel.sampling_words([params.temperature] * t, [seed] * t, t, [params.top_k] * t, [params.top_p] * t)
    return torch.from_numpy(gumbel.sample_tokens(rows, words, np.arange(position, position + t)))
