"""Top-k / top-p sampling in the kernel (gumbel.py's model, schedule/candidates.py's steps, the simulator): the
model's draws follow runtime/sampling.probabilities, the candidate keys rank as the model does, the merge finds
the vocabulary's first TOP_CANDIDATES ranks wherever they lie, the simulated step draws the model's tokens (up
to near-ties) and flags exactly the rows the model says the kernel cannot draw, the host redraws those by the
full rule, and bad top_k / top_p are refused."""
from __future__ import annotations

import random
import re
import zlib

import numpy as np
import pytest
import torch

from monokernel import gumbel
from monokernel.codegen.headers import read_kernel_file
from monokernel.errors import InputError
from monokernel.runtime.sampling import SamplingParams, probabilities
from monokernel.schedule import candidates

from schedule.test_kernel_sampling import _chi2_pvalue, _sim

KC = gumbel.TOP_CANDIDATES


def _tiles(logits: np.ndarray, sizes) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Each tile's kept keys (tiles, KC), as the LM-head tasks write them, for tiles of these sizes."""
    bounds, r0 = [], 0
    for n in sizes:
        bounds.append((r0, min(n, len(logits) - r0)))
        r0 += n
    assert r0 >= len(logits)
    return np.stack([candidates.tile_keep(logits[a:a + n], a) for a, n in bounds]), bounds


def _final(logits, words_row, position, sizes):
    """candidates.final_draw of one row split into tiles of `sizes`: (token, host_draw)."""
    (on,), (inv_t,), (seed,) = gumbel.unpack_words(words_row)
    (k,), (p,) = gumbel.unpack_filters(words_row, len(logits))
    cand, bounds = _tiles(logits, sizes)
    sums = np.array([candidates.tile_mass(logits[a:a + n], inv_t) for a, n in bounds], dtype=np.float32)
    key = gumbel.sequence_keys([seed], [position])[0]
    return candidates.final_draw(cand, sums if not k and p < 1 else None, inv_t, key, int(k), p, len(logits))


def _sizes(rng: random.Random, vocab: int) -> list[int]:
    sizes = []
    while sum(sizes) < vocab:
        sizes.append(rng.choice([5, 40, KC, KC + 1, 150, 400]))
    return sizes


# ---- the model ---------------------------------------------------------------------------------------
def test_rank_keys_order_as_the_model():
    """Sorting the rank keys descending gives gumbel.rank_order (logit descending, equal logits and -0.0/0.0
    by the smaller index); the keys give back the logit and the index; no key is 0."""
    rng = np.random.default_rng(1)
    row = rng.choice(np.array([-3.5, -0.0, 0.0, 1.25, 7.0, -1e30, 2e-38], dtype=np.float32), 500)
    row[::7] = rng.normal(size=len(row[::7])).astype(np.float32)
    keys = candidates.rank_keys(row, 1000)
    assert (keys > 0).all()
    assert (1000 + gumbel.rank_order(row)).tolist() == candidates.key_indices(np.sort(keys)[::-1]).tolist()
    assert candidates.key_indices(keys).tolist() == list(range(1000, 1500))
    back = candidates.key_logits(keys)
    assert np.array_equal(back, np.where(row == 0, np.float32(0), row)) and not np.signbit(back[row == 0]).any()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 4, None), (0.8, None, 0.7), (1.5, 6, 0.8),
                                                     (0.5, None, 0.95)])
