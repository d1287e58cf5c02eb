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

top-k and top-p (`filtered_draw`): the same draw restricted to a kept set. Tokens are ranked by logit, equal
logits by the smaller index first (-0.0 ranks as 0.0); top-k keeps the first k ranks; top-p then keeps a token
unless the mass of the kept tokens ranked above it already reaches top_p, the mass renormalised over the top-k
set (over the whole vocabulary without top-k) and the first token always kept: runtime/sampling.probabilities'
rule. The token is argmax over the kept i of score_i, with the keys above. Masses are computed in float64 here
and in fp32 (with __expf) by the kernel, so a cut may differ where a token's mass before it lies within
`MASS_TOL` of top_p (tests count such near-ties as they count the score ones).

The kernel (templates/kernel/topk.cuh) keeps each LM-head tile's first TOP_CANDIDATES ranks and merges them:
the global first TOP_CANDIDATES ranks are always among them (a token in them ranks at least as high in its own
tile), so top-k with k <= TOP_CANDIDATES is exact, and so is top-p whose nucleus ends within those ranks. For
anything else (`kernel_cannot`: top_k > TOP_CANDIDATES, or a nucleus longer than that without top-k) the kernel
sets the row's Params::host_draw and the host draws it by this model from the logits the step returns.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from .errors import InputError

GOLDEN = 0x9E3779B97F4A7C15          # 2^64 / golden ratio: SplitMix64's counter increment
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
# uint32 words a sequence in Params::sampling: flags, 1/T bits, seed lo, seed hi, then top_k, top_p bits and two
# zero words: two 16-byte loads, the second only for a row that asks for top-k or top-p
SAMPLE_WORDS = 8
FLAG_SAMPLE = 1                      # bit 0 of the flags: sample (else greedy: today's argmax, bitwise)
FLAG_TOP_K = 2                       # bit 1: word 4 is top_k (one at least the vocabulary restricts nothing)
FLAG_TOP_P = 4                       # bit 2: word 5 is top_p as fp32 bits, in (0, 1)
TOP_CANDIDATES = 64                  # ranks an LM-head tile keeps for a top-k/top-p row (KC; a multiple of 32)
SCORE_TOL = 1e-5                     # |score| x this (at least 16 x this) bounds the kernel/model difference
MASS_TOL = 1e-4                      # a top-p cut whose mass before a token is this close to top_p may differ
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


