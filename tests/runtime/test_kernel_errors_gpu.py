"""The megakernel's error paths on the GPU (skipped without CUDA): inputs it refuses by itself, a step that
times out, a grid that cannot be resident, launches from another stream, two engines in one process. After
each, the decoder (and the engine around it) must still give the right answers."""
from __future__ import annotations

import time

import pytest
import torch

from monokernel.errors import InputError, KernelRuntimeError
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.schedule.abi import TASK_WORDS
from monokernel.schedule.tasks import TASK_FIELDS

from conftest import TINY_SPECS, prefilled

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LENGTHS = [5, 30, 61]
MAX_SEQ = 64


def _setup(name="llama", timeout_s=20.0, seed=3):
    from monokernel.runtime.mega import MegaDecoder
    spec = TINY_SPECS[name]
    w = random_weights(spec, torch.bfloat16, "cuda", seed=seed)
    cache = prefilled(ReferenceModel(w), len(LENGTHS), MAX_SEQ, LENGTHS, torch.Generator().manual_seed(seed))[1]
    return spec, w, cache, MegaDecoder(w, cache, timeout_s=timeout_s)


def _good_inputs(spec):
    gen = torch.Generator().manual_seed(9)
    return torch.randint(0, spec.vocab_size, (len(LENGTHS),), generator=gen).cuda(), torch.tensor(LENGTHS).cuda()


def _reference_step(w, spec, tok, pos, seed=3):
    """What a fresh decoder on a fresh cache gives for these inputs."""
    from monokernel.runtime.mega import MegaDecoder
    cache = prefilled(ReferenceModel(w), len(LENGTHS), MAX_SEQ, LENGTHS, torch.Generator().manual_seed(seed))[1]
    nxt, logits = MegaDecoder(w, cache).step(tok, pos)
    return nxt.clone(), logits.clone(), cache


BAD = [("token", 0, lambda v, s: v), ("token", 1, lambda v, s: -1), ("token", 2, lambda v, s: 2**32 + 1),
       ("position", 1, lambda v, s: s), ("position", 0, lambda v, s: -1), ("position", 2, lambda v, s: 2**31 + 5)]


