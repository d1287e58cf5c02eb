"""Speculative sampling by the in-kernel sampler's keys (speculative/coupled.py), on the CPU: the reference model
stands in for the megakernel's verify step and decode step, each drawing by the sampler's numpy model
(monokernel/gumbel.py) under the words set_sampling last wrote. A pure temperature request then yields, token
for token, plain in-kernel sampling's stream with its seed, whatever the drafts (prompt lookup, the target
itself, an unrelated model), top-k and top-p included; greedy requests beside them stay plain greedy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import ENGINE_SPEC
from monokernel import gumbel
from monokernel.models.weights import random_weights
from monokernel.runtime.engine import Engine
from monokernel.runtime.sampling import SamplingParams
from monokernel.runtime.scheduler import Scheduler
from monokernel.speculative import run as spec_run
from monokernel.speculative.coupled import coupled_accept, draw_rows
from monokernel.speculative.draft_model import DraftModel
from monokernel.speculative.run import Speculation
from monokernel.speculative.scheduled import ScheduledSpeculation

PROMPTS = [[3, 17, 9, 44, 3, 17, 9, 44, 3], [30], [12, 7, 7, 58, 1, 2, 3, 12, 7, 7], [5, 5, 6]]
PARAMS = SamplingParams(temperature=0.9, seed=11, max_new_tokens=18)


class KernelDecode:
    """The megakernel's decode step as the Scheduler sees it: the wrapped decoder's logits, each row's token by
    the in-kernel rule (greedy where its words say so)."""

    samples_in_kernel = True

    def __init__(self, inner, batch: int):
        self.inner, self.words = inner, gumbel.sampling_words([0] * batch, [0] * batch, batch)

    def set_sampling(self, temperatures, seeds, top_ks=None, top_ps=None):
        self.words = gumbel.sampling_words(temperatures, seeds, len(self.words), top_ks, top_ps)

    def step(self, tokens, positions):
        _, logits = self.inner.step(tokens, positions)
        return torch.from_numpy(gumbel.sample_tokens(logits.numpy(), self.words, positions.numpy())), logits

    def __getattr__(self, name):
        return getattr(self.inner, name)


class KernelVerify:
    """MegaDecoder.verify over S slots x T rows done by the reference model, the rows drawn by the in-kernel
    rule, the acceptance counted as the kernel counts it."""

    def __init__(self, model, cache, t: int):
        self.model, self.cache, self.t, self.asked = model, cache, t, []
        self.set_sampling([0.0] * cache.batch * t, [0] * cache.batch * t)

    def set_sampling(self, temperatures, seeds, top_ks=None, top_ps=None):
        self.words = gumbel.sampling_words(temperatures, seeds, self.cache.batch * self.t, top_ks, top_ps)
        self.asked.append((list(temperatures), list(seeds), top_ks and list(top_ks)))

    def verify(self, tokens, start):
        S, T = tokens.shape
        logits = self.model.forward(tokens, start, self.cache)
        pos = (start[:, None] + torch.arange(T)[None, :]).reshape(-1).numpy()
        chosen = torch.from_numpy(gumbel.sample_tokens(logits.reshape(S * T, -1).numpy(), self.words, pos)).view(S, T)
        accepted = torch.tensor([next((n for n in range(T - 1) if chosen[s, n] != tokens[s, n + 1]), T - 1)
                                 for s in range(S)])
        return chosen, accepted, logits


@pytest.fixture(scope="module")
def engine():
    return Engine.from_weights(random_weights(ENGINE_SPEC, torch.float32, "cpu", seed=3))


@pytest.fixture
def as_mega(engine, monkeypatch):
    """The engine's decoders as the megakernel's: kind 'mega', sampling in the 'kernel'."""
    built = engine.make_decoder

    def make_decoder(batch, positions, extra=0):
        cache, decoder, _ = built(batch, positions, extra)
        return cache, KernelDecode(decoder, batch), "mega"
    monkeypatch.setattr(engine, "make_decoder", make_decoder)
    return engine


def _hook(method: str, drafter=None, k: int = 4) -> ScheduledSpeculation:
    h = ScheduledSpeculation(Speculation(method, k, drafter))
    h.make_verifier = lambda sched, t: KernelVerify(sched.engine.model, sched.cache, t)
    return h


def _tokens(sched: Scheduler, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    """Two requests at step 0, the rest at step 2; each one's tokens."""
    ids, out, step = [], {}, 0
    while step < 3 or sched.has_work:
        if step in (0, 2):
            ids += [sched.add_request(p, params) for p, params in (requests[:2] if step == 0 else requests[2:])]
        for ev in sched.step():
            assert ev.error is None
            out.setdefault(ev.request_id, []).append(ev.token_id)
        step += 1
    return [out[i] for i in ids]


