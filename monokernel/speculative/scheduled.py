"""Speculation inside the request-level Scheduler (monokernel chat and serve, reference engine): the decode
step runs, for each decoding request, one verify pass of the reference model over its own slot of the batch
cache (KVCache.slot), with a draft from prompt lookup or from that slot's draft model state, and hands back
every token the pass yields. Prefill, admission, prefix reuse and aborts stay the Scheduler's: a slot's
cached tokens are its request's prompt and tokens but the last, as after plain steps (the K/V of rejected
drafts lie past them, positions decide).

Requests verify one after another rather than as one (B, T) batch: the reference model has no per-row draft
lengths, and the megakernel's multi-token verify step (issue 20) is where batching them belongs."""
from __future__ import annotations

import torch

from ..runtime.requests import Request, RequestEvent
from ..runtime.scheduler import Scheduler
from .draft_model import DraftModel
from .run import Speculation
from .verify import SpeculativeStats, draft_budget, verify_pass


class ScheduledSpeculation:
    """The Scheduler's `speculative` hook for one Speculation; `stats` adds up every request's passes."""

    def __init__(self, speculation: Speculation):
        self.speculation = speculation
        self.stats = SpeculativeStats()
        self._drafters: dict[int, DraftModel | None] = {}     # slot -> its draft model state (own cache)

    def _drafter(self, slot: int) -> DraftModel | None:
        """The slot's own draft model state (the loaded weights, a cache of its own: not the Engine's, which
        generate() may use from another thread)."""
        if slot not in self._drafters:
            self._drafters[slot] = self.speculation.new_drafter()
        return self._drafters[slot]

    @torch.no_grad()
    def __call__(self, sched: Scheduler, running: list[Request]) -> list[RequestEvent]:
        model, dev = sched.engine.model, sched.engine.device
        events = []
        for r in running:
            cache, seen = sched.cache.slot(r.slot), []

            def verify(tokens: torch.Tensor, position: int, cache=cache, seen=seen) -> torch.Tensor:
                seen.append(model.forward(tokens.to(dev), torch.tensor([position], device=dev), cache)[0])
                return seen[-1][None]

            seq, pos = r.seq, r.next_position
            k = draft_budget(self.speculation.draft_tokens, pos, sched.max_seq, seq.max_new_tokens - len(seq.token_ids))
            draft, accept = self.speculation.functions(r, self._drafter(r.slot))
            new = verify_pass(verify, draft, accept, r.prompt_ids + seq.token_ids, seq.token_ids[-1], pos, k,
                              self.stats)
            for i, tok in enumerate(new):
                ev = sched.took(r, r.take(tok, seen[0][i]))
                events.append(ev)
                if ev.finished:       # an eos, a stop string or max_new_tokens inside the accepted tokens
                    break
        return events