def test_follows_probabilities(temperature, top_k, top_p):
    """Chi-square: the model's draws over 24 000 (seed, position) counters follow
    runtime/sampling.probabilities(logits, T, k, p) on a small vocabulary (p > 1e-3), never land outside its
    support, and the same counts reject the distribution without the restriction (p < 1e-6)."""
    logits = np.array([1.5, 0.2, -0.7, 2.1, 0.0, -2.5, 1.1, 0.6, 1.1, -0.3], dtype=np.float32)
    n = 24_000
    rng = np.random.default_rng(11)
    seeds = [int(x) for x in rng.integers(0, 2 ** 63, n // 60)] * 60
    positions = np.repeat(np.arange(60), n // 60) * 53 + 1
    words = gumbel.sampling_words([temperature] * n, seeds, n, [top_k] * n, [top_p] * n)
    counts = np.bincount(gumbel.sample_tokens(np.broadcast_to(logits, (n, len(logits))), words, positions),
                         minlength=len(logits))
    probs = probabilities(torch.from_numpy(logits)[None], temperature, top_k, top_p)[0].double().numpy()
    support = probs > 0
    assert counts[~support].sum() == 0 and (~support).any()
    assert _chi2_pvalue(counts[support], probs[support] / probs[support].sum()) > 1e-3
    free = probabilities(torch.from_numpy(logits)[None], temperature)[0].double().numpy()
    assert _chi2_pvalue(counts, free) < 1e-6


def test_ties_rank_by_index():
    """Equal logits at the top-k edge: the smaller indices are kept, as probabilities' topk would do on ties
    in index order, and the draws never leave them."""
    row = np.array([0.5, 2.0, 2.0, -1.0, 2.0, 2.0, 0.0], dtype=np.float32)
    kept, _ = gumbel.nucleus(row, np.float32(1.0), 3, np.float32(1.0))
    assert kept.tolist() == [1, 2, 4]
    n = 600
    words = gumbel.sampling_words([1.0] * n, range(n), n, [3] * n)
    assert set(gumbel.sample_tokens(np.broadcast_to(row, (n, 7)), words, [5] * n).tolist()) == {1, 2, 4}


# ---- the kernel's steps --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["random", "clustered", "small-tiles"])
def test_merge_finds_the_first_ranks(layout):
    """The merge of the tiles' kept keys is the vocabulary's first KC ranks, in order: with the top tokens
    spread over the tiles, all in one tile (a sorted vocabulary), and with tiles smaller than KC."""
    rng = np.random.default_rng(3)
    V = 3001
    row = rng.normal(size=V).astype(np.float32)
    if layout == "clustered":
        row = np.sort(row)[::-1].copy()
    sizes = [7] * (V // 7 + 1) if layout == "small-tiles" else [1000, 1001, 1000]
    cand, _ = _tiles(row, sizes)
    merged = candidates.merge_keys(cand)
    assert candidates.key_indices(merged).tolist() == gumbel.rank_order(row)[:KC].tolist()


def test_final_draw_is_the_model():
    """The kernel's merge, cut and draw (candidates.final_draw) over random tilings, temperatures, top-k and
    top-p: each unflagged row's token is one the model may draw (at most 2 near-ties in 400 rows), and the
    flag is the model's kernel_cannot but at a top-p cut within MASS_TOL; both flagged and in-kernel top-p
    rows occur."""
    rng = random.Random(5)
    nrng = np.random.default_rng(5)
    seen, ties = {"flag": 0, "top-p in kernel": 0}, 0
    for trial in range(400):
        V = rng.choice([50, 300, 1000])
        row = (nrng.normal(size=V) * rng.choice([0.5, 3.0, 10.0])).astype(np.float32)
        k = rng.choice([None, None, 1, 5, KC, KC + 1, V - 1, V + 3])
        p = rng.choice([None, 0.2, 0.6, 0.9, 0.99]) if k is None or rng.random() < 0.5 else None
        if k is None and p is None:
            p = 0.5
        words = gumbel.sampling_words([rng.choice([0.3, 1.0, 2.0])], [rng.getrandbits(64)], 1, [k], [p])
        pos = rng.randrange(1000)
        token, flag = _final(row, words, pos, _sizes(rng, V))
        want = gumbel.kernel_cannot(row, words)
        if flag != want:
            (inv_t,) = gumbel.unpack_words(words)[1]
            _, before = gumbel.nucleus(row, inv_t, 0, np.float32(p))
            assert abs(before[KC] - np.float32(p)) <= gumbel.MASS_TOL, (trial, flag, want)
            continue
        seen["flag"] += flag
        if flag:
            continue
        seen["top-p in kernel"] += p is not None and (k is None or k >= V)
        if token != gumbel.sample_tokens(row[None], words, [pos])[0]:
            assert gumbel.may_draw(row, words, pos, token), trial
            ties += 1
    assert ties <= 2 and all(seen.values()), (ties, seen)


# ---- the simulator ----------------------------------------------------------------------------------
MODES = {"top-k": lambda r: (r.choice([1, 3, 17, KC, KC + 9]), None),
         "top-p": lambda r: (None, r.choice([0.2, 0.5, 0.9, 0.99])),
         "both": lambda r: (r.choice([2, 9, 40]), r.choice([0.3, 0.8]))}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name,batch,blocks", [("llama", 1, 7), ("qwen2", 3, 9), ("mistral", 16, 5)])
def test_simulator_draws_the_model(name, batch, blocks, mode):
    """The simulated step's tokens are the numpy model's for its own logits (up to one near-tie), and its
    host_draw flags the rows kernel_cannot names, over 3 steps with random temperatures (0.1 to 60: these
    random models' logits spread over 1 to 100 by model), seeds and restrictions, one sequence greedy and one
    pure temperature every step at batch > 1; some rows are drawn in the kernel, and with the flagged ones
    redrawn from the raw logits the tokens are the model's."""
    ref, sim, c_ref, c_sim, tok, pos = _sim(name, batch, blocks, seed=batch + 1)
    rng = random.Random(zlib.crc32(f"{name} {mode}".encode()))     # str hash() changes with each process
    ties, drawn = 0, 0
    for step in range(3):
        temps = [rng.choice([0.1, 0.3, 1.0, 8.0, 60.0]) for _ in range(batch)]
        ks, ps = zip(*(MODES[mode](rng) for _ in range(batch)))
        ks, ps = list(ks), list(ps)
        if batch > 1:
            temps[step % batch] = 0.0
            ks[(step + 1) % batch], ps[(step + 1) % batch] = None, None
        seeds = [rng.getrandbits(64) for _ in range(batch)]
        words = gumbel.sampling_words(temps, seeds, batch, ks, ps, vocab_size=sim.spec.vocab_size)
        out, logits = sim.step(tok, pos, c_sim, rng, sampling=words)
        torch.testing.assert_close(logits, ref.forward(tok[:, None], pos, c_ref)[:, 0], rtol=1e-4, atol=1e-4)
        want = gumbel.sample_tokens(logits.numpy(), words, pos.numpy())
        for b in range(batch):
            row, flagged = logits[b].numpy(), bool(sim.host_draw[b])
            assert flagged == gumbel.kernel_cannot(row, words[b]), (step, b)
            if not flagged and out[b] != want[b]:
                assert gumbel.may_draw(row, words[b], int(pos[b]), int(out[b])), (step, b)
                ties += 1
            drawn += not flagged and bool(gumbel.filtered_rows(words[b:b + 1])[0])
        tok = torch.from_numpy(gumbel.host_redraw(out[:batch].numpy(), sim.host_draw.numpy(), logits.numpy(),
                                                  words, pos.numpy()))
        assert tok.tolist() == want.tolist() or ties
        pos = pos + 1
    assert ties <= 1 and drawn > 0


def test_verify_rows_sample_with_their_words():
    """A verify step (2 sequences x 4 rows) samples each row by its own words, top-k and top-p rows among them:
    the tokens are the model's for the step's logits (with the rows it flags redrawn, and it flags those
    kernel_cannot names), and the accepted counts follow the step's own tokens."""
    from schedule.test_verify_simulator import _rows, _setup
    ref, sim, c_ref, c_sim, start, gen = _setup("qwen2", 2, 4, seed=2)
    tok = torch.randint(0, sim.spec.vocab_size, (2, 4), generator=gen)
    rng = random.Random(2)
    words = gumbel.sampling_words([1.0, 0.0, 0.5, 0.3, 0.0, 1.0, 0.2, 30.0], [rng.getrandbits(64) for _ in range(8)],
                                  8, [5, None, None, 30, None, 2, None, None], [None, None, 0.5, 0.9, None, None, 0.6, 0.99])
    out, logits = sim.step(tok.reshape(-1), _rows(start, 4), c_sim, rng, sampling=words)
    tok[0, 1] = out[0]            # a draft the step's draw accepts, for the same inputs once more
    out, logits = sim.step(tok.reshape(-1), _rows(start, 4), c_sim, rng, sampling=words)
    positions = _rows(start, 4).numpy()
    want = gumbel.sample_tokens(logits.numpy(), words, positions)
    flags = sim.host_draw.numpy()
    assert [bool(f) for f in flags] == [gumbel.kernel_cannot(logits[b].numpy(), words[b]) for b in range(8)]
    assert 0 < flags.sum() < 8
    assert gumbel.host_redraw(out[:8].numpy(), flags, logits.numpy(), words, positions).tolist() == want.tolist()
    same = out[:8].view(2, 4)[:, :-1] == tok[:, 1:]
    assert out[8:].tolist() == same.int().cumprod(dim=1).sum(dim=1).tolist() and out[8] >= 1


# ---- the fallback ------------------------------------------------------------------------------------
def test_flat_nucleus_is_flagged_and_drawn_on_the_host():
    """Flat logits with top_p = 0.99: the nucleus (~99 % of 2000 tokens) is far past KC, so the kernel's steps
    flag the row, and the host's redraw is the model's full-vocabulary rule: over many seeds most of its draws
    lie outside the first KC ranks, where the candidates could never reach."""
    rng = np.random.default_rng(8)
    row = rng.uniform(-0.01, 0.01, 2000).astype(np.float32)
    n, outside = 200, 0
    top = set(gumbel.rank_order(row)[:KC].tolist())
    for seed in range(n):
        words = gumbel.sampling_words([1.0], [seed], 1, [None], [0.99])
        token, flag = _final(row, words, 17, [300] * 7)
        assert flag and gumbel.kernel_cannot(row, words) and token in top
        host = gumbel.host_redraw([token], [1], row[None], words, [17])[0]
        kept, _ = gumbel.nucleus(row, np.float32(1.0), 0, np.float32(0.99))
        key = gumbel.sequence_keys(gumbel.unpack_words(words)[2], [17])[0]
        assert host == gumbel.filtered_draw(row, np.float32(1.0), key, 0, np.float32(0.99)) and host in kept
        outside += host not in top
    assert outside > n * 0.8


def test_simulator_flags_flat_rows():
    """In the simulator: temperature 60 on the tiny model's logits with top_p = 0.99 flags the row, and so does
    a top_k above KC; top_k = KC is drawn in the kernel."""
    _, sim, _, c_sim, tok, pos = _sim("llama", 3, 7, seed=4)
    words = gumbel.sampling_words([60.0] * 3, [1, 2, 3], 3, [None, KC + 1, KC], [0.99, None, None])
    out, logits = sim.step(tok, pos, c_sim, random.Random(0), sampling=words)
    assert sim.host_draw.tolist() == [1, 1, 0]
    want = gumbel.sample_tokens(logits.numpy(), words, pos.numpy())
    assert gumbel.host_redraw(out[:3].numpy(), sim.host_draw.numpy(), logits.numpy(), words,
                              pos.numpy()).tolist() == want.tolist()


# ---- bad input and the header -------------------------------------------------------------------------
@pytest.mark.parametrize("top_k,message", [(0, "top_k of sequence 1=0 must be a positive integer"),
                                           (-3, "top_k of sequence 1=-3 must be a positive integer"),
                                           (2.5, "top_k of sequence 1=2.5 must be a positive integer"),
                                           (True, "top_k of sequence 1=True must be a positive integer"),
                                           ("5", "top_k of sequence 1='5' must be a positive integer")])
def test_bad_top_k_refused(top_k, message):
    with pytest.raises(InputError, match=re.escape(message) + ", or None for no top-k"):
        gumbel.sampling_words([0.7, 0.7], [1, 2], 2, [None, top_k], None)
    with pytest.raises(InputError, match="top_k="):
        SamplingParams(temperature=0.7, top_k=top_k)


@pytest.mark.parametrize("top_p", [0, 0.0, 1.5, -0.2, float("nan"), float("inf"), "0.9", True])
def test_bad_top_p_refused(top_p):
    with pytest.raises(InputError, match=re.escape(f"top_p of sequence 0={top_p!r} must be a number in (0, 1], "
                                                   "or None for no top-p")):
        gumbel.sampling_words([0.7], [1], 1, None, [top_p])
    with pytest.raises(InputError, match="top_p="):
        SamplingParams(temperature=0.7, top_p=top_p)


def test_bad_filter_lists_refused():
    with pytest.raises(InputError, match="top_ks and top_ps need an entry per sequence .*: 2 of each, got 1 and 2"):
        gumbel.sampling_words([0.7, 0.7], [1, 2], 2, [3], [0.5, None])


def test_greedy_ignores_filters_and_vocab_normalises():
    """temperature 0 writes zero words whatever top_k/top_p say; a top_k of at least the vocabulary is none."""
    assert not gumbel.sampling_words([0.0], [9], 1, [5], [0.5]).any()
    w = gumbel.sampling_words([1.0, 1.0], [9, 9], 2, [100, 99], [None, 1.0], vocab_size=100)
    assert w[0, 0] == gumbel.FLAG_SAMPLE and w[1, 0] == gumbel.FLAG_SAMPLE | gumbel.FLAG_TOP_K and w[1, 4] == 99


def test_kernel_constants_generated():
    """The rendered header carries gumbel's words, flags and candidate count; topk.cuh builds the rank key as
    candidates.rank_keys does, and sorts and keeps as the emulation below does."""
    from monokernel.codegen.headers import read_kernel_file
    from monokernel.codegen.render import render_source
    from monokernel.schedule.inputs import GpuInfo
    from monokernel.schedule.plan import plan_for
    from conftest import TINY_SPECS
    src = render_source(plan_for(TINY_SPECS["llama"], 2, 64, gpu=GpuInfo(sm_count=7)))
    assert f"constexpr int SAMPLE_WORDS = {gumbel.SAMPLE_WORDS};" in src
    assert f"constexpr int TOP_CAND = {gumbel.TOP_CANDIDATES};" in src
    assert (f"FLAG_SAMPLE = {gumbel.FLAG_SAMPLE}u, FLAG_TOP_K = {gumbel.FLAG_TOP_K}u, "
            f"FLAG_TOP_P = {gumbel.FLAG_TOP_P}u;") in src
    topk = read_kernel_file("topk.cuh")
    assert "logit == 0.f ? 0.f : logit" in topk and "(u & 0x80000000u) ? ~u : (u | 0x80000000u)" in topk
    assert "(uint64_t)u << 32 | (uint32_t)~idx" in topk
    # what the lane-level emulation below transcribes: the network's directions and the keep's threshold
    assert "const bool desc = ((32 * s) & size) == 0;" in topk and "const bool take_max = lower == desc;" in topk
    assert "((lane + 32 * s) & size) == 0, lower = (lane & stride) == 0;" in topk
    assert "if (n + __popc(m) > KEEP_CAP)" in topk and "return __shfl_sync(0xffffffffu, k[KPL / 2 - 1], 31);" in topk
    assert "thr = shrink_keys(buf, n, lane);" in topk


# ---- lane-level emulation of topk.cuh's warp code ---------------------------------------------------------
def _warp_sort_desc(k: np.ndarray) -> np.ndarray:
    """warp_sort_desc as topk.cuh writes it, on k (N, 32): element lane + 32 * s in k[s, lane]."""
    k, n = k.copy(), k.shape[0]
    lane = np.arange(32)
    size = 2
    while size <= 32 * n:
        stride = size >> 1
        while stride > 0:
            if stride >= 32:
                ss = stride // 32
                for s in range(n):
                    if s & ss:
                        continue
                    desc = ((32 * s) & size) == 0
                    a, c = k[s].copy(), k[s | ss].copy()
                    sw = a < c if desc else a > c
                    k[s], k[s | ss] = np.where(sw, c, a), np.where(sw, a, c)
            else:
                for s in range(n):
                    o = k[s][lane ^ stride]
                    desc, lower = ((lane + 32 * s) & size) == 0, (lane & stride) == 0
                    k[s] = np.where(lower == desc, np.maximum(o, k[s]), np.minimum(o, k[s]))
            stride >>= 1
        size <<= 1
    return k


class _Keep:
    """Keep's push / shrink / sorted as topk.cuh writes them: a push is one key from each of the 32 lanes."""

    def __init__(self):
        self.cap = 2 * KC
        self.buf, self.n, self.thr = np.zeros(self.cap, dtype=np.uint64), 0, np.uint64(0)

    def sorted(self) -> np.ndarray:
        k = np.where(np.arange(self.cap) < self.n, self.buf, np.uint64(0)).reshape(self.cap // 32, 32)
        return _warp_sort_desc(k).reshape(-1)[:KC]

    def push(self, key: np.ndarray) -> bool:
        hit = key > self.thr
        if not hit.any():
            return False
        if self.n + hit.sum() > self.cap:       # shrink_keys
            self.buf[:KC] = self.sorted()
            self.thr, self.n = self.buf[KC - 1], KC
            hit = key > self.thr
        self.buf[self.n:self.n + hit.sum()] = key[hit]     # lane order: the ballot's prefix count
        self.n += int(hit.sum())
        return bool(hit.any())


def _keep(stream: np.ndarray) -> np.ndarray:
    """The keep over a stream of keys 32 at a time."""
    kp = _Keep()
    for key in np.pad(stream, (0, -len(stream) % 32)).reshape(-1, 32).astype(np.uint64):
        kp.push(key)
    return kp.sorted()


def test_warp_sort_network():
    """The bitonic network's pairing and directions (slots for strides >= 32, lanes below) sort 128 keys
    descending, duplicates and zeros included."""
    rng = np.random.default_rng(9)
    for trial in range(20):
        k = rng.integers(0, 50 if trial % 2 else 2 ** 62, (KC * 2 // 32, 32)).astype(np.uint64)
        assert _warp_sort_desc(k).reshape(-1).tolist() == sorted(k.reshape(-1).tolist(), reverse=True)


@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
def test_keep_buffer_is_the_first_ranks(order):
    """The warp's streaming keep (threshold, appends, shrinks to KC) gives a tile's first KC keys for 972
    random logits in any order, ascending (every key a hit, a shrink every 2 steps) included, and for a tile
    shorter than KC."""
    rng = np.random.default_rng(4)
    for rows in (972, 40):
        row = rng.normal(size=rows).astype(np.float32)
        row = {"random": row, "ascending": np.sort(row), "descending": np.sort(row)[::-1]}[order]
        keys = candidates.rank_keys(row, 3000)
        assert _keep(keys).tolist() == candidates.tile_keep(row, 3000).tolist()


# ---- the rounds of loads before pushes (perf note 38), a warp at a time -------------------------------------
# The tile keep's rounds of KEEP_LOADS logits a lane and the final merge's rounds of MERGE_DEPTHS ranks of
# MERGE_TILES tiles a lane, with its stop after a round whose last rank kept nothing, must keep exactly the first
# TOP_CAND keys candidates.py keeps: on random tilings, every top token in one tile, tiles shorter than TOP_CAND,
# more tiles than one round holds.
TOPK = read_kernel_file("topk.cuh")


def _constant(name: str) -> int:
    return int(re.search(rf"constexpr int {name} = (\d+);", TOPK).group(1))


KEEP_LOADS, MERGE_TILES, MERGE_DEPTHS = (_constant(n) for n in ("KEEP_LOADS", "MERGE_TILES", "MERGE_DEPTHS"))


def kernel_tile_keep(logits: np.ndarray, index0: int) -> list[int]:
    keys = candidates.rank_keys(logits, index0)
    rows, kp = len(keys), _Keep()
    for r0 in range(0, rows, 32 * KEEP_LOADS):
        for g in range(KEEP_LOADS):
            if r0 + 32 * g < rows:
                lanes = range(r0 + 32 * g, r0 + 32 * g + 32)
                kp.push(np.array([keys[r] if r < rows else 0 for r in lanes], dtype=np.uint64))
    return [int(k) for k in kp.sorted() if k]


def kernel_merge(cand: np.ndarray) -> tuple[list[int], int]:
    """The merge as final_filtered runs it; also the rounds of depths it took."""
    num_tiles, kp, rounds = len(cand), _Keep(), 0
    for j in range(0, KC, MERGE_DEPTHS):
        rounds += 1
        deeper = False
        for t0 in range(0, num_tiles, 32 * MERGE_TILES):
            for d in range(MERGE_DEPTHS):
                for u in range(MERGE_TILES):
                    if t0 + 32 * u >= num_tiles:
                        continue
                    tiles = range(t0 + 32 * u, t0 + 32 * u + 32)
                    kept = kp.push(np.array([cand[t, j + d] if t < num_tiles else 0 for t in tiles], np.uint64))
                    deeper |= kept and d == MERGE_DEPTHS - 1
        if not deeper:
            break
    return [int(k) for k in kp.sorted() if k], rounds


def tiled(logits: np.ndarray, tiles: int) -> np.ndarray:
    rows = -(-len(logits) // tiles)
    return np.stack([candidates.tile_keep(logits[t * rows:(t + 1) * rows], t * rows) for t in range(tiles)])


@pytest.mark.parametrize("rows", [1, 31, 32, 64, 65, 511, 512, 513, 972, 1152])
def test_tile_keep_rounds_keep_the_tiles_first_ranks(rows):
    rng = np.random.default_rng(rows)
    for logits in (rng.standard_normal(rows).astype(np.float32) * 3,
                   np.sort(rng.standard_normal(rows).astype(np.float32)),          # ascending: every push appends
                   np.round(rng.standard_normal(rows) * 2).astype(np.float32)):   # ties, broken by the index
        want = [int(k) for k in candidates.tile_keep(logits, 1000) if k]
        assert kernel_tile_keep(logits, 1000) == want


@pytest.mark.parametrize("tiles,vocab", [(132, 128256), (132, 151936), (7, 1000), (161, 49152), (400, 128256),
                                         (3, 120)])
def test_merge_rounds_keep_the_vocabularys_first_ranks(tiles, vocab):
    rng = np.random.default_rng(tiles)
    logits = rng.standard_normal(vocab).astype(np.float32) * 3
    cand = tiled(logits, tiles)
    got, rounds = kernel_merge(cand)
    assert got == [int(k) for k in candidates.merge_keys(cand) if k]
    if tiles >= 132:        # random logits over a block's tile each: 3-5 ranks deep (perf note 38)
        assert rounds <= -(-6 // MERGE_DEPTHS)


def test_merge_walks_deep_when_one_tile_holds_the_top():
    """Every one of the first KC ranks in one tile: the merge must walk all KC ranks of it, round after round,
    while every other tile stops giving keys after its first."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(128256).astype(np.float32)
    logits[5000:5000 + KC] = 10 + rng.random(KC).astype(np.float32)    # tile 5 of 132 (972 rows a tile)
    cand = tiled(logits, 132)
    got, rounds = kernel_merge(cand)
    assert got == [int(k) for k in candidates.merge_keys(cand)]
    assert sorted(candidates.key_indices(np.array(got, dtype=np.uint64))) == list(range(5000, 5000 + KC))
    assert rounds == KC // MERGE_DEPTHS


def test_merge_stop_rule_is_needed():
    """A stop after the first round, whatever it kept, loses ranks when the top sits in a few tiles: the test
    above would catch a stop rule that looked at the round's first rank instead of its last."""
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(128256).astype(np.float32)
    logits[972 * 7:972 * 7 + 20] = 8 + rng.random(20).astype(np.float32)
    cand = tiled(logits, 132)
    kp = _Keep()
    for d in range(MERGE_DEPTHS):   # one round only
        for u in range(MERGE_TILES):
            kp.push(np.array([cand[t, d] if t < 132 else 0 for t in range(32 * u, 32 * u + 32)], dtype=np.uint64))
    assert kp.sorted().tolist() != candidates.merge_keys(cand).tolist()
    assert kernel_merge(cand)[0] == [int(k) for k in candidates.merge_keys(cand)]
