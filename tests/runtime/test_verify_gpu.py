"""The megakernel's verify step (T consecutive positions of a sequence in one launch) against the reference
model's forward over (B, T), and greedy speculative generation through it (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel

from conftest import HALF_TOL, TINY_SPECS, near_tie_tol, needs_default_model, prefilled, rel_norm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# (sequences, tokens per sequence, overrides): T = 2..8, B x T <= 16, both attention walks and matrix paths
CASES = [(1, 2, {}), (1, 4, {}), (1, 8, {}), (2, 4, {}), (3, 5, {}), (2, 8, {}), (1, 5, {"attn_mma": 0}),
         (2, 8, {"attn_mma": 0}), (1, 3, {"gemv_mma": 0}), (1, 8, {"input_smem_budget": 0})]


def _rows(start: torch.Tensor, t: int) -> torch.Tensor:
    return (start[:, None] + torch.arange(t, device=start.device)[None, :]).reshape(-1)


@pytest.mark.parametrize("name", list(TINY_SPECS))
@pytest.mark.parametrize("seqs,t,overrides", CASES, ids=[f"{s}x{t}-{o}" for s, t, o in CASES])
def test_verify_matches_reference(name, seqs, t, overrides):
    """Every row's logits match the reference over (B, T) for three launches in a row (each reads the K/V the
    one before wrote), with junk in the cache past each sequence's keys, outputs poisoned before each launch;
    the greedy tokens are the logits' argmax and the accepted counts follow them."""
    from monokernel.runtime.mega import MegaDecoder

    spec = TINY_SPECS[name]
    gen = torch.Generator().manual_seed(seqs * 16 + t)
    w = random_weights(spec, torch.bfloat16, "cuda", seed=3 + t)
    ref = ReferenceModel(w)
    max_seq = 320
    lengths = [int(x) for x in torch.randint(1, max_seq - 4 * t, (seqs,), generator=gen)]
    lengths[0] = 1
    c_ref, c_mk = prefilled(ref, seqs, max_seq, lengths, gen)
    mk = MegaDecoder(w, c_mk, timeout_s=20.0, tokens_per_seq=t, min_kv_chunk=8, **overrides)
    start = torch.tensor(lengths, device="cuda")
    for step in range(3):
        tok = torch.randint(0, spec.vocab_size, (seqs, t), generator=gen).cuda()
        expect = ref.forward(tok, start, c_ref)                 # (S, T, V)
        if step == 2:       # sequence 0's draft is the target's own: all accepted (the reference re-run on it)
            tok[0, 1:] = expect[0, :-1].argmax(-1)
            expect = ref.forward(tok, start, c_ref)
        mk.logits.fill_(float("nan"))
        mk.out_tokens.fill_(-1)
        greedy, accepted, logits = mk.verify(tok, start)
        assert torch.isfinite(logits).all()
        assert rel_norm(logits, expect) < HALF_TOL, (name, seqs, t, step)
        assert torch.equal(greedy, logits.argmax(-1))
        same = (greedy[:, :-1] == tok[:, 1:]).int().cumprod(dim=1).sum(dim=1)
        assert torch.equal(accepted, same.long())
        for s in range(seqs):
            n = int(start[s]) + t
            assert rel_norm(c_mk.k[:, s, :, :n], c_ref.k[:, s, :, :n]) < HALF_TOL
        start = start + t


def test_verify_is_deterministic():
    """The same verify launch twice on the same cache gives bitwise the same logits."""
    from monokernel.runtime.mega import MegaDecoder
    from monokernel.runtime.kv_cache import KVCache

    spec = TINY_SPECS["qwen3"]
    w = random_weights(spec, torch.bfloat16, "cuda", seed=5)
    cache = KVCache(spec, 2, 256, torch.bfloat16, "cuda")
    cache.k.normal_()
    cache.v.normal_()
    mk = MegaDecoder(w, cache, timeout_s=20.0, tokens_per_seq=8, min_kv_chunk=8)
    tok = torch.randint(0, spec.vocab_size, (2, 8), device="cuda")
    start = torch.tensor([100, 37], device="cuda")
    first = mk.verify(tok, start)[2].clone()
    for _ in range(20):
        assert torch.equal(mk.verify(tok, start)[2], first)


