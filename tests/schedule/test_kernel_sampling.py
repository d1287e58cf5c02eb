"""In-kernel temperature sampling (Gumbel-max, monokernel/gumbel.py): the numpy model's integers against an
independent big-integer one, the simulator's sampled tokens against the model, the distribution against
softmax(logits / T), greedy unchanged at temperature 0, and bad sampling inputs refused."""
from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch

from monokernel import gumbel
from monokernel.errors import InputError
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.schedule.build import build_schedule
from monokernel.schedule.inputs import GpuInfo
from monokernel.schedule.plan import plan_for
from monokernel.schedule.simulate import Simulator

from conftest import TINY_SPECS, prefilled

MAX_SEQ = 96
M64 = (1 << 64) - 1


# ---- an independent model of the integers: Python big ints, masked by hand -------------------------------
def _mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * gumbel.MIX1) & M64
    z = ((z ^ (z >> 27)) * gumbel.MIX2) & M64
    return z ^ (z >> 31)


def _key(seed: int, pos: int) -> int:
    return _mix((_mix(seed & M64) + gumbel.GOLDEN * (pos + 1)) & M64)


def _hash(key: int, i: int) -> int:
    return _mix((key + gumbel.GOLDEN * (i + 1)) & M64)


def test_splitmix64_known_answers():
    """mix64 is SplitMix64's output function: the generator seeded with 0 gives its published first outputs."""
    state = np.array([gumbel.GOLDEN * k & M64 for k in (1, 2, 3)], dtype=np.uint64)
    assert [int(x) for x in gumbel.mix64(state)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_hash_integers():
    """Keys, hashes and uniforms of the numpy model equal the big-integer model's, bitwise, for random seeds
    (over all of 64 bits and negative ones, taken mod 2^64), positions and vocabulary ranges."""
    rng = random.Random(1)
    seeds = [rng.getrandbits(64) for _ in range(5)] + [0, -1, -(2 ** 63), 2 ** 64 + 5]
    positions = [rng.randrange(0, 1 << 17) for _ in seeds]
    keys = gumbel.sequence_keys(np.array([s & M64 for s in seeds], dtype=np.uint64), positions)
    assert [int(k) for k in keys] == [_key(s, p) for s, p in zip(seeds, positions)]
    index0 = rng.randrange(0, 120000)
    h = gumbel.hashes(keys, index0, 300)
    assert [[int(x) for x in row] for row in h] == [[_hash(_key(s, p), index0 + j) for j in range(300)]
                                                   for s, p in zip(seeds, positions)]
    u = gumbel.uniforms(h)
    assert u.dtype == np.float32 and (u > 0).all() and (u < 1).all()
    assert all(float(x) == (((int(y) >> 40) | 1) / 2.0 ** 24) for x, y in zip(u.ravel(), h.ravel()))
    # the words the host hands the kernel carry the seed mod 2^64 and 1/T rounded once to fp32
    on, inv_t, s = gumbel.unpack_words(gumbel.sampling_words([0.7] * len(seeds), seeds, len(seeds)))
    assert on.all() and [int(x) for x in s] == [x & M64 for x in seeds] and (inv_t == np.float32(1 / 0.7)).all()


def test_kernel_header_constants():
    """sampling.cuh computes what the model specifies: its multipliers, counter increment and shifts are
    gumbel.py's (the integers are otherwise unreachable without a GPU)."""
    from monokernel.codegen.headers import read_kernel_file
    src = read_kernel_file("sampling.cuh")
    consts = {int(x, 16) for x in re.findall(r"0x([0-9A-Fa-f]{16})ull", src)}
    assert consts == {gumbel.GOLDEN, gumbel.MIX1, gumbel.MIX2}
    assert re.findall(r"z >> (\d+)", src) == ["30", "27", "31"]
    assert "(uint32_t)(h >> 40) | 1u" in src and "0x1p-24f" in src and "-logf(-logf(u))" in src
    assert "__fadd_rn(__fmul_rn(logit, s.inv_t), g)" in src
    assert "mix64(mix64(seed) + SM_GOLDEN * (uint64_t)(position + 1))" in src
    assert "mix64(s.key + SM_GOLDEN * (uint64_t)(idx + 1))" in src
    # the first 16 bytes of a sequence's words in one load (the top-k/top-p words follow, read only when flagged)
    assert gumbel.SAMPLE_WORDS % 4 == 0 and "reinterpret_cast<const uint4*>(words + SAMPLE_WORDS * b)" in src


def test_simulator_keys():
    """The simulator derives each sequence's (on, 1/T, key) from the words and positions as the big-integer
    model does."""
    _, sim, _, _, _, _ = _sim("llama", 4)
    seeds, positions = [3, -7, 2 ** 64 - 1, 99], torch.tensor([0, 5, 17, 90])
    on, inv_t, keys, _, _, filtered = sim._sampling(gumbel.sampling_words([0.5, 0, 2.0, 1.0], seeds, 4), positions)
    assert on.tolist() == [True, False, True, True] and not filtered.any()
    assert inv_t.tolist() == [2.0, 0.0, 0.5, 1.0]
    assert [int(k) for k in keys[on]] == [_key(s, int(p)) for s, p, o in zip(seeds, positions, on) if o]


def test_gumbel_values():
    """g = -log(-log(u)) to fp32 rounding over the whole range of u, including its extremes."""
    u = np.array([2.0 ** -24, 0.5 ** 10, 0.25, 0.5, 0.9, 1 - 2.0 ** -24], dtype=np.float32)
    g = gumbel.gumbel(u)
    exact = [-math.log(-math.log(float(x))) for x in u]
    assert g.dtype == np.float32 and np.allclose(g, exact, rtol=2e-7, atol=0)
    assert -2.9 < g.min() < -2.7 and 16.5 < g.max() < 16.7     # the range that bounds the deepest draw


# ---- the simulator -----------------------------------------------------------------------------------
def _sim(name: str, batch: int, blocks: int = 7, seed: int = 0):
    spec = TINY_SPECS[name]
    gen = torch.Generator().manual_seed(seed)
    w = random_weights(spec, torch.float32, seed=seed)
    ref = ReferenceModel(w)
    lengths = [int(x) for x in torch.randint(1, MAX_SEQ - 8, (batch,), generator=gen)]
    c_ref, c_sim = prefilled(ref, batch, MAX_SEQ, lengths, gen)
    sim = Simulator(build_schedule(plan_for(spec, batch, MAX_SEQ, gpu=GpuInfo(sm_count=blocks), min_kv_chunk=4)), w)
    tok = torch.randint(0, spec.vocab_size, (batch,), generator=gen)
    return ref, sim, c_ref, c_sim, tok, torch.tensor(lengths)


@pytest.mark.parametrize("name,batch,blocks", [("llama", 1, 7), ("qwen2", 5, 9), ("mistral", 16, 5)])
def test_simulator_samples_the_model(name, batch, blocks):
    """The simulated step's tokens are the numpy model's for its own logits, bitwise, over several steps with
    random temperatures and seeds (one sequence hot, one greedy every other step), feeding the sampled tokens
    on; the logits stay the raw ones (the reference's), so log-probabilities are unchanged by sampling."""
    ref, sim, c_ref, c_sim, tok, pos = _sim(name, batch, blocks, seed=batch)
    rng = random.Random(batch)
    differs = 0
    for step in range(4):
        temps = [rng.choice([0.3, 0.8, 1.0, 1.7, 25.0]) for _ in range(batch)]
        greedy = step // 2 % batch if step % 2 == 0 else None     # steps 0 and 2: one sequence greedy
        temps[(step + 1) % batch] = 50.0      # hot: nearly uniform, so the draw is seldom the argmax
        if greedy is not None:
            temps[greedy] = 0.0
        seeds = [rng.getrandbits(64) - (1 << 63) for _ in range(batch)]
        words = gumbel.sampling_words(temps, seeds, batch)
        out, logits = sim.step(tok, pos, c_sim, rng, sampling=torch.from_numpy(words.view(np.int32)))
        expect = ref.forward(tok[:, None], pos, c_ref)[:, 0]
        torch.testing.assert_close(logits, expect, rtol=1e-4, atol=1e-4)
        model = gumbel.sample_tokens(logits.numpy(), words, pos.numpy())
        assert out.tolist() == model.tolist(), step
        if greedy is not None:
            assert int(out[greedy]) == int(logits[greedy].argmax())
        for b in range(batch):
            assert model[b] == gumbel.sample_one(logits[b].numpy(), temps[b], seeds[b], int(pos[b]))
        differs += int((out != logits.argmax(-1)).sum())
        tok, pos = out, pos + 1
    assert differs > 0      # sampling is on: some draws are not the argmax


def test_temperature_zero_is_greedy():
    """Temperature 0 (all words zero, whatever the seed) gives exactly the greedy step: the same tokens and
    logits as a step without sampling words, the reference's argmax."""
    ref, sim, c_ref, c_sim, tok, pos = _sim("qwen3", 3)
    words = gumbel.sampling_words([0, 0.0, 0], [5, -3, 2 ** 70], 3)
    assert not words.any()
    _, sim2, _, c_sim2, _, _ = _sim("qwen3", 3)
    for _ in range(3):
        out, logits = sim.step(tok, pos, c_sim, random.Random(0), sampling=words)
        out2, logits2 = sim2.step(tok, pos, c_sim2, random.Random(1))
        expect = ref.forward(tok[:, None], pos, c_ref)[:, 0]
        assert torch.equal(out, out2) and torch.equal(logits, logits2) and torch.equal(out, expect.argmax(-1))
        tok, pos = out, pos + 1


def test_seed_and_position_decide():
    """One seed and position give one token wherever the sequence sits in the batch; another seed or the next
    position draws afresh (over many rows of flat logits, most tokens change)."""
    logits = np.zeros((64, 50), dtype=np.float32)
    base = gumbel.sample_tokens(logits, gumbel.sampling_words([1.0] * 64, range(64), 64), [7] * 64)
    flipped = gumbel.sample_tokens(logits, gumbel.sampling_words([1.0] * 64, range(63, -1, -1), 64), [7] * 64)
    assert base.tolist() == flipped[::-1].tolist()
    other_seed = gumbel.sample_tokens(logits, gumbel.sampling_words([1.0] * 64, range(64, 128), 64), [7] * 64)
    next_pos = gumbel.sample_tokens(logits, gumbel.sampling_words([1.0] * 64, range(64), 64), [8] * 64)
    assert (base != other_seed).sum() > 48 and (base != next_pos).sum() > 48


# ---- the distribution ---------------------------------------------------------------------------------
def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _draws(logits: np.ndarray, temperature: float, seeds, positions) -> np.ndarray:
    n = len(seeds)
    words = gumbel.sampling_words([temperature] * n, seeds, n)
    return gumbel.sample_tokens(np.broadcast_to(logits, (n, len(logits))), words, positions)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 2.5])