def check_top_k(k, what: str = "top_k") -> int | None:
    """None (no top-k) or a positive integer."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, Integral) or k < 1):
        raise InputError(f"{what}={k!r} must be a positive integer, or None for no top-k")
    return None if k is None else int(k)


def check_top_p(p, what: str = "top_p") -> float | None:
    """None (no top-p) or a number in (0, 1]; 1 restricts nothing."""
    if p is not None and (isinstance(p, bool) or not isinstance(p, Real) or not 0 < p <= 1):
        raise InputError(f"{what}={p!r} must be a number in (0, 1], or None for no top-p")
    return None if p is None else float(p)


def sampling_words(temperatures, seeds, batch: int, top_ks=None, top_ps=None,
                   vocab_size: int | None = None) -> np.ndarray:
    """Params::sampling for `batch` sequences: (batch, SAMPLE_WORDS) uint32. temperature 0 is greedy (all
    words zero: the kernel's argmax of today, bitwise, whatever top_k/top_p say); seeds are integers, taken
    mod 2^64; top_ks / top_ps (None: none for any sequence) hold None or a positive integer / a number in
    (0, 1] per sequence; with vocab_size, a top_k of at least it is none (it restricts nothing, and the
    kernel would flag it for the host). Raises InputError naming the sequence for a negative, non-finite or non-numeric
    temperature, a non-integer seed, a top_k below 1 or not an integer, a top_p outside (0, 1] or not a
    number, or lists of the wrong length."""
    temperatures, seeds = list(temperatures), list(seeds)
    top_ks = [None] * batch if top_ks is None else list(top_ks)
    top_ps = [None] * batch if top_ps is None else list(top_ps)
    if len(temperatures) != batch or len(seeds) != batch:
        raise InputError(f"sampling needs a temperature and a seed per sequence: {batch} of each, got "
                         f"{len(temperatures)} temperatures and {len(seeds)} seeds")
    if len(top_ks) != batch or len(top_ps) != batch:
        raise InputError(f"top_ks and top_ps need an entry per sequence (None for none): {batch} of each, got "
                         f"{len(top_ks)} and {len(top_ps)}")
    words = np.zeros((batch, SAMPLE_WORDS), dtype=np.uint32)
    for b, (t, seed, k, p) in enumerate(zip(temperatures, seeds, top_ks, top_ps)):
        t = check_temperature(t, f"temperature of sequence {b}")
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise InputError(f"seed of sequence {b}={seed!r} must be an integer")
        k, p = check_top_k(k, f"top_k of sequence {b}"), check_top_p(p, f"top_p of sequence {b}")
        if k is not None and vocab_size is not None and k >= vocab_size:
            k = None
        if t == 0:
            continue
        s = int(seed) & _MASK
        flags = FLAG_SAMPLE | (FLAG_TOP_K if k is not None else 0) | (FLAG_TOP_P if p is not None and p < 1 else 0)
        words[b, :4] = (flags, np.float32(1.0 / t).view(np.uint32), s & 0xFFFFFFFF, s >> 32)
        if k is not None:
            words[b, 4] = min(k, 0x7FFFFFFF)     # int32 in the kernel; any k >= the vocabulary is none
        if flags & FLAG_TOP_P:
            words[b, 5] = np.float32(p).view(np.uint32)
    return words


def _words(words) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(words)).view(np.uint32).reshape(-1, SAMPLE_WORDS)


def unpack_words(words) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(on (B,) bool, inv_t (B,) fp32, seeds (B,) uint64) of Params::sampling words (B, 8), any 32-bit dtype."""
    w = _words(words)
    seeds = w[:, 2].astype(_U64) | (w[:, 3].astype(_U64) << _U64(32))
    return (w[:, 0] & FLAG_SAMPLE).astype(bool), w[:, 1].copy().view(np.float32), seeds


def unpack_flags(words) -> np.ndarray:
    """The flags word (B,) uint32 of each sequence."""
    return _words(words)[:, 0].copy()


def filtered_rows(words) -> np.ndarray:
    """(B,) bool: the rows the kernel samples through top-k/top-p candidates (a flag set, with sampling on)."""
    f = unpack_flags(words)
    return ((f & FLAG_SAMPLE) != 0) & ((f & (FLAG_TOP_K | FLAG_TOP_P)) != 0)


def unpack_filters(words, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(top_k (B,) int64, 0 where none or >= the vocabulary; top_p (B,) fp32, 1 where none) of the words,
    as the kernel reads them."""
    w = _words(words)
    k = np.where(w[:, 0] & FLAG_TOP_K, w[:, 4], 0).astype(np.int64)
    k[k >= vocab_size] = 0
    p = np.where(w[:, 0] & FLAG_TOP_P, w[:, 5], np.float32(1).view(np.uint32)).astype(np.uint32).view(np.float32)
    return k, p


def rank_order(row: np.ndarray) -> np.ndarray:
    """Vocabulary indices of a logits row by rank: logit descending, equal logits (-0.0 equal to 0.0) by the
    smaller index first (a stable sort)."""
    return np.argsort(-np.asarray(row, dtype=np.float32), kind="stable")


def ranked(row, top_k: int) -> np.ndarray:
    """The first top_k ranks of a logits row (every rank for top_k 0 or >= V), in rank order."""
    row = np.asarray(row, dtype=np.float32)
    k = len(row) if not top_k or top_k >= len(row) else int(top_k)
    if k == len(row):
        return rank_order(row)
    # only the order of the first k ranks matters: sort those and any tied with the k-th
    pool = np.flatnonzero(row >= row[np.argpartition(-row, k - 1)[:k]].min())
    return pool[rank_order(row[pool])][:k]


def nucleus(row, inv_t, top_k: int, top_p) -> tuple[np.ndarray, np.ndarray | None]:
    """The kept tokens of one logits row (V,) fp32 in rank order, and (top-p only, else None) the mass before
    each of the top-k ranks (all ranks without top-k) over their total, float64: a rank is kept while that
    mass is below top_p. top_k 0: none; top_p 1: none."""
    row = np.asarray(row, dtype=np.float32)
    order = ranked(row, top_k)
    if top_p >= 1:
        return order, None
    e = np.exp((row[order].astype(np.float64) - float(row[order[0]])) * float(np.float32(inv_t)))
    before = np.concatenate(([0.0], np.cumsum(e)[:-1])) / e.sum()
    return order[:int(np.count_nonzero(before < float(np.float32(top_p))))], before


def scores_at(logits, inv_t, key, idx) -> np.ndarray:
    """The perturbed scores fp32 of one sequence's logits at vocabulary indices idx (same length)."""
    h = mix64(_U64(key) + _U64(GOLDEN) * (np.asarray(idx, dtype=np.int64).astype(_U64) + _U64(1)))
    return np.asarray(logits, dtype=np.float32) * np.float32(inv_t) + gumbel(uniforms(h))


def filtered_draw(row, inv_t, key, top_k: int, top_p) -> int:
    """The draw of one row restricted by top-k / top-p (top_k 0 and top_p 1: none): argmax over the kept
    tokens of their scores, equal scores to the smallest index."""
    return _draw_among(row, inv_t, key, nucleus(row, inv_t, top_k, top_p)[0])


def _draw_among(row, inv_t, key, kept: np.ndarray) -> int:
    sc = scores_at(np.asarray(row, dtype=np.float32)[kept], inv_t, key, kept)
    return int(kept[sc == sc.max()].min())


def kernel_cannot(row, words_row) -> bool:
    """Whether the kernel flags this row for the host (Params::host_draw): a top_k above TOP_CANDIDATES
    (and below the vocabulary), or top-p without top-k whose nucleus runs past the first TOP_CANDIDATES
    ranks. Up to the top-p cut's near-ties (MASS_TOL), this is the kernel's flag."""
    row = np.asarray(row, dtype=np.float32)
    w = _words(words_row)
    if not w[0, 0] & FLAG_SAMPLE:
        return False
    (k,), (p,) = unpack_filters(w, len(row))
    if k:
        return bool(k > TOP_CANDIDATES)
    if len(row) <= TOP_CANDIDATES or not filtered_rows(w)[0]:
        return False
    if p >= 1:     # flags that restrict nothing (top_k >= V): the candidates cannot give the full draw
        return True
    return len(nucleus(row, unpack_words(w)[1][0], 0, p)[0]) > TOP_CANDIDATES


def sample_tokens(logits, words, positions) -> np.ndarray:
    """The kernel's next tokens for logits (B, V) fp32, Params::sampling words (B, 8) and the input positions
    (B,): per sequence the argmax of the raw logits (greedy), of the scores (temperature), or of the scores
    over the top-k / top-p kept tokens (`filtered_draw`); ties go to the smallest index, as in the kernel
    and torch.argmax. (B,) int64."""
    logits = np.asarray(logits, dtype=np.float32)
    on, inv_t, seeds = unpack_words(words)
    top_k, top_p = unpack_filters(words, logits.shape[1])
    filtered = filtered_rows(words)
    plain = on & ~filtered
    out = logits.argmax(axis=1)
    if on.any():
        keys = sequence_keys(seeds, np.asarray(positions))
        if plain.any():
            out[plain] = scores(logits[plain], inv_t[plain], keys[plain]).argmax(axis=1)
        for b in np.flatnonzero(filtered):
            out[b] = filtered_draw(logits[b], inv_t[b], keys[b], int(top_k[b]), top_p[b])
    return out.astype(np.int64)


def sample_one(logits, temperature: float, seed: int, position: int, top_k: int | None = None,
               top_p: float | None = None) -> int:
    """The token the kernel draws for one logits row (V,) at `position`: what the host uses where no kernel
    ran (the first token, from the prefill's logits) or where the kernel flagged the row (host_draw), so a
    request's whole stream follows one rule."""
    words = sampling_words([temperature], [seed], 1, [top_k], [top_p])
    return int(sample_tokens(np.asarray(logits, dtype=np.float32)[None], words, [position])[0])


def host_redraw(tokens, flags, logits, words, positions) -> np.ndarray:
    """The kernel's tokens (B,) with each row it flagged (Params::host_draw) drawn here by the model from the
    step's logits (B, V): what the host does after a step, so no row follows another distribution."""
    out = np.array(tokens, dtype=np.int64)
    rows = np.flatnonzero(np.asarray(flags))
    if len(rows):
        logits = np.asarray(logits, dtype=np.float32)
        w = _words(words)
        out[rows] = sample_tokens(logits[rows], w[rows], np.asarray(positions)[rows])
    return out


def may_draw(row, words_row, position: int, token: int) -> bool:
    """Whether the kernel may draw `token` for one row (V,) under its words (8,) at `position`: the model's
    draw, or one that a near-tie allows, as the kernel's logf and fp32 masses differ from the model's by
    ulps: a kept token whose score is within score_tol of the best, or a top-p cut whose mass before the
    token at the edge lies within MASS_TOL of top_p (the kept set then may end a rank earlier or later)."""
    row = np.asarray(row, dtype=np.float32)
    w = _words(words_row)[:1]
    want = int(sample_tokens(row[None], w, [position])[0])
    on, inv_t, seeds = unpack_words(w)
    if token == want or not on[0]:
        return token == want
    key = sequence_keys(seeds, [position])[0]
    if not filtered_rows(w)[0]:
        sets = [np.arange(len(row))]
    else:
        (k,), (p,) = unpack_filters(w, len(row))
        kept, before = nucleus(row, inv_t[0], int(k), p)
        sets, n = [kept], len(kept)
        if before is not None:
            order = ranked(row, int(k))
            if n > 1 and abs(before[n - 1] - p) <= MASS_TOL:
                sets.append(order[:n - 1])
            if n < len(order) and abs(before[n] - p) <= MASS_TOL:
                sets.append(order[:n + 1])
    for kept in sets:
        if token not in kept:
            continue
        sc = scores_at(row[kept], inv_t[0], key, kept)
        if sc[kept == token][0] >= sc.max() - score_tol(sc.max()):
            return True
    return False


def score_tol(top: float) -> float:
    """Scores of two candidates closer than this may be ordered either way by the kernel and this model."""
    return SCORE_TOL * max(abs(float(top)), 16.0)
