"""Greedy speculative decoding of one sequence: the last token plus a draft of up to K tokens go through
the target in one forward pass (causal among themselves, each at its own position); the target's argmax at
each position confirms the longest draft prefix, and its argmax after that prefix is the next token. The
output is the target's own greedy continuation: a draft only decides how many of its tokens one pass
yields. K/V rows written for rejected draft tokens lie past the accepted position, which the next pass
overwrites before any query can read them (positions decide)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

# (tokens (1, T) long, start position) -> logits (1, T, V): T tokens at positions start .. start + T - 1
Verify = Callable[[torch.Tensor, int], torch.Tensor]
Drafter = Callable[[Sequence[int], int], list[int]]


@dataclass
class SpeculativeStats:
    passes: int = 0                 # verify forward passes after the prefill
    drafted: int = 0                # draft tokens sent through them
    accepted: int = 0               # draft tokens the target confirmed
    new_tokens: int = 0             # tokens produced by the passes (accepted + one per pass, before truncation)
    per_pass: list[int] = field(default_factory=list)

    @property
    def acceptance_length(self) -> float:
        """Tokens per verify pass (1.0 without speculation)."""
        return self.new_tokens / self.passes if self.passes else 0.0

    def summary(self) -> str:
        rate = self.accepted / self.drafted if self.drafted else 0.0
        return (f"speculative: {self.acceptance_length:.2f} tokens per pass over {self.passes} passes, "
                f"{self.accepted}/{self.drafted} draft tokens accepted ({100 * rate:.0f} %)")


def accepted_prefix(draft: Sequence[int], target: Sequence[int]) -> int:
    """How many leading draft tokens equal the target's greedy tokens at the same positions."""
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return n


def speculative_greedy(verify: Verify, drafter: Drafter, context: list[int], first: int, position: int,
                       max_new_tokens: int, max_seq: int, draft_tokens: int, eos: frozenset[int] = frozenset(),
                       stats: SpeculativeStats | None = None) -> Iterator[int]:
    """Yields greedy tokens after `first` (the prefill's token, already yielded by the caller, not yet in the
    cache; it sits at `position`), up to max_new_tokens - 1 more, stopping after an eos. `context` (prompt and
    tokens so far, `first` included) grows as tokens are accepted. No pass writes at or past max_seq."""
    stats = stats if stats is not None else SpeculativeStats()
    last, left = first, max_new_tokens - 1
    while left > 0 and last not in eos and position < max_seq:
        # the draft may not run past the cache or past the tokens still wanted (the pass yields one more)
        k = max(0, min(draft_tokens, max_seq - position - 1, left - 1))
        draft = drafter(context, k)[:k] if k else []
        tokens = torch.tensor([[last, *draft]], dtype=torch.long)
        logits = verify(tokens, position)[0]                   # (T, V)
        target = logits.argmax(dim=-1).tolist()
        n = accepted_prefix(draft, target)
        new = draft[:n] + [target[n]]
        stats.passes += 1
        stats.drafted += len(draft)
        stats.accepted += n
        stats.new_tokens += len(new)
        stats.per_pass.append(len(new))
        for tok in new:
            if left == 0:
                return
            context.append(tok)
            left -= 1
            yield tok
            if tok in eos:
                return
        position += len(new)
        last = new[-1]
