"""The verify pass every speculative decoder shares: the last token plus a draft of up to K tokens go through
the target in one forward pass (causal among themselves, each at its own position), and an acceptance rule
turns the target's logits over them into the tokens the pass yields: the accepted draft prefix plus one token
of the target's own. The rule decides what is output (greedy.py: the target's argmax; sampling.py: the
standard speculative-sampling rule; coupled.py: the target's own draws by the in-kernel sampler's keys); a
draft only decides how many tokens one pass yields. K/V rows written
for rejected draft tokens lie past the accepted position, which the next pass overwrites before any query can
read them (positions decide)."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

# (tokens (1, T) long, start position) -> logits (1, T, V): T tokens at positions start .. start + T - 1; or
# (logits, drawn (1, T) long): with the tokens the target itself chose at each row (the megakernel's argmax, or
# its in-kernel draw where the rows sample), which the rules then confirm drafts against
Verify = Callable[[torch.Tensor, int], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
# (context, k) -> up to k draft tokens and the drafter's distributions q (n, V) they were drawn from, or None
# for drafts that are point masses (prompt lookup, a greedy drafter)
Draft = Callable[[Sequence[int], int], tuple[list[int], torch.Tensor | None]]
# (draft, q, target logits (T, V), drawn (T,) or None) -> the tokens the pass yields: an accepted prefix of the
# draft plus one
Accept = Callable[[list[int], torch.Tensor | None, torch.Tensor, torch.Tensor | None], list[int]]


@dataclass
class SpeculativeStats:
    passes: int = 0                 # verify forward passes after the prefill
    drafted: int = 0                # draft tokens sent through them
    accepted: int = 0               # draft tokens the target confirmed
    new_tokens: int = 0             # tokens produced by the passes (accepted + one per pass, before truncation)
    per_pass: list[int] = field(default_factory=list)

    def count(self, drafted: int, yielded: int) -> None:
        """One pass that carried `drafted` draft tokens and yielded `yielded` tokens."""
        self.passes += 1
        self.drafted += drafted
        self.accepted += yielded - 1
        self.new_tokens += yielded
        self.per_pass.append(yielded)

    @property
    def acceptance_length(self) -> float:
        """Tokens per verify pass (1.0 without speculation)."""
        return self.new_tokens / self.passes if self.passes else 0.0

    def summary(self) -> str:
        rate = self.accepted / self.drafted if self.drafted else 0.0
        return (f"speculative: {self.acceptance_length:.2f} tokens per pass over {self.passes} passes, "
                f"{self.accepted}/{self.drafted} draft tokens accepted ({100 * rate:.0f} %)")


def draft_budget(draft_tokens: int, position: int, max_seq: int, left: int) -> int:
    """Draft tokens one pass may carry: none that would run past the cache (the last token sits at `position`)
    or past the tokens still wanted (the pass yields one more than it accepts)."""
    return max(0, min(draft_tokens, max_seq - position - 1, left - 1))


def verify_pass(verify: Verify, draft: Draft, accept: Accept, context: Sequence[int], last: int, position: int,
                k: int, stats: SpeculativeStats) -> list[int]:
    """One pass: the tokens it yields (at least one), counted into `stats`."""
    tokens, q = draft(context, k) if k else ([], None)
    tokens = tokens[:k]
    out = verify(torch.tensor([[last, *tokens]], dtype=torch.long), position)
    logits, drawn = out if isinstance(out, tuple) else (out, None)
    new = accept(tokens, None if q is None else q[:len(tokens)], logits[0], None if drawn is None else drawn[0])
    stats.count(len(tokens), len(new))
    return new


def speculative_decode(verify: Verify, draft: Draft, accept: Accept, context: list[int], first: int,
                       position: int, max_new_tokens: int, max_seq: int, draft_tokens: int,
                       eos: frozenset[int] = frozenset(), stats: SpeculativeStats | None = None) -> Iterator[int]:
    """Yields the tokens after `first` (the prefill's token, already yielded by the caller, not yet in the
    cache; it sits at `position`), up to max_new_tokens - 1 more, stopping after an eos. `context` (prompt and
    tokens so far, `first` included) grows as tokens are yielded. No pass writes at or past max_seq."""
    stats = stats if stats is not None else SpeculativeStats()
    last, left = first, max_new_tokens - 1
    while left > 0 and last not in eos and position < max_seq:
        k = draft_budget(draft_tokens, position, max_seq, left)
        new = verify_pass(verify, draft, accept, context, last, position, k, stats)
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