def _drafter(engine, which: str):
    return {"ngram": None, "self": DraftModel(engine.weights),
            "other": DraftModel(random_weights(ENGINE_SPEC.with_(num_layers=1), torch.float32, seed=9))}[which]


@pytest.mark.parametrize("which", ["ngram", "self", "other"])
def test_scheduler_yields_plain_in_kernel_sampling(as_mega, which):
    """Concurrent requests arriving and leaving: the sampled ones (pure temperature, top-k) get plain in-kernel
    sampling's tokens with their seeds (drafts right, wrong or random), the greedy one plain greedy's; the
    verify step was told to draw exactly the sampled requests' rows, each with its own filter."""
    engine = as_mega
    reqs = [(PROMPTS[0], PARAMS), (PROMPTS[1], SamplingParams(max_new_tokens=18)),
            (PROMPTS[2], SamplingParams(temperature=0.7, seed=4, max_new_tokens=18)),
            (PROMPTS[3], SamplingParams(temperature=0.8, top_k=9, seed=2, max_new_tokens=18))]
    plain = _tokens(Scheduler(engine, 3), reqs)
    drafter = _drafter(engine, which)
    h = _hook("ngram" if drafter is None else "model:x", drafter)
    sched = Scheduler(engine, 3, speculative=h)
    assert sched.samples_in_kernel
    spec = _tokens(sched, reqs)
    assert spec == plain
    assert h.stats.passes < sum(map(len, spec))
    if which == "self":       # the drafter draws by the same keys on the same logits: every draft confirmed
        assert h.stats.accepted == h.stats.drafted > 0
    verifier = h._verifier[1]
    drawn = {(t, s, k) for temps, seeds, ks in verifier.asked
             for t, s, k in zip(temps, seeds, ks or [None] * len(temps))}
    assert drawn <= {(0.0, 0, None), (0.9, 11, None), (0.7, 4, None), (0.8, 2, 9)}
    assert {(0.9, 11, None), (0.7, 4, None), (0.8, 2, 9)} <= drawn


def test_other_seed_other_tokens(as_mega):
    """The coupled stream follows the seed: another seed draws other tokens, the same seed the same."""
    engine = as_mega
    one = _tokens(Scheduler(engine, 2, speculative=_hook("ngram")), [(PROMPTS[0], PARAMS), (PROMPTS[2], PARAMS)])
    again = _tokens(Scheduler(engine, 2, speculative=_hook("ngram")), [(PROMPTS[0], PARAMS), (PROMPTS[2], PARAMS)])
    other = SamplingParams(temperature=0.9, seed=12, max_new_tokens=18)
    two = _tokens(Scheduler(engine, 2, speculative=_hook("ngram")), [(PROMPTS[0], other), (PROMPTS[2], other)])
    assert one == again and one != two


@pytest.mark.parametrize("which", ["ngram", "other"])
def test_engine_generate_yields_plain_in_kernel_sampling(as_mega, which, monkeypatch):
    """Engine.generate with speculation on the 'megakernel' (its verify step standing in): the tokens of plain
    generation, which samples in the kernel, for every prompt."""
    engine = as_mega
    monkeypatch.setattr(engine, "engine", "mega")
    plain = [g.token_ids for g in engine.generate_ids(PROMPTS, PARAMS)]
    made = {}

    def verifier(eng, draft_tokens):
        if draft_tokens not in made:
            from monokernel.runtime.kv_cache import KVCache
            cache = KVCache(eng.spec, 1, eng.max_seq + draft_tokens, eng.dtype, eng.device)
            made[draft_tokens] = cache, KernelVerify(eng.model, cache, draft_tokens + 1)
        return made[draft_tokens]
    monkeypatch.setattr(spec_run, "mega_verifier", verifier)
    method = "ngram" if which == "ngram" else "model:preset:llama-3.2-1b"      # named, never loaded:
    other = _drafter(engine, "other")
    monkeypatch.setattr(spec_run.DraftModel, "load", classmethod(lambda cls, m, target: other))
    spec = [g.token_ids for g in engine.generate_ids(PROMPTS, PARAMS, speculative=method, draft_tokens=5)]
    assert spec == plain
    assert made[5][1].asked[-1] == ([0.9] * 6, [PARAMS.seed] * 6, [None] * 6)


