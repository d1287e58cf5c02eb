"""The kernel's top-k / top-p sampling algorithm (templates/kernel/topk.cuh) in numpy, for the simulator: each
LM-head tile keeps its first TOP_CANDIDATES ranks as 64-bit rank keys (and, for top-p without top-k, its
sum of exp((logit - tile max) / T)); the final task merges the tiles' keys depth by depth, cuts top-k and
top-p with fp32 masses, and takes the Gumbel argmax over the kept candidates, or flags the row for the host.
gumbel.py holds the definition these must reproduce; this module follows the kernel's steps instead.
"""
from __future__ import annotations

import numpy as np

from .. import gumbel

KC = gumbel.TOP_CANDIDATES
_U64 = np.uint64


def rank_keys(logits: np.ndarray, index0: int) -> np.ndarray:
    """uint64 keys of logits at vocabulary indices index0..: larger ranks higher. The logit's order-preserving
    bits (-0.0 as 0.0) above the complemented index, so equal logits rank by the smaller index and no key is
    0 (the kernel's "none")."""
    v = np.asarray(logits, dtype=np.float32).copy()
    v[v == 0] = 0.0
    u = v.view(np.uint32)
    u = np.where(u & 0x80000000, ~u, u | 0x80000000).astype(_U64)
    idx = np.arange(index0, index0 + len(v), dtype=np.int64).astype(_U64)
    return (u << _U64(32)) | (_U64(0xFFFFFFFF) - idx)


def key_logits(keys: np.ndarray) -> np.ndarray:
    u = (np.asarray(keys, dtype=_U64) >> _U64(32)).astype(np.uint32)
    return np.where(u & 0x80000000, u & 0x7FFFFFFF, ~u).astype(np.uint32).view(np.float32)


def key_indices(keys: np.ndarray) -> np.ndarray:
    return (_U64(0xFFFFFFFF) - (np.asarray(keys, dtype=_U64) & _U64(0xFFFFFFFF))).astype(np.int64)


def tile_keep(logits: np.ndarray, index0: int) -> np.ndarray:
    """A tile's first KC rank keys, descending, 0 past its rows."""
    keys = np.sort(rank_keys(logits, index0))[::-1][:KC]
    return np.concatenate([keys, np.zeros(KC - len(keys), dtype=_U64)])


def tile_mass(logits: np.ndarray, inv_t: np.float32) -> np.float32:
    """Sum over the tile of exp((logit - its max) * inv_t), fp32 terms."""
    v = np.asarray(logits, dtype=np.float32)
    x = ((v - v.max()).astype(np.float32) * np.float32(inv_t)).astype(np.float32)
    return np.float32(np.exp(x.astype(np.float64)).astype(np.float32).sum(dtype=np.float32))


def merge_keys(cand: np.ndarray) -> np.ndarray:
    """The first KC keys of all tiles' (tiles, KC) lists, descending: depth by depth over the tiles, stopping at
    the first depth where no tile's key beats the KC-th kept so far (the lists descend, so no deeper key can).
    The kernel loads rounds of several depths before it pushes them and stops after a round whose last depth
    kept nothing; which keys are kept does not depend on that order, so the result is the same."""
    kept = np.zeros(0, dtype=_U64)
    for j in range(KC):
        thr = kept[KC - 1] if len(kept) >= KC else _U64(0)
        hits = cand[:, j][cand[:, j] > thr]
        if not len(hits):
            break
        kept = np.sort(np.concatenate([kept, hits]))[::-1][:KC]
    return kept


def final_draw(cand: np.ndarray, sums: np.ndarray | None, inv_t: np.float32, key, top_k: int, top_p: np.float32,
               vocab: int) -> tuple[int, bool]:
    """(token, host_draw) of one row from its tiles' keys (tiles, KC) and, for top-p alone, their masses
    (tiles,): the kernel's merge, cut and draw. top_k 0 and top_p 1: none."""
    keys = merge_keys(cand)
    logit, idx = key_logits(keys), key_indices(keys)
    inv_t = np.float32(inv_t)
    e = np.exp(((logit - logit[0]).astype(np.float32) * inv_t).astype(np.float64)).astype(np.float32)
    rank = np.arange(len(keys))
    if top_k:
        e[rank >= top_k] = 0
    before = np.concatenate([np.zeros(1, np.float32), np.cumsum(e, dtype=np.float32)[:-1]])
    total = np.float32(e.sum(dtype=np.float32))
    if top_k or top_p >= 1:
        z = total
    else:   # the whole vocabulary's normaliser from the tiles' sums, rescaled to the top logit
        tile_max = key_logits(cand[:, 0])
        scale = np.exp(((tile_max - logit[0]).astype(np.float32) * inv_t).astype(np.float64)).astype(np.float32)
        z = np.float32((sums * scale).astype(np.float32).sum(dtype=np.float32))
    kept = rank < top_k if top_k else np.ones(len(keys), dtype=bool)
    if top_p < 1:
        kept &= before < np.float32(top_p) * z
    # top_k > KC, a nucleus past the candidates, or flags that restrict nothing (top_k >= V): the host draws
    flag = bool(top_k > KC or (not top_k and vocab > KC and (top_p >= 1 or total < np.float32(top_p) * z)))
    sc = np.where(kept, gumbel.scores_at(logit, inv_t, key, idx), -np.inf)
    best = sc.max()
    return int(idx[sc == best].min()), flag