def test_follows_softmax(temperature):
    """Chi-square: the tokens drawn over 60 000 (seed, position) counters follow softmax(logits / T) on a
    small vocabulary (p > 1e-3), and the same counts reject the softmax at a temperature 25 % off
    (p < 1e-6), so the test can tell."""
    logits = np.array([1.5, 0.2, -0.7, 2.1, 0.0, -2.5, 1.1, 0.6], dtype=np.float32)
    rng = np.random.default_rng(7)
    n = 60_000
    seeds = [int(x) for x in rng.integers(0, 2 ** 63, n // 100)] * 100    # 600 streams, 100 positions each
    positions = np.repeat(np.arange(100), n // 100) * 37 + 3
    counts = np.bincount(_draws(logits, temperature, seeds, positions), minlength=len(logits))

    def softmax(t):
        e = np.exp((logits.astype(np.float64) - logits.max()) / t)
        return e / e.sum()

    assert _chi2_pvalue(counts, softmax(temperature)) > 1e-3
    assert _chi2_pvalue(counts, softmax(temperature * 1.25)) < 1e-6


def test_uniform_bits():
    """u over one stream of positions and over one row of vocabulary indices is uniform (chi-square over 64
    bins, p > 1e-3), and a shifted histogram is rejected."""
    keys = gumbel.sequence_keys(np.full(4000, 12345, dtype=np.uint64), np.arange(4000))
    u = gumbel.uniforms(gumbel.hashes(keys, 1000, 16)).ravel()
    counts = np.bincount((u * 64).astype(int), minlength=64)
    flat = np.full(64, 1 / 64)
    assert _chi2_pvalue(counts, flat) > 1e-3
    skew = np.linspace(0.9, 1.1, 64)
    assert _chi2_pvalue(counts, skew / skew.sum()) < 1e-6


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,message", [(-0.5, "must be a finite number >= 0"),
                                                 (float("nan"), "must be a finite number >= 0"),
                                                 (float("inf"), "must be a finite number >= 0"),
                                                 (-float("inf"), "must be a finite number >= 0"),
                                                 (True, "must be a finite number >= 0"),
                                                 ("0.7", "must be a finite number >= 0"),
                                                 (1e-40, "is too small to sample with")])
def test_bad_temperature_refused(temperature, message):
    """A negative, non-finite, non-numeric or underflowing temperature is refused, naming the sequence."""
    with pytest.raises(InputError, match=f"temperature of sequence 1={temperature!r} {message}"):
        gumbel.sampling_words([0.7, temperature], [1, 2], 2)


def test_bad_sampling_words_refused():
    """Non-integer seeds, lists of the wrong length, and words of the wrong shape handed to the simulator."""
    with pytest.raises(InputError, match="seed of sequence 0=1.5 must be an integer"):
        gumbel.sampling_words([0.7], [1.5], 1)
    with pytest.raises(InputError, match="2 of each, got 1 temperatures and 2 seeds"):
        gumbel.sampling_words([0.7], [1, 2], 2)
    _, sim, _, c_sim, tok, pos = _sim("llama", 2)
    with pytest.raises(InputError, match=r"sampling words of shape \(1, 8\): the batch needs \(2, 8\)"):
        sim.step(tok, pos, c_sim, random.Random(0), sampling=gumbel.sampling_words([1.0], [1], 1))
