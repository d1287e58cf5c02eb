"""The host side of a decode step, where it keeps state between steps (perf note 39): Sequence's stop-string
search and hold-back, the Scheduler's sampling rows, the logits rows it hands requests, and MegaDecoder's
record of whether any row asks for top-k / top-p. Each against the obvious rule it shortcuts (CPU)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from monokernel import gumbel
from monokernel.models.weights import random_weights
from monokernel.runtime.engine import Engine
from monokernel.runtime.requests import Request
from monokernel.runtime.sampling import SamplingParams
from monokernel.runtime.scheduler import Scheduler
from monokernel.runtime.sequence import Sequence

from conftest import ENGINE_SPEC as SPEC, mega_sampling_stand_in

PROMPTS = [[3, 17, 9, 44, 5, 21, 8], [30], [12, 7, 7, 58, 1, 2, 3, 4, 5, 6, 7, 8, 9], [5, 5, 6], [40, 41]]


class Pieces:
    """A detokeniser whose token i releases pieces[i] (flush: nothing left)."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def push(self, token_id: int) -> str:
        return self.pieces[token_id]

    def flush(self) -> str:
        return ""


def released_by_rule(pieces: list[str], stop: tuple[str, ...]) -> tuple[list[str], str | None]:
    """The obvious rule over the whole text after every token: cut at the first stop string anywhere; else
    release all but the longest tail that is a proper prefix of a stop string."""
    deltas, out, text = [], "", ""
    for piece in pieces:
        text += piece
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:
            deltas.append(text[:min(cuts)][len(out):])
            return deltas, "stop"
        held = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        deltas.append(text[:len(text) - held][len(out):])
        out = text[:len(text) - held]
    return deltas, None


@pytest.mark.parametrize("method", ["append", "add"])
@pytest.mark.parametrize("seed", range(40))
def test_sequence_stop_strings_as_the_rule(seed, method):
    """Random pieces (empty ones included) over a small alphabet against stop strings that share characters:
    the deltas Sequence.append (its event) and .add (a pair) release equal the whole-text rule's, and so does
    the finish."""
    rng = random.Random(seed)
    stop = tuple(rng.choice(["ab:", "\n\n", "b", "a:a", "::b:"]) for _ in range(rng.randint(1, 3)))
    pieces = ["".join(rng.choice("ab:\nc") for _ in range(rng.randint(0, 3))) for _ in range(40)]
    seq = Sequence(3, [1], len(pieces) + 1, frozenset(), stop, Pieces(pieces))
    got = []
    for i in range(len(pieces)):
        if method == "append":
            ev = seq.append(i)
            assert (ev.index, ev.token_id) == (3, i)
            text, reason = ev.text, ev.finish_reason
        else:
            text, reason = seq.add(i)
        got.append(text)
        if reason:
            break
    want, reason = released_by_rule(pieces, stop)
    assert got == want and seq.finish_reason == reason
    assert seq.text == "".join(got) or reason is None


def test_sequence_holds_back_a_stop_prefix():
    """A tail that could still become a stop string waits; a character that ends no stop prefix releases it."""
    seq = Sequence(0, [1], 10, frozenset(), ("END",), Pieces(["abc E", "N", "x", "EN", "D"]))
    assert [seq.append(i).text for i in range(3)] == ["abc ", "", "ENx"]
    ev3, ev4 = seq.append(3), seq.append(4)
    assert (ev3.text, ev4.text, ev4.finish_reason, seq.text) == ("", "", "stop", "abc ENx")


# ---- the Scheduler's sampling rows -------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    return Engine.from_weights(random_weights(SPEC, torch.float32, "cpu", seed=3))


def asked_by_slots(sched: Scheduler) -> tuple[list, list, list, list]:
    """What set_sampling must say for the step about to run: each decoding in-kernel request's params and
    seed in its slot, greedy elsewhere."""
    rows = [r if r is not None and r.decoding and r.in_kernel else None for r in sched.slots]
    return ([0.0 if r is None else r.params.temperature for r in rows], [0 if r is None else r.seed for r in rows],
            [None if r is None else r.params.top_k for r in rows],
            [None if r is None else r.params.top_p for r in rows])


