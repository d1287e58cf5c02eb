"""The request-level engine (Scheduler) on a tiny random model: continuous batching, per-request sampling,
prefix reuse, abort and a failing step (CPU, fp32, reference decoder)."""
from __future__ import annotations

import pytest
import torch

from monokernel.errors import InputError
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.engine import Engine
from monokernel.runtime.kv_cache import KVCache
from monokernel.runtime.prefill import prefill_chunk
from monokernel.runtime.sampling import SamplingParams
from monokernel.runtime.scheduler import Scheduler

from conftest import CPU_SPECS, ENGINE_SPEC as SPEC, rel_max, FP32_TOL

PROMPTS = [[3, 17, 9, 44, 5, 21, 8], [30], [12, 7, 7, 58, 1, 2, 3, 4, 5, 6, 7, 8, 9], [5, 5, 6], [40, 41]]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_weights(random_weights(SPEC, torch.float32, "cpu", seed=3))


def run_all(sched: Scheduler, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]) -> dict[str, list[int]]:
    """Adds requests at the given step numbers and steps until all finish; token ids per request id."""
    out: dict[str, list[int]] = {}
    order: list[str] = []
    step = 0
    while step <= max(arrivals) or sched.has_work:
        for prompt, params in arrivals.get(step, []):
            order.append(sched.add_request(prompt, params))
        for ev in sched.step():
            assert ev.error is None
            out.setdefault(ev.request_id, []).append(ev.token_id)
        step += 1
    return {rid: out[rid] for rid in order}


@pytest.mark.parametrize("case", list(CPU_SPECS))
def test_prefill_matches_reference(case):
    """Chunked SDPA prefill into one slot of a batch cache: logits and K/V as the reference forward's."""
    spec = CPU_SPECS[case]
    model = ReferenceModel(random_weights(spec, torch.float32, "cpu", seed=1))
    tokens = torch.randint(0, spec.vocab_size, (1, 37), generator=torch.Generator().manual_seed(0))
    ref_cache = KVCache(spec, 1, 64, torch.float32, "cpu")
    ref = model.forward(tokens, torch.zeros(1, dtype=torch.long), ref_cache)[0, -1]
    cache = KVCache(spec, 3, 64, torch.float32, "cpu")
    cache.k.fill_(3e4)
    ids = tokens[0].tolist()
    assert prefill_chunk(model, ids[:10], 0, cache, 2, last_logits=False) is None
    prefill_chunk(model, ids[10:30], 10, cache, 2, last_logits=False)
    ours = prefill_chunk(model, ids[30:], 30, cache, 2)
    assert rel_max(ours, ref) < FP32_TOL
    assert rel_max(cache.k[:, 2, :, :37], ref_cache.k[:, 0, :, :37]) < FP32_TOL
    assert (cache.k[:, :2] == 3e4).all()   # other slots untouched


def test_continuous_equals_alone(engine):
    """Requests arriving at different steps, with different lengths, give the tokens each gives alone; they
    also equal the fixed-batch Engine.generate_ids (greedy)."""
    params = [SamplingParams(max_new_tokens=n) for n in (9, 3, 12, 5, 7)]
    alone = [run_all(Scheduler(engine, 3, prefill_chunk_size=4), {0: [(p, sp)]}) for p, sp in zip(PROMPTS, params)]
    alone = [next(iter(a.values())) for a in alone]
    sched = Scheduler(engine, 3, prefill_chunk_size=4)
    together = run_all(sched, {0: [(PROMPTS[0], params[0]), (PROMPTS[1], params[1])], 2: [(PROMPTS[2], params[2])],
                               3: [(PROMPTS[3], params[3]), (PROMPTS[4], params[4])]})
    assert list(together.values()) == alone
    for p, sp, want in zip(PROMPTS, params, alone):
        assert engine.generate_ids([p], sp)[0].token_ids == want
    assert sched.num_running == 0 and not sched.live


def test_late_request_joins(engine):
    """A request added while a long one decodes gets its first token before the long one finishes."""
    sched = Scheduler(engine, 2)
    long_id = sched.add_request(PROMPTS[0], SamplingParams(max_new_tokens=40))
    for _ in range(3):
        sched.step()
    short_id = sched.add_request(PROMPTS[1], SamplingParams(max_new_tokens=2))
    seen = []
    while sched.has_work:
        seen += [(ev.request_id, ev.finished) for ev in sched.step()]
    assert seen.index((short_id, True)) < seen.index((long_id, True))


def test_seeded_sampling_alone_equals_batched(engine):
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_new_tokens=10)
    alone = Scheduler(engine, 4).generate([PROMPTS[2]], params)[0].token_ids
    sched = Scheduler(engine, 4)
    others = [sched.add_request(p, SamplingParams(temperature=1.3, max_new_tokens=6)) for p in PROMPTS[:2]]
    assert others
    assert sched.generate([PROMPTS[2]], params)[0].token_ids == alone


