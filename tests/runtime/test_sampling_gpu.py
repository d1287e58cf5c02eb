"""Temperature sampling inside the megakernel (Gumbel-max, monokernel/gumbel.py) on the GPU (skipped without
CUDA): the kernel's draws are the numpy model's for the logits the kernel returns, up to near-ties of the
perturbed scores (CUDA's logf and the model's correctly rounded one may differ by an ulp); deterministic for
a seed; greedy (temperature 0, or sampling never set) bitwise unchanged; the logits stay the raw ones."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from monokernel import gumbel
from monokernel.errors import InputError
from monokernel.models.presets import preset
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel

from conftest import TINY_SPECS, prefilled

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _decoder(weights, cache, **overrides):
    from monokernel.runtime.mega import MegaDecoder
    return MegaDecoder(weights, cache, timeout_s=20.0, **overrides)


def _setup(spec, batch: int, seed: int, max_seq: int = 320, room: int = 40):
    """Two decoders over identically prefilled caches (junk past each length, `room` positions left for the steps
    at least), and the first inputs."""
    w = random_weights(spec, torch.bfloat16, "cuda", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = [int(x) for x in torch.randint(1, max_seq - room, (batch,), generator=gen)]
    caches = prefilled(ReferenceModel(w), batch, max_seq, lengths, gen)
    tok = torch.randint(0, spec.vocab_size, (batch,), generator=gen).cuda()
    return w, [_decoder(w, c) for c in caches], tok, torch.tensor(lengths, device="cuda")


def assert_draws_up_to_near_ties(got: torch.Tensor, logits: torch.Tensor, words: np.ndarray, positions) -> int:
    """The kernel's tokens against gumbel.sample_tokens of the kernel's own logits: equal, except where the
    model's scores of the two tokens lie within gumbel.score_tol (then the kernel's is one of the tied ones).
    Returns the number of such near-ties."""
    logits = logits.float().cpu().numpy()
    pos = positions.cpu().numpy()
    want = gumbel.sample_tokens(logits, words, pos)
    on, inv_t, seeds = gumbel.unpack_words(words)
    keys = gumbel.sequence_keys(seeds, pos)
    ties = 0
    for b, (g, w) in enumerate(zip(got.tolist(), want.tolist())):
        if g == w:
            continue
        assert on[b], (b, g, w)        # a greedy row is the argmax, exactly
        sc = gumbel.scores(logits[b:b + 1], inv_t[b:b + 1], keys[b:b + 1])[0]
        assert sc[g] >= sc[w] - gumbel.score_tol(sc[w]), (b, g, w, float(sc[w] - sc[g]))
        ties += 1
    return ties


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 5])
def test_kernel_draws_the_model(name, batch):
    """Free-running over 12 steps with random temperatures and 64-bit seeds (one sequence hot every third step,
    one greedy every other step at batch 5): every token is the model's draw from the kernel's logits, up to
    near-ties (at most one)."""
    spec = TINY_SPECS[name]
    w, (mk, _), tok, pos = _setup(spec, batch, seed=batch)
    rng = random.Random(batch)
    ties, differs = 0, 0
    for step in range(12):
        temps = [rng.choice([0.4, 1.0, 2.0, 60.0]) for _ in range(batch)]
        if step % 3 == 0:
            temps[(step + 1) % batch] = 60.0    # hot: nearly uniform, so the draw is seldom the argmax
        if batch > 1 and step % 2 == 0:
            temps[step % batch] = 0.0
        seeds = [rng.getrandbits(64) for _ in range(batch)]
        mk.set_sampling(temps, seeds)
        words = gumbel.sampling_words(temps, seeds, batch)
        mk.logits.fill_(float("nan"))
        got, logits = mk.step(tok, pos)
        assert torch.isfinite(logits).all()
        ties += assert_draws_up_to_near_ties(got, logits, words, pos)
        differs += int((got != logits.argmax(-1)).sum())
        tok, pos = got.clone(), pos + 1
    assert ties <= 1 and differs > 0


def test_preset_vocabulary():
    """llama-3.2-1b (128 256 tokens split over every block's LM-head tiles, ~970 rows each) at batch 1 and 3:
    the draws are the model's up to near-ties, over 8 steps at temperature 1 and 0.7."""
    for batch in (1, 3):
        w, (mk, _), tok, pos = _setup(preset("llama-3.2-1b"), batch, seed=2, max_seq=256)
        ties = 0
        for step in range(8):
            temps, seeds = [1.0 if step % 2 else 0.7] * batch, [1000 * step + b for b in range(batch)]
            mk.set_sampling(temps, seeds)
            got, logits = mk.step(tok, pos)
            ties += assert_draws_up_to_near_ties(got, logits, gumbel.sampling_words(temps, seeds, batch), pos)
            tok, pos = got.clone(), pos + 1
        assert ties <= 1, (batch, ties)


def test_deterministic_for_a_seed():
    """Two decoders over the same caches draw bitwise the same tokens and logits for the same seeds over 200
    steps; another seed draws other tokens."""
    spec = TINY_SPECS["llama"]
    runs = []
    for seed_base in (7, 7, 8):
        _, (mk, _), tok, pos = _setup(spec, 3, seed=3, room=201)
        mk.set_sampling([1.0, 5.0, 60.0], [seed_base, seed_base + 1, -seed_base])
        toks, logit_sum = [], torch.zeros(3, spec.vocab_size, dtype=torch.float64, device="cuda")
        for _ in range(200):
            tok, logits = mk.step(tok, pos)
            tok = tok.clone()
            toks.append(tok)
            logit_sum += logits
            pos = pos + 1
        runs.append((torch.stack(toks), logit_sum))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_greedy_unchanged_and_logits_raw():
    """Temperature 0 gives exactly the tokens and logits of a decoder whose sampling was never set (the argmax
    of its logits), also after sampling was on; a sampling step's logits are bitwise the greedy step's."""
    spec = TINY_SPECS["qwen2"]
    _, (sampled, plain), tok, pos = _setup(spec, 4, seed=5)
    for step, temps in enumerate(([0, 0, 0, 0], [1.0, 0, 2.0, 0.5], [0, 0, 0, 0], [0.9, 0.9, 0.9, 0.9])):
        sampled.set_sampling(temps, [11, 12, 13, 14])
        got, logits = sampled.step(tok, pos)
        want, want_logits = plain.step(tok, pos)
        assert torch.equal(logits, want_logits), step
        assert torch.equal(want, want_logits.argmax(-1))
        greedy = torch.tensor([t == 0 for t in temps], device="cuda")
        assert torch.equal(got[greedy], want[greedy]), step
        if not any(temps):
            assert torch.equal(got, want), step
        tok, pos = want.clone(), pos + 1      # both decoders fed the same tokens: their caches stay equal


def test_bad_sampling_refused():
    """A negative or non-finite temperature, a non-integer seed or the wrong number of them raise InputError
    and change nothing: the next step is still greedy."""
    _, (mk, _), tok, pos = _setup(TINY_SPECS["llama"], 2, seed=9)
    for temps, seeds, match in (([-1.0, 1.0], [1, 2], "temperature of sequence 0=-1.0"),
                                ([1.0, float("nan")], [1, 2], "temperature of sequence 1=nan"),
                                ([1.0, float("inf")], [1, 2], "temperature of sequence 1=inf"),
                                ([1.0, 1.0], [1, 2.5], "seed of sequence 1=2.5"),
                                ([1.0], [1], "2 of each")):
        with pytest.raises(InputError, match=match):
            mk.set_sampling(temps, seeds)
    got, logits = mk.step(tok, pos)
    assert torch.equal(got, logits.argmax(-1))


def test_engine_samples_in_kernel():
    """The engine on the megakernel draws pure temperature requests in the kernel: reproducible for a seed,
    another seed differs, and the decoder's words carry the request's temperature."""
    from monokernel.runtime.engine import Engine
    w = random_weights(TINY_SPECS["llama"], torch.bfloat16, "cuda", seed=11)
    eng = Engine(w, engine="mega", max_seq=256)
    prompts = [[5, 9, 300, 2, 77], [1], [int(x) for x in torch.arange(3, 400, 13)]]
    run = lambda seed: [g.token_ids for g in eng.generate_ids(prompts, max_new_tokens=16, temperature=60.0, seed=seed)]
    first = run(3)
    assert eng._scheduler.samples_in_kernel and eng.last_stats.engine == "mega"
    on, inv_t, _ = gumbel.unpack_words(eng._scheduler.decoder._sampling_words)
    assert first == run(3) and first != run(4)
    assert inv_t[on].tolist() == [np.float32(1 / 60.0)] * int(on.sum())


# ---- top-k / top-p in the kernel (monokernel/schedule/candidates.py follows the kernel's steps) ----------
def _assert_filtered_draws(mk, got, logits, words, positions) -> tuple[int, int]:
    """The kernel's flags against gumbel.kernel_cannot (up to a top-p cut within MASS_TOL) and every token
    against the model on the kernel's own logits up to near-ties (gumbel.may_draw); flagged rows were redrawn
    by the decoder, so they are the model's exactly. Returns (near-ties, flagged rows)."""
    rows = logits.float().cpu().numpy()
    pos = positions.cpu().numpy()
    flags = mk.host_draw.cpu().numpy()
    assert mk.last_host_draws == np.flatnonzero(flags).tolist()
    want = gumbel.sample_tokens(rows, words, pos)
    ties = 0
    for b, g in enumerate(got.tolist()):
        if bool(flags[b]) != gumbel.kernel_cannot(rows[b], words[b]):
            (k,), (p,) = gumbel.unpack_filters(words[b], rows.shape[1])
            _, before = gumbel.nucleus(rows[b], gumbel.unpack_words(words[b])[1][0], 0, p)
            assert not k and abs(before[gumbel.TOP_CANDIDATES] - p) <= gumbel.MASS_TOL, b
        if flags[b]:
            assert g == want[b], b
        elif g != want[b]:
            assert gumbel.may_draw(rows[b], words[b], int(pos[b]), g), (b, g, int(want[b]))
            ties += 1
    return ties, int(flags.sum())


@pytest.mark.parametrize("mode", ["top-k", "top-p", "both"])
@pytest.mark.parametrize("name,batch", [("llama", 1), ("qwen2", 5), ("mistral", 16)])
def test_kernel_top_k_top_p_draws_the_model(name, batch, mode):
    """Free-running over 8 steps with random temperatures (0.1 to 60: the tiny models' logits spread over 1 to
    100), seeds and restrictions (one sequence greedy, one pure temperature every step at batch > 1): every
    token is the model's restricted draw from the kernel's logits up to near-ties (at most one), the kernel's
    flags are kernel_cannot's and its flagged rows are the model's draws."""
    spec = TINY_SPECS[name]
    w, (mk, _), tok, pos = _setup(spec, batch, seed=batch + 20)
    rng = random.Random(batch * 7 + len(mode))
    choose = {"top-k": lambda: (rng.choice([1, 3, 17, 64, 65]), None),
              "top-p": lambda: (None, rng.choice([0.2, 0.5, 0.9, 0.99])),
              "both": lambda: (rng.choice([2, 9, 40]), rng.choice([0.3, 0.8]))}[mode]
    ties, flagged, inside, over = 0, 0, 0, 0
    for step in range(8):
        temps = [rng.choice([0.1, 0.3, 1.0, 8.0, 60.0]) for _ in range(batch)]
        ks, ps = map(list, zip(*(choose() for _ in range(batch))))
        if batch > 1:
            temps[step % batch] = 0.0
            ks[(step + 1) % batch] = ps[(step + 1) % batch] = None
        seeds = [rng.getrandbits(64) for _ in range(batch)]
        mk.set_sampling(temps, seeds, ks, ps)
        words = gumbel.sampling_words(temps, seeds, batch, ks, ps, vocab_size=spec.vocab_size)
        mk.logits.fill_(float("nan"))
        got, logits = mk.step(tok, pos)
        assert torch.isfinite(logits).all()
        t, f = _assert_filtered_draws(mk, got, logits, words, pos)
        ties, flagged = ties + t, flagged + f
        inside += int(gumbel.filtered_rows(words).sum()) - f
        over += int((gumbel.unpack_filters(words, spec.vocab_size)[0] > gumbel.TOP_CANDIDATES).sum())
        tok, pos = got.clone(), pos + 1
    assert ties <= 1 and inside > 0 and flagged >= over, (ties, inside, flagged, over)


def test_preset_vocabulary_top_p():
    """llama-3.2-1b (128 256 tokens over 132 tiles of ~970 rows) at batch 3, 6 steps: top-p 0.9 at T = 0.7,
    top-k 40 with top-p 0.95, top-k 64; the draws are the model's up to near-ties (the random preset's flat
    logits put most top-p rows past the candidates: those must be flagged and redrawn)."""
    w, (mk, _), tok, pos = _setup(preset("llama-3.2-1b"), 3, seed=2, max_seq=256)
    ties = 0
    for step in range(6):
        temps, seeds = [0.7, 1.0, 1.3], [100 * step + b for b in range(3)]
        ks, ps = [None, 40, 64], [0.9, 0.95, None]
        mk.set_sampling(temps, seeds, ks, ps)
        got, logits = mk.step(tok, pos)
        ties += _assert_filtered_draws(mk, got, logits, gumbel.sampling_words(temps, seeds, 3, ks, ps), pos)[0]
        tok, pos = got.clone(), pos + 1
    assert ties <= 1


def test_top_of_the_vocabulary_in_one_lm_head_tile():
    """llama-3.2-1b's LM head rows 5000-5063 set to growing multiples of the row of the top token, so the 64 top
    tokens all lie in one of the 132 tiles (972 rows each, 4860-5831): the merge walks that tile's whole list,
    round after round, while every other tile stops giving keys after its first (perf note 38). top-k 64 and 50
    and top-p 0.5 draws, over several seeds, are the model's from the kernel's logits up to near-ties."""
    spec = preset("llama-3.2-1b")
    w, (probe, mk), tok, pos = _setup(spec, 1, seed=4, max_seq=128)
    tok.fill_(7)                       # not a row the test rewrites (the 1B preset ties its embedding to the head)
    _, logits = probe.step(tok, pos)
    top = int(logits[0].float().argmax())
    temp = float(logits[0].float().std())   # the scores' spread about 1: the 64 (3-3.1x the top logit) dominate
    assert float(logits[0, top]) > 0
    scale = torch.linspace(3.0, 3.1, 64, device="cuda", dtype=torch.float32)[:, None]   # near-equal draws
    w.lm_head[5000:5064] = (w.lm_head[top].float() * scale).to(w.lm_head.dtype)
    ties = 0
    for seed, (k, p) in enumerate([(64, None), (50, None), (None, 0.5), (64, 0.9)] * 2):
        mk.set_sampling([temp], [seed], [k], [p])
        got, logits = mk.step(tok, pos)
        assert set(logits[0].float().topk(64).indices.tolist()) == set(range(5000, 5064))
        words = gumbel.sampling_words([temp], [seed], 1, [k], [p])
        t, flagged = _assert_filtered_draws(mk, got, logits, words, pos)
        assert not flagged and 5000 <= int(got[0]) < 5064
        ties += t
    assert ties <= 1


def test_flat_nucleus_flagged_and_drawn_on_the_host():
    """Temperature 60 flattens the tiny model's logits: top_p = 0.99 needs far more than TOP_CANDIDATES tokens,
    so the kernel flags the row and the decoder's token is the model's full-vocabulary draw; top_k 65 is
    flagged too, top_k 64 is not."""
    spec = TINY_SPECS["llama"]
    _, (mk, _), tok, pos = _setup(spec, 3, seed=31)
    temps, seeds, ks, ps = [60.0] * 3, [5, 6, 7], [None, 65, 64], [0.99, None, None]
    mk.set_sampling(temps, seeds, ks, ps)
    got, logits = mk.step(tok, pos)
    assert mk.host_draw.tolist() == [1, 1, 0] and mk.last_host_draws == [0, 1]
    words = gumbel.sampling_words(temps, seeds, 3, ks, ps)
    want = gumbel.sample_tokens(logits.float().cpu().numpy(), words, pos.cpu().numpy())
    assert got.tolist()[:2] == want.tolist()[:2]
    assert gumbel.may_draw(logits[2].float().cpu().numpy(), words[2], int(pos[2]), int(got[2]))


def test_top_p_deterministic_for_a_seed():
    """Two decoders over the same caches draw bitwise the same top-k/top-p tokens for the same seeds over 40
    steps (flagged rows included); another seed draws other tokens."""
    spec = TINY_SPECS["qwen2"]
    runs = []
    for base in (7, 7, 8):
        _, (mk, _), tok, pos = _setup(spec, 3, seed=3, room=41)
        mk.set_sampling([0.5, 1.0, 30.0], [base, base + 1, -base], [None, 20, None], [0.8, 0.9, 0.99])
        toks = []
        for _ in range(40):
            tok, _ = mk.step(tok, pos)
            tok = tok.clone()
            toks.append(tok)
            pos = pos + 1
        runs.append(torch.stack(toks))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_verify_rows_top_p():
    """A verify step (2 sequences x 4 rows) with per-row top-k/top-p words: each row's token is the model's
    draw from the step's logits up to near-ties, and the accepted counts follow the returned tokens."""
    from monokernel.runtime.kv_cache import KVCache
    spec = TINY_SPECS["qwen2"]
    w = random_weights(spec, torch.bfloat16, "cuda", seed=41)
    cache = KVCache(spec, 2, 128, torch.bfloat16, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(41)
    cache.k.normal_(generator=gen)    # random keys and values below the start positions, never zeros
    cache.v.normal_(generator=gen)
    mk = _decoder(w, cache, tokens_per_seq=4)
    rng = random.Random(41)
    temps = [1.0, 0.0, 0.5, 0.3, 0.0, 1.0, 0.2, 30.0]
    ks, ps = [5, None, None, 30, None, 2, None, None], [None, None, 0.5, 0.9, None, None, 0.6, 0.99]
    seeds = [rng.getrandbits(64) for _ in range(8)]
    mk.set_sampling(temps, seeds, ks, ps)
    tokens = torch.randint(0, spec.vocab_size, (2, 4), generator=torch.Generator().manual_seed(41)).cuda()
    start = torch.tensor([10, 37], device="cuda")
    got, accepted, logits = mk.verify(tokens, start)
    positions = (start[:, None] + torch.arange(4, device="cuda")).reshape(-1)
    words = gumbel.sampling_words(temps, seeds, 8, ks, ps)
    _assert_filtered_draws(mk, got.reshape(-1), logits.reshape(8, -1), words, positions)
    same = got[:, :-1] == tokens[:, 1:]
    assert accepted.tolist() == same.int().cumprod(dim=1).sum(dim=1).tolist()


def test_scheduler_serves_top_p_in_kernel():
    """The Scheduler on the megakernel draws a top-p request (and a top-k one) in the kernel: reproducible for
    a seed, another seed differs, the decoder's words carry the request's top_p/top_k, and each token after
    the first is the model's draw from the logits of the whole sequence recomputed by the reference."""
    from monokernel.runtime.engine import Engine
    from monokernel.runtime.sampling import SamplingParams
    from monokernel.runtime.scheduler import Scheduler
    w = random_weights(TINY_SPECS["qwen2"], torch.bfloat16, "cuda", seed=12)
    eng = Engine(w, engine="mega", max_seq=256)
    prompts = [[5, 9, 300, 2, 77], [1], [int(x) for x in torch.arange(3, 400, 13)]]

    def run(seed, **extra):
        sched = Scheduler(eng, 3)
        gens = sched.generate(prompts, SamplingParams(temperature=0.8, seed=seed, max_new_tokens=12, **extra))
        return [g.token_ids for g in gens], sched

    first, sched = run(3, top_p=0.9)
    assert sched.samples_in_kernel
    k, p = gumbel.unpack_filters(sched.decoder._sampling_words, TINY_SPECS["qwen2"].vocab_size)
    on = gumbel.unpack_words(sched.decoder._sampling_words)[0]
    assert (p[on] == np.float32(0.9)).all() and not k.any()
    assert first == run(3, top_p=0.9)[0] and first != run(4, top_p=0.9)[0]
    assert run(3, top_k=7)[0] != first
    ref = ReferenceModel(w)
    from monokernel.runtime.kv_cache import KVCache
    for prompt, toks in zip(prompts, first):
        ids = prompt + toks
        cache = KVCache(TINY_SPECS["qwen2"], 1, len(ids), torch.bfloat16, "cuda")
        logits = ref.forward(torch.tensor([ids], device="cuda"), torch.zeros(1, dtype=torch.long, device="cuda"),
                             cache)[0].float().cpu().numpy()
        for j in range(1, len(toks)):     # the kernel's logits are bf16-computed: count near-ties loosely
            pos = len(prompt) + j - 1
            words = gumbel.sampling_words([0.8], [3], 1, [None], [0.9])
            assert toks[j] in gumbel.nucleus(logits[pos], np.float32(1 / 0.8), 0, np.float32(0.9))[0] or \
                gumbel.may_draw(logits[pos], words, pos, toks[j])
