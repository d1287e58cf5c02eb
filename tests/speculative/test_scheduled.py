"""Speculation inside the request-level Scheduler (chat, serve): requests arriving and leaving while others
decode get plain greedy's tokens, several a step; a follow-up turn reuses its slot's cache; sampled requests are
reproducible by seed; logprobs come from the verify pass's rows."""
from __future__ import annotations

import pytest
import torch

from conftest import ENGINE_SPEC
from monokernel.errors import InputError
from monokernel.models.weights import random_weights
from monokernel.runtime.engine import Engine
from monokernel.runtime.sampling import SamplingParams
from monokernel.runtime.scheduler import Scheduler
from monokernel.speculative.draft_model import DraftModel
from monokernel.speculative.run import Speculation
from monokernel.speculative.scheduled import ScheduledSpeculation

PROMPTS = [[3, 17, 9, 44, 3, 17, 9], [30], [12, 7, 7, 58, 1, 2, 3, 12, 7, 7], [5, 5, 6]]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_weights(random_weights(ENGINE_SPEC, torch.float32, "cpu", seed=3))


def hook(engine, method: str, k: int = 4, drafter: DraftModel | None = None) -> ScheduledSpeculation:
    return ScheduledSpeculation(Speculation(method, k, drafter))


def run(sched: Scheduler, params: SamplingParams, logprobs=None) -> tuple[list[list[int]], int]:
    """Two requests at step 0, two more at step 2; the tokens of each and the steps taken."""
    ids, out, step = [], {}, 0
    while step < 3 or sched.has_work:
        if step in (0, 2):
            ids += [sched.add_request(p, params, logprobs=logprobs) for p in PROMPTS[step:step + 2]]
        for ev in sched.step():
            assert ev.error is None
            out.setdefault(ev.request_id, []).append(ev)
        step += 1
    return [out[i] for i in ids], step


@pytest.mark.parametrize("method", ["ngram", "model", "self"])
def test_greedy_equals_plain(engine, method):
    params = SamplingParams(max_new_tokens=20)
    plain, plain_steps = run(Scheduler(engine, 3), params)
    drafter = {"ngram": None, "self": DraftModel(engine.weights),
               "model": DraftModel(random_weights(ENGINE_SPEC.with_(num_layers=1), torch.float32, seed=9))}[method]
    h = hook(engine, "ngram" if drafter is None else "model:x", 4, drafter)
    spec, steps = run(Scheduler(engine, 3, speculative=h), params)
    assert [[e.token_id for e in r] for r in spec] == [[e.token_id for e in r] for r in plain]
    assert [r[-1].finish_reason for r in spec] == [r[-1].finish_reason for r in plain]
    if method == "self":
        assert h.stats.accepted == h.stats.drafted and steps < plain_steps // 2


def test_next_turn_reuses_the_slot(engine):
    h = hook(engine, "model:x", 3, DraftModel(engine.weights))
    sched = Scheduler(engine, 1, speculative=h)
    [first] = sched.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8))
    turn = PROMPTS[0] + first.token_ids + [4, 5]
    before = sched.stats.reused_tokens
    [second] = sched.generate([turn], SamplingParams(max_new_tokens=8))
    assert sched.stats.reused_tokens - before == len(turn) - 3    # the prompt, the first reply less its last token
    assert second.token_ids == Scheduler(engine, 1).generate([turn], SamplingParams(max_new_tokens=8))[0].token_ids


def test_sampled_reproducible_with_logprobs(engine):
    params = SamplingParams(temperature=0.8, top_k=20, seed=5, max_new_tokens=12)
    runs = [run(Scheduler(engine, 2, speculative=hook(engine, "ngram")), params, logprobs=2)[0] for _ in range(2)]
    assert [[e.token_id for e in r] for r in runs[0]] == [[e.token_id for e in r] for r in runs[1]]
    ev = runs[0][0][3]
    assert ev.logprob is not None and len(ev.top_logprobs) == 2 and ev.top_logprobs[0][1] >= ev.logprob - 1e-6


def test_engine_kind_refused(engine, monkeypatch):
    monkeypatch.setattr(engine, "engine", "mega")
    with pytest.raises(InputError, match="the megakernel verifies at most 7 draft tokens a pass"):
        Speculation.create("ngram", 8, engine)


class _ReferenceVerifier:
    """The megakernel's verify step (MegaDecoder.verify) done by the reference model over the Scheduler's cache:
    what the batched path asks of it, on the CPU."""

    def __init__(self, sched, t):
        self.model, self.cache, self.t, self.calls = sched.engine.model, sched.cache, t, 0

    def set_sampling(self, temperatures, seeds, top_ks=None, top_ps=None):
        assert list(temperatures) == [0.0] * self.cache.batch * self.t     # greedy requests: every row greedy

    def verify(self, tokens, start):
        assert tokens.shape == (self.cache.batch, self.t)
        assert int((start + self.t).max()) <= self.cache.max_seq      # every padded row inside the cache
        self.calls += 1
        logits = self.model.forward(tokens, start, self.cache)
        return logits.argmax(-1), None, logits


@pytest.mark.parametrize("method", ["ngram", "self"])
def test_batched_verify_equals_plain(engine, method, monkeypatch):
    """The megakernel path (one verify launch for every slot: here the reference model standing in for the
    kernel): concurrent requests arriving and leaving get plain greedy's tokens, one launch a step, and the cache
    holds the draft length past the context for the padded rows, up to requests that end at the context's end."""
    params = SamplingParams(max_new_tokens=20)
    plain, _ = run(Scheduler(engine, 3), params)
    h = hook(engine, "ngram" if method == "ngram" else "model:x", 4, None if method == "ngram" else DraftModel(engine.weights))
    made = []
    monkeypatch.setattr(h, "make_verifier", lambda sched, t: made.append(_ReferenceVerifier(sched, t)) or made[-1])
    sched = Scheduler(engine, 3, speculative=h)
    sched.kind = "mega"
    spec, steps = run(sched, params)
    assert [[e.token_id for e in r] for r in spec] == [[e.token_id for e in r] for r in plain]
    assert len(made) == 1 and made[0].calls == sched.stats.decode_steps < h.stats.passes
    assert sched.cache.max_seq == sched.max_seq + 4
    # at the model's position limit the context gives up the padding's positions
    assert sched.max_seq == min(engine.max_seq, engine.spec.max_position_embeddings - 4)
    long = [1, 2, 3] * ((sched.max_seq - 6) // 3)            # runs into the end of the context
    r = sched.make_request(long, SamplingParams(max_new_tokens=sched.max_seq - len(long)))
    sched.submit(r)
    while sched.has_work:
        assert all(ev.error is None for ev in sched.step())
    assert r.seq.finish_reason == "length" and len(r.prompt_ids) + len(r.seq.token_ids) == sched.max_seq