def test_prefix_reuse(engine):
    """A prompt extending what a free slot holds prefills only the new tokens, with the same result."""
    sched = Scheduler(engine, 2, prefill_chunk_size=5)
    [first] = sched.generate([PROMPTS[2]], SamplingParams(max_new_tokens=6))
    second_prompt = PROMPTS[2] + first.token_ids + [11, 12]
    before = sched.stats.prefill_tokens
    [second] = sched.generate([second_prompt], SamplingParams(max_new_tokens=5))
    computed = sched.stats.prefill_tokens - before
    assert computed == 3    # the last generated token (never fed back) and the two new ones
    assert sched.stats.reused_tokens == len(second_prompt) - 3
    fresh = Scheduler(engine, 2, prefill_chunk_size=5).generate([second_prompt], SamplingParams(max_new_tokens=5))
    assert second.token_ids == fresh[0].token_ids


def test_unrelated_request_spares_longer_cache(engine):
    """A request that matches no slot takes the one caching least, so a longer conversation keeps its K/V."""
    sched = Scheduler(engine, 2)
    long_turn, short_turn = sched.generate([PROMPTS[2], PROMPTS[1]], SamplingParams(max_new_tokens=4))
    sched.generate([[50, 51, 52]], SamplingParams(max_new_tokens=2))
    before = sched.stats.prefill_tokens
    sched.generate([PROMPTS[2] + long_turn.token_ids + [9]], SamplingParams(max_new_tokens=2))
    assert sched.stats.prefill_tokens - before == 2


def test_abort_frees_slot(engine):
    sched = Scheduler(engine, 1)
    rid = sched.add_request(PROMPTS[0], SamplingParams(max_new_tokens=50))
    waiting = sched.add_request(PROMPTS[1], SamplingParams(max_new_tokens=5))
    sched.step()
    sched.step()
    assert sched.num_running == 1 and sched.num_waiting == 1
    assert sched.abort(rid) and not sched.abort(rid)
    assert sched.num_running == 0
    events = sched.step()
    assert sched.slots[0] is not None and sched.slots[0].id == waiting and len(events) == 2   # prefill, decode
    assert sched.stats.aborted == 1


class FailOnce:
    """Decoder wrapper: the n-th step call raises, once over every decoder the scheduler builds."""

    calls = 0

    def __init__(self, decoder, fail_at: int):
        self.decoder, self.fail_at = decoder, fail_at

    def step(self, tokens, positions):
        FailOnce.calls += 1
        if FailOnce.calls == self.fail_at:
            raise RuntimeError("injected fault")
        return self.decoder.step(tokens, positions)


def test_failing_step_resets(engine):
    """A step that raises ends the requests in the slots with an error; queued and later ones succeed."""
    FailOnce.calls = 0
    sched = Scheduler(engine, 2, wrap_decoder=lambda d: FailOnce(d, fail_at=2))
    a = sched.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5))
    b = sched.add_request(PROMPTS[1], SamplingParams(max_new_tokens=5))
    c = sched.add_request(PROMPTS[2], SamplingParams(max_new_tokens=3))
    events = []
    while sched.has_work:
        events += sched.step()
    errors = {ev.request_id for ev in events if ev.error is not None}
    assert errors == {a, b} and sched.stats.failures == 1
    done = [ev for ev in events if ev.request_id == c]
    assert len(done) == 3 and done[-1].finish_reason == "length"
    want = Scheduler(engine, 2).generate([PROMPTS[2]], SamplingParams(max_new_tokens=3))[0].token_ids
    assert [ev.token_id for ev in done] == want


def test_logprobs(engine):
    sched = Scheduler(engine, 2)
    rid = sched.add_request(PROMPTS[0], SamplingParams(max_new_tokens=3), logprobs=4)
    events = []
    while sched.has_work:
        events += sched.step()
    assert [ev.request_id for ev in events] == [rid] * 3
    for ev in events:
        assert len(ev.top_logprobs) == 4 and ev.top_logprobs[0][1] >= ev.logprob - 1e-6 and ev.logprob <= 0
        assert ev.top_logprobs[0][0] == ev.token_id   # greedy: the most likely token


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[i % 60 for i in range(90)], params=SamplingParams(max_new_tokens=10)),
     "90 tokens and max_new_tokens=10.*96"),
    (dict(prompt=list(range(60)) * 2), "120 tokens but the context holds 96"),
    (dict(prompt=[1, 99]), "token id 99, outside the vocabulary 0..60"),
    (dict(prompt=[]), "non-empty"),
    (dict(prompt="hello"), "no tokenizer"),
    (dict(prompt=None), "either a prompt"),
])
def test_bad_requests(engine, kwargs, message):
    sched = Scheduler(engine, 1)
    with pytest.raises(InputError, match=message):
        sched.add_request(**kwargs)
    assert not sched.has_work