class SamplingRows:
    """A decoder that samples in the kernel (the reference's argmax stands in for the draws) and notes, at
    every step, whether the sampling it was last told is what the Scheduler's slots ask (noted, not asserted:
    the Scheduler turns an exception in a step into an error event); its `fail_at`-th step over all decoders
    raises."""

    samples_in_kernel, status = True, None
    steps, stale = 0, []

    def __init__(self, inner, holder: list, fail_at: int | None):
        self.inner, self.holder, self.fail_at = inner, holder, fail_at
        self.asked, self.calls = None, 0

    def set_sampling(self, temperatures, seeds, top_ks=None, top_ps=None):
        self.asked, self.calls = (list(temperatures), list(seeds), list(top_ks), list(top_ps)), self.calls + 1

    def step(self, tokens, positions):
        SamplingRows.steps += 1
        if self.asked != asked_by_slots(self.holder[0]):
            SamplingRows.stale.append(SamplingRows.steps)
        if SamplingRows.steps == self.fail_at:
            raise RuntimeError("injected fault")
        return self.inner.step(tokens, positions)


def run_arrivals(sched: Scheduler, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]) -> None:
    step = 0
    while step <= max(arrivals) or sched.has_work:
        for prompt, params in arrivals.get(step, []):
            sched.add_request(prompt, params)
        sched.step()
        step += 1


def sampling_rows_scheduler(engine, fail_at: int | None = None) -> tuple[Scheduler, list[SamplingRows]]:
    SamplingRows.steps, SamplingRows.stale = 0, []
    holder, made = [], []

    def wrap(d):
        made.append(SamplingRows(d, holder, fail_at))
        return made[-1]

    holder.append(Scheduler(engine, 3, wrap_decoder=wrap))
    return holder[0], made


def test_scheduler_sampling_rows(engine):
    """Requests of different sampling come and go across 3 slots, a sampled one taking the slot another left
    the step before: every step's decoder was told the sampling of exactly its slots' requests, and steps
    that run the same requests as the one before tell it nothing."""
    sched, made = sampling_rows_scheduler(engine)
    t = [SamplingParams(temperature=0.7, seed=1, max_new_tokens=9), SamplingParams(max_new_tokens=4),
         SamplingParams(temperature=1.3, seed=2, top_k=5, max_new_tokens=3),
         SamplingParams(temperature=0.7, seed=3, top_p=0.5, max_new_tokens=3),
         SamplingParams(temperature=0.9, seed=4, top_k=3, top_p=0.8, max_new_tokens=7)]
    run_arrivals(sched, {0: [(PROMPTS[0], t[0]), (PROMPTS[1], t[1]), (PROMPTS[2], t[2])],
                         1: [(PROMPTS[3], t[3]), (PROMPTS[4], t[4])], 6: [(PROMPTS[1], t[2])]})
    assert SamplingRows.stale == [] and len(made) == 1
    assert SamplingRows.steps == sched.stats.decode_steps > made[0].calls > 3


def test_scheduler_sampling_after_a_reset(engine):
    """A decoder built after a failed step is told the sampling of its first step, even where the rows ask
    what the failed decoder was told (all greedy)."""
    sched, made = sampling_rows_scheduler(engine, fail_at=2)
    greedy = SamplingParams(max_new_tokens=4)
    run_arrivals(sched, {0: [(PROMPTS[0], greedy), (PROMPTS[1], greedy)], 3: [(PROMPTS[2], greedy)],
                         5: [(PROMPTS[3], SamplingParams(temperature=0.5, seed=9, max_new_tokens=3))]})
    assert SamplingRows.stale == [] and sched.stats.failures == 1 and len(made) == 2
    assert SamplingRows.steps == sched.stats.decode_steps + 1 and made[1].calls == 2


