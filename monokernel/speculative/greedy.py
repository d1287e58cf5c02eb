"""Greedy speculative decoding of one sequence: the target's argmax at each verified position confirms the
longest draft prefix, and its argmax after that prefix is the next token. The output is the target's own
greedy continuation, whatever the drafts (verify.py runs the passes)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .verify import SpeculativeStats, Verify, speculative_decode

Drafter = Callable[[Sequence[int], int], list[int]]


def accepted_prefix(draft: Sequence[int], target: Sequence[int]) -> int:
    """How many leading draft tokens equal the target's greedy tokens at the same positions."""
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return n


def greedy_accept(draft: list[int], q, logits: torch.Tensor, drawn: torch.Tensor | None = None) -> list[int]:
    """The accepted draft prefix and the target's argmax after it (q, the drafter's distributions, is moot);
    `drawn`: the argmax the kernel itself took at each row, where it did (what its plain steps output)."""
    target = (logits.argmax(dim=-1) if drawn is None else drawn).tolist()
    n = accepted_prefix(draft, target)
    return draft[:n] + [target[n]]


def speculative_greedy(verify: Verify, drafter: Drafter, context: list[int], first: int, position: int,
                       max_new_tokens: int, max_seq: int, draft_tokens: int, eos: frozenset[int] = frozenset(),
                       stats: SpeculativeStats | None = None) -> Iterator[int]:
    """Yields greedy tokens after `first` (see verify.speculative_decode) with drafts from `drafter`."""
    return speculative_decode(verify, lambda ctx, k: (drafter(ctx, k), None), greedy_accept, context, first,
                              position, max_new_tokens, max_seq, draft_tokens, eos, stats)