@pytest.mark.parametrize("kind,seq,value", BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_bad_input_refused_by_the_kernel(kind, seq, value):
    """A token outside the vocabulary or a position outside the cache (also one that int32 truncation would make
    valid): the step raises InputError naming the sequence and the value, writes nothing (cache, logits and
    counters as they were), and the next good step gives what a fresh decoder gives."""
    spec, w, cache, mk = _setup()
    tok, pos = _good_inputs(spec)
    bad_tok, bad_pos = tok.clone(), pos.clone()
    v = value(spec.vocab_size, MAX_SEQ)
    (bad_tok if kind == "token" else bad_pos)[seq] = v
    k0, v0, ctr0 = cache.k.clone(), cache.v.clone(), mk.counters.clone()
    mk.logits.fill_(float("nan"))
    with pytest.raises(InputError, match=rf"sequence {seq} has {min(v, 2**31 - 1)}, outside the "
                                         rf"{'vocabulary' if kind == 'token' else 'KV cache'}"):
        mk.step(bad_tok, bad_pos)
    assert torch.equal(cache.k, k0) and torch.equal(cache.v, v0) and torch.equal(mk.counters, ctr0)
    assert torch.isnan(mk.logits).all()
    nxt, logits = mk.step(tok, pos)
    want_nxt, want_logits, want_cache = _reference_step(w, spec, tok, pos)
    assert torch.equal(nxt, want_nxt) and torch.equal(logits, want_logits) and torch.equal(cache.k, want_cache.k)


def test_bad_input_in_a_queue_of_steps():
    """Enqueued without a host check: the bad step and the steps queued behind it do nothing, check() raises
    once, and the decoder goes on from the last good step."""
    spec, w, cache, mk = _setup()
    tok, pos = _good_inputs(spec)
    mk.enqueue(tok, pos)                                   # step 1: good
    bad = tok.clone()
    bad[1] = spec.vocab_size + 7
    mk.enqueue(bad, pos + 1)                               # step 2: bad
    mk.enqueue(tok, pos + 2)                               # step 3: skipped behind it
    torch.cuda.synchronize()
    assert int(mk.status[0]) != 0
    with pytest.raises(InputError, match=f"step 2: .*sequence 1 has {spec.vocab_size + 7}"):
        mk.check()
    assert mk.epoch == 1
    nxt, logits = mk.step(tok, pos + 1)                     # what step 2 should have been
    from monokernel.runtime.mega import MegaDecoder
    c2 = prefilled(ReferenceModel(w), len(LENGTHS), MAX_SEQ, LENGTHS, torch.Generator().manual_seed(3))[1]
    fresh = MegaDecoder(w, c2)
    fresh.step(tok, pos)
    want_nxt, want_logits = fresh.step(tok, pos + 1)
    assert torch.equal(nxt, want_nxt) and torch.equal(logits, want_logits)


def _break_table(mk) -> torch.Tensor:
    """A wait no task will ever satisfy: the first task that waits now waits for far more signals."""
    saved = mk.tasks.clone()
    rec = mk.tasks.view(-1, TASK_WORDS)
    wc, wn = TASK_FIELDS.index("wait_counter"), TASK_FIELDS.index("wait_count")
    i = int(torch.nonzero(rec[:, wc] >= 0)[0])
    rec[i, wn] += 1000
    return saved


def test_timeout_raises_and_the_decoder_recovers():
    """A deliberately broken task table times out within the decoder's timeout (not forever) with
    KernelRuntimeError; with the table restored the decoder, reset, gives a fresh decoder's step."""
    spec, w, cache, mk = _setup(timeout_s=0.5)
    tok, pos = _good_inputs(spec)
    saved = _break_table(mk)
    t0 = time.perf_counter()
    with pytest.raises(KernelRuntimeError, match="waited too long.*decoder was reset"):
        mk.step(tok, pos)
    assert time.perf_counter() - t0 < 5
    mk.tasks.copy_(saved)
    nxt, logits = mk.step(tok, pos)
    want_nxt, want_logits, _ = _reference_step(w, spec, tok, pos)
    assert torch.equal(nxt, want_nxt) and torch.equal(logits, want_logits)


def test_engine_usable_after_a_failed_step():
    """The engine's decoder fails a step (broken table), the request raises, the next request gives the
    same text as before the failure (the scheduler resets onto a fresh decoder)."""
    from monokernel.runtime.engine import Engine
    spec = TINY_SPECS["qwen2"]
    eng = Engine.from_weights(random_weights(spec, torch.bfloat16, "cuda", seed=5), engine="mega", max_seq=128)
    before = eng.generate_ids([[1, 2, 3]], max_new_tokens=6)[0].token_ids
    mk = eng._scheduler.decoder
    assert eng._scheduler.kind == "mega"
    mk.params.timeout_ns = int(0.5e9)
    _break_table(mk)
    with pytest.raises(KernelRuntimeError, match="waited too long"):
        eng.generate_ids([[1, 2, 3]], max_new_tokens=6)
    assert eng.generate_ids([[1, 2, 3]], max_new_tokens=6)[0].token_ids == before


def test_grid_that_cannot_be_resident_fails_at_once(monkeypatch):
    """More blocks than the GPU holds at once (as under an MPS SM limit): the cooperative launch is refused at
    once with an error that says why, instead of spinning into the timeout; the process stays usable."""
    import dataclasses

    from monokernel.runtime import mega
    real = mega.gpu_info
    monkeypatch.setattr(mega, "gpu_info", lambda dev: dataclasses.replace(real(dev), sm_count=2 * real(dev).sm_count))
    spec, w, cache, mk = _setup(timeout_s=30.0)
    tok, pos = _good_inputs(spec)
    t0 = time.perf_counter()
    with pytest.raises(KernelRuntimeError, match="cannot all be resident"):
        mk.step(tok, pos)
    assert time.perf_counter() - t0 < 5
    monkeypatch.setattr(mega, "gpu_info", real)
    want_nxt, want_logits, _ = _reference_step(w, spec, tok, pos)
    assert torch.isfinite(want_logits).all()


def test_launch_from_another_stream():
    """Launched while a side stream is current, steps run on the decoder's own stream, ordered after the
    side stream's work (the inputs it wrote) and before its later work (reading the outputs)."""
    spec, w, cache, mk = _setup()
    tok, pos = _good_inputs(spec)
    want = []
    _, _, c_ref = _reference_step(w, spec, tok, pos)
    from monokernel.runtime.mega import MegaDecoder
    ref = MegaDecoder(w, c_ref)
    t, p = tok.clone(), pos.clone()
    for _ in range(3):
        t, logits = ref.step(t, p)
        want.append(logits.clone())
        p = p + 1
    side = torch.cuda.Stream()
    got = []
    with torch.cuda.stream(side):
        t, p = torch.empty_like(tok), torch.empty_like(pos)
        torch.cuda._sleep(50_000_000)                     # the inputs land late on the side stream
        t.copy_(tok)
        p.copy_(pos)
        for _ in range(3):
            nxt, logits = mk.enqueue(t, p)
            got.append(logits.clone())                   # on the side stream: after the step
            t, p = nxt.long().clone(), p + 1
        side.synchronize()
    mk.check()
    assert mk.stream != side
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_two_engines_of_two_models():
    """Two megakernel engines of two models in one process, used in turn, give what each gives alone."""
    from monokernel.runtime.engine import Engine
    engines = [Engine.from_weights(random_weights(TINY_SPECS[n], torch.bfloat16, "cuda", seed=i), engine="mega",
                                   max_seq=128) for i, n in enumerate(["llama", "qwen3"])]
    alone = [e.generate_ids([[5, 6, 7], [8, 9]], max_new_tokens=8) for e in engines]
    for _ in range(2):
        for e, want in zip(engines, alone):
            got = e.generate_ids([[5, 6, 7], [8, 9]], max_new_tokens=8)
            assert [g.token_ids for g in got] == [g.token_ids for g in want]