def test_coupled_accept():
    """The prefix confirmed by the target's draws, then its draw; no draws is a programming error."""
    logits = torch.randn(4, 7)
    assert coupled_accept([3, 5, 1], None, logits, torch.tensor([3, 5, 2, 6])) == [3, 5, 2]
    assert coupled_accept([3, 5, 1], None, logits, torch.tensor([3, 5, 1, 6])) == [3, 5, 1, 6]
    assert coupled_accept([], None, logits[:1], torch.tensor([4])) == [4]
    with pytest.raises(ValueError, match="needs the target's draws"):
        coupled_accept([3], None, logits[:2], None)


def test_draw_rows_is_the_kernels_rule():
    """The host's draw of a pass's rows (where no kernel ran) is gumbel.sample_one at each row's position, under
    the request's temperature, top-k and top-p."""
    logits = torch.randn(5, 301) * 3
    p = SamplingParams(temperature=0.7, top_k=40, top_p=0.95)
    got = draw_rows(logits, p, 123, 40).tolist()
    assert got == [gumbel.sample_one(logits[i].numpy(), 0.7, 123, 40 + i, 40, 0.95) for i in range(5)]
    assert got != draw_rows(logits, p, 124, 40).tolist() or got != draw_rows(logits, p, 123, 41).tolist()
    assert np.unique(got).size > 1


class MegaStep:
    """MegaDecoder.step over a drafter's own cache (batch 1), the reference model computing it: its token by
    the in-kernel rule under the words set_sampling wrote."""

    def __init__(self, model, cache):
        self.model, self.cache, self.steps = model, cache, 0
        self.set_sampling([0.0], [0])

    def set_sampling(self, temperatures, seeds, top_ks=None, top_ps=None):
        self.words = gumbel.sampling_words(temperatures, seeds, 1, top_ks, top_ps)

    def step(self, tokens, positions):
        from monokernel.runtime.prefill import prefill_chunk
        self.steps += 1
        logits = prefill_chunk(self.model, [int(tokens[0])], int(positions[0]), self.cache, 0)[None]
        return torch.from_numpy(gumbel.sample_tokens(logits.numpy(), self.words, positions.numpy())), logits


@pytest.mark.parametrize("how", ["greedy", "coupled"])
def test_megakernel_drafter_catches_up_by_steps(how, monkeypatch):
    """A drafter on its 'megakernel' proposes what the reference drafter proposes, pass after pass of a growing
    context (drafts partly rejected: the context goes another way), its few unseen tokens decoded by kernel
    steps, a long new context still through the prefill."""
    from monokernel.runtime.kv_cache import KVCache

    w = random_weights(ENGINE_SPEC.with_(num_layers=1), torch.float32, seed=9)
    ref, mega = DraftModel(w), DraftModel(w, mega_positions=128)

    def reserve(self=mega):
        if self.cache is None:
            self.cache = KVCache(self.spec, 1, self.mega_positions, torch.float32, "cpu")
            self.mega = MegaStep(self.model, self.cache)
        return self.cache.max_seq
    monkeypatch.setattr(mega, "_reserve_mega", reserve)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    propose = {"greedy": lambda d: d.propose, "coupled": lambda d: (lambda c, k: d.coupled(params, 5)(c, k)[0])}[how]
    gen = torch.Generator().manual_seed(1)
    context = torch.randint(0, ENGINE_SPEC.vocab_size, (40,), generator=gen).tolist()
    steps = []
    for n in range(6):
        a, b = propose(ref)(context, 4), propose(mega)(context, 4)
        assert a == b, n
        steps.append(mega.mega.steps)
        context += a[:n % 3] + [int(torch.randint(0, ENGINE_SPEC.vocab_size, (1,), generator=gen))]
    # the first pass prefilled all but the last 16 of 40 tokens; later passes stepped their 1-3 unseen tokens
    assert steps[0] == 16 + 3 and all(1 + 3 <= s - r <= 3 + 3 for r, s in zip(steps, steps[1:]))