def test_non_consecutive_positions_are_refused():
    """Rows of a sequence at positions that do not follow each other: the step does nothing, names the row, and
    the decoder runs on."""
    from monokernel.errors import InputError
    from monokernel.runtime.kv_cache import KVCache
    from monokernel.runtime.mega import MegaDecoder

    spec = TINY_SPECS["llama"]
    w = random_weights(spec, torch.bfloat16, "cuda", seed=5)
    cache = KVCache(spec, 1, 128, torch.bfloat16, "cuda")
    cache.k.normal_()
    mk = MegaDecoder(w, cache, timeout_s=20.0, tokens_per_seq=4)
    tok = torch.randint(0, spec.vocab_size, (4,), device="cuda")
    before = cache.k.clone()
    with pytest.raises(InputError, match="row 2 has position 13, not one past the row before"):
        mk.launch(tok, torch.tensor([10, 11, 13, 14], device="cuda"))
        mk.check()
    assert torch.equal(cache.k, before)
    greedy, accepted, logits = mk.verify(tok.view(1, 4), torch.tensor([10], device="cuda"))
    assert torch.isfinite(logits).all() and accepted.numel() == 1


@pytest.mark.parametrize("method", ["ngram", "model:default"])
def test_speculative_generation_on_the_megakernel(method):
    """Greedy generation with speculation on the megakernel engine (one verify launch a pass) gives the plain
    megakernel's greedy tokens, up to near-ties between the two kernels' roundings (checked on the reference's
    logits at the first difference), in fewer passes than tokens for a repetitive prompt."""
    needs_default_model()
    from monokernel.runtime.engine import Engine

    eng = Engine.load(None, device="cuda", dtype="bf16", engine="mega", max_seq=512)
    prompt = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,"
    plain = eng.generate([prompt], max_new_tokens=48)[0].token_ids
    spec = eng.generate([prompt], max_new_tokens=48, speculative=method, draft_tokens=7)[0].token_ids
    stats = eng.last_speculative
    assert stats.acceptance_length > 1.5, stats.summary()
    if spec != plain:
        i = next(i for i, (a, b) in enumerate(zip(spec, plain)) if a != b)
        ids = eng.encode_prompts([prompt], False)[0] + plain[:i]
        logits = eng.model.forward(torch.tensor([ids], device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda"),
                                   _cache(eng, len(ids)))[0, -1]
        top = float(logits.max())
        assert logits[spec[i]] >= top - near_tie_tol(top) and logits[plain[i]] >= top - near_tie_tol(top), i


def _cache(eng, n):
    from monokernel.runtime.kv_cache import KVCache
    return KVCache(eng.spec, 1, n, eng.dtype, eng.device)


@pytest.mark.parametrize("method", ["ngram", "model:preset:tiny-qwen3"])
def test_speculative_generation_on_random_weights(method, monkeypatch):
    """The same on a random-weight preset (what the device has): prompt lookup on a repetitive prompt, and a draft
    model (the same seeded preset: every draft right up to near-ties) decoding on its own megakernel. The text is
    the plain megakernel's up to near-ties, checked on the reference's logits at the first difference."""
    from monokernel.models.presets import PRESETS
    from monokernel.runtime.engine import Engine

    monkeypatch.setitem(PRESETS, "tiny-qwen3", TINY_SPECS["qwen3"])
    eng = Engine.load("preset:tiny-qwen3", device="cuda", dtype="bf16", engine="mega", max_seq=256)
    prompt = [5, 6, 7, 8, 9, 10] * 6
    plain = eng.generate_ids([prompt], max_new_tokens=40)[0].token_ids
    spec = eng.generate_ids([prompt], max_new_tokens=40, speculative=method, draft_tokens=7)[0].token_ids
    stats = eng.last_speculative
    if method.startswith("model:"):
        drafter = eng._drafters[method]
        assert drafter.mega is not None, drafter.notice
        assert stats.acceptance_length > 4, stats.summary()
    assert len(spec) == len(plain) == 40
    if spec != plain:
        i = next(i for i, (a, b) in enumerate(zip(spec, plain)) if a != b)
        ids = prompt + plain[:i]
        logits = eng.model.forward(torch.tensor([ids], device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda"),
                                   _cache(eng, len(ids)))[0, -1]
        top = float(logits.max())
        assert logits[spec[i]] >= top - near_tie_tol(top) and logits[plain[i]] >= top - near_tie_tol(top), i


def _first_difference_is_a_near_tie(eng, prompt, a, b, params=None):
    """Two token streams of one prompt agree, or at their first difference both tokens are within the near-tie
    tolerance of the top of the reference's logits (greedy) or of its Gumbel scores (sampled, by the kernel's
    keys: the scores move by the logits' rounding times 1/T)."""
    from monokernel import gumbel
    from monokernel.runtime.kv_cache import KVCache

    assert len(a) == len(b)
    if a == b:
        return
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    ids = list(prompt) + a[:i]
    cache = KVCache(eng.spec, 1, len(ids), eng.dtype, eng.device)
    logits = eng.model.forward(torch.tensor([ids], device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda"),
                               cache)[0, -1].float().cpu()
    tol = near_tie_tol(float(logits.max()))
    if params is not None and not params.greedy:
        inv_t = 1.0 / params.temperature
        key = gumbel.sequence_keys([params.seed], [len(ids) - 1])
        scores = torch.from_numpy(gumbel.scores(logits.numpy()[None], [inv_t], key)[0])
        if params.top_k is not None:           # only the kept ranks compete
            dropped = torch.ones_like(scores, dtype=torch.bool)
            dropped[logits.topk(params.top_k).indices] = False
            scores[dropped] = -float("inf")
        logits = scores
        tol = tol * inv_t + gumbel.score_tol(float(logits.max()))
    top = float(logits.max())
    assert logits[a[i]] >= top - tol and logits[b[i]] >= top - tol, (i, a[i], b[i])


@pytest.mark.parametrize("method", ["ngram", "model:preset:tiny-qwen3"])
def test_coupled_sampling_on_random_weights(method, monkeypatch):
    """A pure temperature request with speculation on the megakernel: every verify row drawn in the kernel by the
    request's seed (speculative/coupled.py), so the tokens are plain in-kernel sampling's up to near-ties of the
    two kernels' roundings, and a draft model drawing by the same keys on the same weights has nearly every draft
    accepted."""
    from monokernel.models.presets import PRESETS
    from monokernel.runtime.engine import Engine
    from monokernel.runtime.sampling import SamplingParams

    monkeypatch.setitem(PRESETS, "tiny-qwen3", TINY_SPECS["qwen3"])
    eng = Engine.load("preset:tiny-qwen3", device="cuda", dtype="bf16", engine="mega", max_seq=256)
    prompt = [5, 6, 7, 8, 9, 10] * 6
    params = SamplingParams(temperature=0.8, seed=77, max_new_tokens=40)
    plain = eng.generate_ids([prompt], params)[0].token_ids
    spec = eng.generate_ids([prompt], params, speculative=method, draft_tokens=7)[0].token_ids
    stats = eng.last_speculative
    if method.startswith("model:"):
        assert eng._drafters[method].mega is not None, eng._drafters[method].notice
        assert stats.acceptance_length > 3, stats.summary()
    assert plain != eng.generate_ids([prompt], max_new_tokens=40)[0].token_ids      # it did sample
    _first_difference_is_a_near_tie(eng, prompt, spec, plain, params)


def test_scheduler_speculation_on_the_megakernel(monkeypatch):
    """serve/chat's speculation (speculative/scheduled.py) on the real verify step: three slots, requests greedy,
    pure temperature and top-k (drawn in the kernel, coupled) arriving while others decode, one verify launch a
    step; every request gets plain scheduling's tokens up to near-ties (at the first difference: for the top-k
    one the scores of its kept tokens decide, which the unrestricted check bounds when both tokens are kept)."""
    from monokernel.models.presets import PRESETS
    from monokernel.runtime.engine import Engine
    from monokernel.runtime.sampling import SamplingParams
    from monokernel.runtime.scheduler import Scheduler
    from monokernel.speculative.run import Speculation
    from monokernel.speculative.scheduled import ScheduledSpeculation

    monkeypatch.setitem(PRESETS, "tiny-qwen3", TINY_SPECS["qwen3"])
    eng = Engine.load("preset:tiny-qwen3", device="cuda", dtype="bf16", engine="mega", max_seq=256)
    prompts = [[5, 6, 7, 8, 9, 10] * 5, [11, 12, 13] * 7, [40, 41, 42, 43] * 4, [7, 8] * 9]
    params = [SamplingParams(max_new_tokens=30), SamplingParams(temperature=0.9, seed=5, max_new_tokens=30),
              SamplingParams(temperature=0.7, seed=6, max_new_tokens=30),
              SamplingParams(temperature=0.8, top_k=20, seed=7, max_new_tokens=30)]

    def run(sched):
        ids, out, step = [], {}, 0
        while step < 3 or sched.has_work:
            if step in (0, 2):
                ids += [sched.add_request(p, q) for p, q in list(zip(prompts, params))[step:step + 2]]
            for ev in sched.step():
                assert ev.error is None, ev.error
                out.setdefault(ev.request_id, []).append(ev.token_id)
            step += 1
        return [out[i] for i in ids]

    plain = run(Scheduler(eng, 3))
    hook = ScheduledSpeculation(Speculation.create("ngram", 4, eng))
    sched = Scheduler(eng, 3, speculative=hook)
    assert sched.kind == "mega" and sched.samples_in_kernel
    spec = run(sched)
    assert hook.stats.passes < sum(map(len, spec)) and len(spec[3]) == 30
    for p, q, a, b in zip(prompts, params, spec, plain):
        _first_difference_is_a_near_tie(eng, p, a, b, q)
