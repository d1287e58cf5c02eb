"""The in-kernel temperature sampler, modelled in numpy: the kernel (templates/kernel/sampling.cuh) and the
simulator (schedule/simulate.py) draw the same tokens from the same logits, and the tests check both here.

Gumbel-max: token = argmax_i (logit_i * (1/T) + g_i) with g_i = -log(-log(u_i)) and u_i uniform in (0, 1) is
an exact draw from softmax(logits / T). It reuses the LM head's per-tile (max, index) reduction unchanged: each
tile takes its max over the perturbed scores, the final argmax over the tiles is the token, and no host round
trip is needed. The logits buffer keeps the raw logits, so log-probabilities stay those of the model.

The counter-based RNG is SplitMix64's output function (Steele, Lea, Flood 2014; the finaliser of Java's
SplittableRandom), chosen over Philox-4x32-10 because it is cheaper per logit (two 64-bit multiplies and
three xor-shifts, against Philox's ten rounds for four words) and its outputs on a stride-GOLDEN counter pass
BigCrush; one uniform a logit is all the sampler needs. A key per (seed, position) and a counter per
vocabulary index:

    s   = mix64(seed)                                   seed: 64 bits (the request's, reduced mod 2^64)
    key = mix64(s + GOLDEN * (position + 1))            position: of the input token whose logits these are
    h_i = mix64(key + GOLDEN * (i + 1))                 i: the vocabulary index
    u_i = float32((h_i >> 40) | 1) * 2^-24              an odd 24-bit integer: exact in fp32, u in (0, 1)
    g_i = -logf(-logf(u_i))
    score_i = logit_i * inv_t + g_i                     fp32, rounded after each operation (no FMA)
    inv_t = float32(1 / T)                              rounded once, on the host

All arithmetic is mod 2^64 on uint64. The sequence slot is deliberately not in the key: a request's tokens
depend on its seed, not on the slot it landed in, so a seeded request is reproducible alone or batched (two
requests with one seed and one prompt draw the same tokens, as the host sampler's seeded generators do).

What the integers and the fp32 multiply/add give is bitwise the kernel's. The two logs are not: CUDA's logf
is within 1 ulp, this model rounds the float64 log to fp32 (the correctly rounded logf, the same on every
CPU, unlike numpy's vectorised fp32 log). Scores may then differ by a few ulps, so a token can differ only
where two candidates' scores lie within `SCORE_TOL` of each other (tests count such near-ties).

Limits of 23 random bits a draw: u lies in [2^-24, 1 - 2^-24], so g lies in about [-2.8, 16.6]; a token whose
probability relative to the most likely one is below ~e^-19 (4e-9) is never drawn, and the tail of g is
discretised at that granularity. Sampling at that depth is noise either way.

top-k and top-p are not sampled in the kernel: they need a sort or a selection over the whole vocabulary. A
request that asks for them is sampled on the host (runtime/sampling.py); a pure temperature one in the kernel.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from .errors import InputError

GOLDEN = 0x9E3779B97F4A7C15          # 2^64 / golden ratio: SplitMix64's counter increment
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
SAMPLE_WORDS = 4                     # uint32 words a sequence in Params::sampling: flags, 1/T bits, seed lo, hi
FLAG_SAMPLE = 1                      # bit 0 of the flags: sample (else greedy: today's argmax, bitwise)
SCORE_TOL = 1e-5                     # |score| x this (at least 16 x this) bounds the kernel/model difference
_U64 = np.uint64
_MASK = (1 << 64) - 1
_FP32_MAX = float(np.finfo(np.float32).max)


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 (wrapping)."""
    z = np.asarray(z, dtype=_U64)
    z = (z ^ (z >> _U64(30))) * _U64(MIX1)
    z = (z ^ (z >> _U64(27))) * _U64(MIX2)
    return z ^ (z >> _U64(31))


def sequence_keys(seeds, positions) -> np.ndarray:
    """The key of each (seed, position): (B,) uint64."""
    s = mix64(np.asarray(seeds, dtype=_U64))
    pos = np.asarray(positions, dtype=np.int64).astype(_U64)
    return mix64(s + _U64(GOLDEN) * (pos + _U64(1)))


def hashes(keys, index0: int, n: int) -> np.ndarray:
    """h for vocabulary indices index0 .. index0 + n - 1 of each key: (B, n) uint64."""
    idx = np.arange(index0 + 1, index0 + n + 1, dtype=_U64)
    return mix64(np.asarray(keys, dtype=_U64)[:, None] + _U64(GOLDEN) * idx[None, :])