# ---- the logits rows -----------------------------------------------------------------------------
def test_reads_logits():
    """Where a request needs its logits row beside the decoder's token, and that choose() takes the token
    without one elsewhere."""
    def request(logprobs=None, in_kernel=False, **kw):
        r = Request("r", [1], SamplingParams(**kw), Sequence(0, [1], 8, frozenset(), (), None), logprobs=logprobs)
        r.in_kernel = in_kernel
        return r

    assert not request().reads_logits and request(logprobs=0).reads_logits
    assert request(temperature=0.5).reads_logits            # sampled on the host
    assert not request(temperature=0.5, in_kernel=True).reads_logits
    assert request(temperature=0.5, in_kernel=True, logprobs=2).reads_logits
    for r in (request(), request(temperature=0.5, top_k=3, in_kernel=True)):
        assert r.choose(None, 7).token_id == 7 and r.seq.token_ids == [7]


class RowsRead(torch.Tensor):
    """Logits that count the rows taken from them."""

    taken: list = []

    def __getitem__(self, index):
        RowsRead.taken.append(index)
        return torch.Tensor.__getitem__(self, index).as_subclass(torch.Tensor)   # rows count once


def test_scheduler_hands_logits_rows_only_where_read(engine):
    """A greedy and an in-kernel request get no logits row from a decode step; a logprobs request and a host
    sampled one get theirs, and their tokens and logprobs are those of a plain decoder."""
    class Wrapped:
        samples_in_kernel = False

        def __init__(self, inner):
            self.inner = inner

        def step(self, tokens, positions):
            chosen, logits = self.inner.step(tokens, positions)
            return chosen, logits.as_subclass(RowsRead)

    reqs = [(PROMPTS[0], SamplingParams(max_new_tokens=4), None),
            (PROMPTS[1], SamplingParams(max_new_tokens=4), 2),
            (PROMPTS[2], SamplingParams(temperature=0.8, seed=5, max_new_tokens=4), None)]

    def run(wrap):
        sched = Scheduler(engine, 3, wrap_decoder=wrap)
        made = [sched.make_request(p, sp, logprobs=lp) for p, sp, lp in reqs]
        for r in made:
            sched.submit(r)
        events = []
        while sched.has_work:
            events += sched.step()
        return [[(ev.token_id, ev.logprob, ev.top_logprobs) for ev in events if ev.request_id == r.id]
                for r in made], [r.slot for r in made]

    RowsRead.taken = []
    got, slots = run(Wrapped)
    assert sorted(RowsRead.taken) == sorted(slots[1:] * 3)     # 3 decode steps each, after the prefill's token
    assert got == run(None)[0]


# ---- MegaDecoder's filtered rows ---------------------------------------------------------------
def test_megadecoder_host_draws_follow_the_words():
    """MegaDecoder's set_sampling / _host_draws on the CPU (a stand-in holding what they read): flagged rows are
    drawn on the host by gumbel's rule while a row asks for top-k or top-p, and the flags go unread once no
    row does (a greedy or pure temperature set after a filtered one)."""
    from monokernel.runtime.mega import MegaDecoder

    B, V = 3, 80
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(0))
    fake = mega_sampling_stand_in(B, V, host_draw=torch.tensor([0, 1, 0], dtype=torch.int32), logits=logits,
                                  last_host_draws=[])
    out, positions = torch.tensor([4, 5, 6], dtype=torch.int32), torch.tensor([10, 11, 12])
    temps, seeds = [0.7, 1.1, 0.0], [5, 6, 7]
    MegaDecoder.set_sampling(fake, temps, seeds, [None, 20, None], [None, 0.95, None])
    drawn = MegaDecoder._host_draws(fake, out, positions)
    want = gumbel.sample_tokens(logits[1:2].numpy(), fake._sampling_words[1:2], np.array([11]))
    assert drawn.tolist() == [4, int(want[0]), 6] and fake.last_host_draws == [1]
    for top_k in ([None] * 3, None):         # no filter left: the stale flag is not read
        MegaDecoder.set_sampling(fake, temps, seeds, top_k)
        assert MegaDecoder._host_draws(fake, out, positions) is out and fake.last_host_draws == []
