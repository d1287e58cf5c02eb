"""Speculation inside the request-level Scheduler (monokernel chat and serve). Prefill, admission, prefix reuse
and aborts stay the Scheduler's: a slot's cached tokens are its request's prompt and tokens but the last, as after
plain steps (the K/V of rejected drafts lie past them, positions decide).

On the megakernel every slot of the batch goes through one launch of the verify step (B slots x T rows, T =
draft tokens + 1): a decoding request's last token and its draft (padded with its last token to T), a free or
prefilling slot's pad rows at the first positions past its valid K/V. The Scheduler's cache then holds T - 1
positions past the context (`extra_positions`), where a padded row near the end lands. A request the kernel
samples (Request.in_kernel: temperature > 0) has every row of its slot drawn there by its seed (coupled.py), so
its tokens are those of plain in-kernel sampling; greedy requests confirm against the kernel's argmax. On the
reference engine each decoding request gets one verify pass of the reference model over its own slot
(KVCache.slot), one after another (the reference model has no per-row draft lengths).
"""
from __future__ import annotations

import torch

from ..runtime.requests import Request, RequestEvent
from ..runtime.scheduler import PAD_TOKEN, Scheduler
from .draft_model import DraftModel
from .run import Speculation
from .verify import SpeculativeStats, draft_budget, verify_pass


class ScheduledSpeculation:
    """The Scheduler's `speculative` hook for one Speculation; `stats` adds up every request's passes."""

    # the Scheduler marks sampled requests for in-kernel sampling: _batched draws them by coupled.py
    samples_in_kernel = True

    def __init__(self, speculation: Speculation):
        self.speculation = speculation
        self.stats = SpeculativeStats()
        self._drafters: dict[int, DraftModel | None] = {}     # slot -> its draft model state (own cache)
        self._verifier = None                                 # (the cache it was built on, the verify decoder)

    @property
    def extra_positions(self) -> int:
        """Cache positions past the context the Scheduler keeps for the verify step's padded rows."""
        return self.speculation.draft_tokens

    def make_verifier(self, sched: Scheduler, tokens_per_seq: int):
        """The verify step over the Scheduler's cache: the megakernel's (a test replaces it)."""
        from ..runtime.mega import MegaDecoder
        return MegaDecoder(sched.engine.weights, sched.cache, tokens_per_seq=tokens_per_seq)

    def _drafter(self, slot: int) -> DraftModel | None:
        """The slot's own draft model state (the loaded weights, a cache of its own: not the Engine's, which
        generate() may use from another thread)."""
        if slot not in self._drafters:
            self._drafters[slot] = self.speculation.new_drafter()
        return self._drafters[slot]

    @torch.no_grad()
    def __call__(self, sched: Scheduler, running: list[Request]) -> list[RequestEvent]:
        if sched.kind == "mega":
            return self._batched(sched, running)
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

    def _batched(self, sched: Scheduler, running: list[Request]) -> list[RequestEvent]:
        """One verify launch for every slot; each decoding request then accepts from its own rows."""
        t = self.speculation.draft_tokens + 1
        if self._verifier is None or self._verifier[0] is not sched.cache:    # built again after a reset
            self._verifier = (sched.cache, self.make_verifier(sched, t))
        tokens, start, passes = [[PAD_TOKEN] * t for _ in range(sched.batch)], [0] * sched.batch, {}
        rows = sched.batch * t                   # every row greedy but coupled ones
        temps, seeds, top_ks, top_ps = [0.0] * rows, [0] * rows, [None] * rows, [None] * rows
        for s, r in enumerate(sched.slots):
            if r is None:
                start[s] = len(sched.cached[s])
            elif not r.decoding:
                start[s] = r.prefilled
        for r in running:
            seq, pos = r.seq, r.next_position
            k = draft_budget(self.speculation.draft_tokens, pos, sched.max_seq, seq.max_new_tokens - len(seq.token_ids))
            draft, accept = self.speculation.functions(r, self._drafter(r.slot), coupled=r.in_kernel)
            if r.in_kernel:
                own = slice(r.slot * t, (r.slot + 1) * t)
                temps[own], seeds[own] = [r.params.temperature] * t, [r.seed] * t
                top_ks[own], top_ps[own] = [r.params.top_k] * t, [r.params.top_p] * t
            drafted, q = draft(r.prompt_ids + seq.token_ids, k) if k else ([], None)
            drafted = drafted[:k]
            row = [seq.token_ids[-1], *drafted]
            tokens[r.slot], start[r.slot] = row + row[-1:] * (t - len(row)), pos
            passes[r.slot] = (drafted, q, accept)
        dev, verifier = sched.engine.device, self._verifier[1]
        verifier.set_sampling(temps, seeds, top_ks, top_ps)     # copied to the device only when changed
        chosen, _, logits = verifier.verify(torch.tensor(tokens, device=dev), torch.tensor(start, device=dev))
        chosen = chosen.cpu()                    # one copy to the host for every row's own token
        events = []
        for r in running:
            drafted, q, accept = passes[r.slot]
            rows = logits[r.slot, :len(drafted) + 1]
            new = accept(drafted, None if q is None else q[:len(drafted)], rows, chosen[r.slot, :len(drafted) + 1])
            self.stats.count(len(drafted), len(new))
            for i, tok in enumerate(new):
                ev = sched.took(r, r.take(tok, rows[i]))
                events.append(ev)
                if ev.finished:
                    break
        return events