def uniforms(h: np.ndarray) -> np.ndarray:
    """u = ((h >> 40) | 1) * 2^-24, fp32: exact, in (0, 1)."""
    return ((h >> _U64(40)) | _U64(1)).astype(np.float32) * np.float32(2.0 ** -24)


def gumbel(u: np.ndarray) -> np.ndarray:
    """g = -logf(-logf(u)), each log correctly rounded to fp32 (float64 log, then rounded)."""
    inner = np.log(u.astype(np.float64)).astype(np.float32)
    return (-np.log(-inner.astype(np.float64))).astype(np.float32)


def scores(logits: np.ndarray, inv_t: np.ndarray, keys: np.ndarray, index0: int = 0) -> np.ndarray:
    """logits (B, n) fp32 of vocabulary indices index0.. -> the perturbed scores (B, n) fp32."""
    logits = np.asarray(logits, dtype=np.float32)
    g = gumbel(uniforms(hashes(keys, index0, logits.shape[1])))
    return logits * np.asarray(inv_t, dtype=np.float32)[:, None] + g   # fp32: rounded after each op


def check_temperature(t, what: str = "temperature") -> float:
    """A temperature the kernel can sample with: finite, >= 0, and 0 or large enough that fp32 1/T is finite."""
    if isinstance(t, bool) or not isinstance(t, Real) or not math.isfinite(t) or t < 0:
        raise InputError(f"{what}={t!r} must be a finite number >= 0 (0 = greedy)")
    if t and 1.0 / t > _FP32_MAX:
        raise InputError(f"{what}={t!r} is too small to sample with (1/T overflows fp32): use 0 for greedy")
    return float(t)


def sampling_words(temperatures, seeds, batch: int) -> np.ndarray:
    """Params::sampling for `batch` sequences: (batch, SAMPLE_WORDS) uint32. temperature 0 is greedy (all
    words zero: the kernel's argmax of today, bitwise); seeds are integers, taken mod 2^64. Raises InputError
    naming the sequence for a negative, non-finite or non-numeric temperature, a non-integer seed, or lists
    of the wrong length."""
    temperatures, seeds = list(temperatures), list(seeds)
    if len(temperatures) != batch or len(seeds) != batch:
        raise InputError(f"sampling needs a temperature and a seed per sequence: {batch} of each, got "
                         f"{len(temperatures)} temperatures and {len(seeds)} seeds")
    words = np.zeros((batch, SAMPLE_WORDS), dtype=np.uint32)
    for b, (t, seed) in enumerate(zip(temperatures, seeds)):
        t = check_temperature(t, f"temperature of sequence {b}")
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise InputError(f"seed of sequence {b}={seed!r} must be an integer")
        if t == 0:
            continue
        s = int(seed) & _MASK
        words[b] = (FLAG_SAMPLE, np.float32(1.0 / t).view(np.uint32), s & 0xFFFFFFFF, s >> 32)
    return words


def unpack_words(words) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(on (B,) bool, inv_t (B,) fp32, seeds (B,) uint64) of Params::sampling words (B, 4), any 32-bit dtype."""
    w = np.ascontiguousarray(np.asarray(words)).view(np.uint32).reshape(-1, SAMPLE_WORDS)
    seeds = w[:, 2].astype(_U64) | (w[:, 3].astype(_U64) << _U64(32))
    return (w[:, 0] & FLAG_SAMPLE).astype(bool), w[:, 1].copy().view(np.float32), seeds


def sample_tokens(logits, words, positions) -> np.ndarray:
    """The kernel's next tokens for logits (B, V) fp32, Params::sampling words (B, 4) and the input positions
    (B,): per sequence the argmax of the raw logits (greedy) or of the scores; ties go to the smallest index,
    as in the kernel and torch.argmax. (B,) int64."""
    logits = np.asarray(logits, dtype=np.float32)
    on, inv_t, seeds = unpack_words(words)
    out = logits.argmax(axis=1)
    if on.any():
        s = scores(logits[on], inv_t[on], sequence_keys(seeds[on], np.asarray(positions)[on]))
        out[on] = s.argmax(axis=1)
    return out.astype(np.int64)


def sample_one(logits, temperature: float, seed: int, position: int) -> int:
    """The token the kernel draws for one logits row (V,) at `position`: what the host uses where no kernel
    ran (the first token, from the prefill's logits) so a request's whole stream follows one rule."""
    words = sampling_words([temperature], [seed], 1)
    return int(sample_tokens(np.asarray(logits, dtype=np.float32)[None], words, [position])[0])


def score_tol(top: float) -> float:
    """Scores of two candidates closer than this may be ordered either way by the kernel and this model."""
    return SCORE_TOL * max(abs(float(top)), 16.0)
