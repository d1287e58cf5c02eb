"""The verify step (T consecutive positions of a sequence in one launch, speculative decoding) in the CPU
simulator, against the reference model's forward pass over (B, T)."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from monokernel.errors import InputError, UnsupportedModelError
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.schedule.build import build_schedule
from monokernel.schedule.inputs import GpuInfo
from monokernel.schedule.plan import plan_for
from monokernel.schedule.simulate import Simulator

from conftest import TINY_SPECS, prefilled

MAX_SEQ = 96
# (sequences, tokens per sequence): T = 1..8 and B x T <= 16
SHAPES = [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (2, 4), (3, 5), (2, 8)]


def _setup(name: str, seqs: int, t: int, seed: int = 0, min_kv_chunk: int = 4, kv_splits: int = 6, **knobs):
    spec = TINY_SPECS[name]
    gen = torch.Generator().manual_seed(seed)
    w = random_weights(spec, torch.float32, seed=seed)
    ref = ReferenceModel(w)
    lengths = [int(x) for x in torch.randint(1, MAX_SEQ - 2 * t, (seqs,), generator=gen)]
    c_ref, c_sim = prefilled(ref, seqs, MAX_SEQ, lengths, gen)
    plan = plan_for(spec, seqs * t, MAX_SEQ, gpu=GpuInfo(sm_count=7), min_kv_chunk=min_kv_chunk, kv_splits=kv_splits,
                    tokens_per_seq=t, **knobs)
    return ref, Simulator(build_schedule(plan), w), c_ref, c_sim, torch.tensor(lengths), gen


def _rows(start: torch.Tensor, t: int) -> torch.Tensor:
    """Each sequence's T consecutive positions from its start, as the verify step's rows."""
    return (start[:, None] + torch.arange(t)[None, :]).reshape(-1)


def _all_accepted(ref, tok: torch.Tensor, start: torch.Tensor, cache) -> None:
    """Sequence 0's draft (tokens 1..T-1) made the target's own greedy continuation, token by token."""
    for j in range(1, tok.shape[1]):
        tok[0, j] = ref.forward(tok, start, copy.deepcopy(cache))[0, j - 1].argmax()


@pytest.mark.parametrize("name", list(TINY_SPECS))
@pytest.mark.parametrize("seqs,t", SHAPES, ids=[f"{s}x{t}" for s, t in SHAPES])
def test_verify_matches_reference(name, seqs, t):
    """Logits of every row equal the reference's forward over (B, T), twice in a row (the second step reads the
    first one's K/V), with junk in the cache past each sequence's keys; the accepted counts follow the greedy
    tokens of the rows before (in the second step sequence 0's draft is all right)."""
    ref, sim, c_ref, c_sim, start, gen = _setup(name, seqs, t)
    V = sim.spec.vocab_size
    rng = random.Random(seqs * 10 + t)
    for step in range(2):
        tok = torch.randint(0, V, (seqs, t), generator=gen)
        if step == 1:
            _all_accepted(ref, tok, start, c_ref)
        out, logits = sim.step(tok.reshape(-1), _rows(start, t), c_sim, rng)
        expect = ref.forward(tok, start, c_ref)                      # (S, T, V)
        torch.testing.assert_close(logits, expect.reshape(seqs * t, V), rtol=1e-4, atol=1e-4)
        greedy = expect.argmax(-1)
        assert torch.equal(out[:seqs * t].view(seqs, t), greedy)
        assert out.numel() == seqs * t + (seqs if t > 1 else 0)
        if t > 1:
            same = (greedy[:, :-1] == tok[:, 1:]).int().cumprod(dim=1).sum(dim=1)
            assert out[seqs * t:].tolist() == same.tolist()
            assert step == 0 or out[seqs * t] == t - 1
        start = start + t
    for s in range(seqs):
        n = int(start[s])
        torch.testing.assert_close(c_sim.k[:, s, :, :n], c_ref.k[:, s, :, :n], rtol=1e-5, atol=1e-5)


def test_new_keys_straddle_splits():
    """The shapes above cut some sequence's new keys over two KV splits (6 splits of 4 keys at least)."""
    straddled = 0
    for seed in range(4):
        _, sim, _, _, start, _ = _setup("llama", 2, 8, seed=seed)
        for s in start.tolist():
            chunk = sim.plan.attn.kv_chunk(s + 8)
            straddled += s // chunk != (s + 7) // chunk
    assert straddled >= 2


@pytest.mark.parametrize("mutation", ["own-key-only", "no-earlier-rows"])
def test_a_broken_causal_dependency_is_caught(mutation, monkeypatch):
    """Row t of a sequence attends to the new keys of rows 0..t, each prepared from that row's QKV results:
    given its own row's key for every new position, or none of the earlier rows' keys, it must fail."""
    ref, sim, c_ref, c_sim, start, gen = _setup("qwen3", 1, 4)
    original = Simulator._new_kv
    if mutation == "own-key-only":
        def new_kv(self, buf, layer, row, kvh, pos):
            own = row + (self.vt - 1 - row % self.vt)          # the sequence's last row, whatever `row` is
            return original(self, buf, layer, own, kvh, pos)
        monkeypatch.setattr(Simulator, "_new_kv", new_kv)
    else:
        monkeypatch.setattr(Simulator, "_attention", _attention_without_earlier_rows(Simulator._attention))
    tok = torch.randint(0, sim.spec.vocab_size, (1, 4), generator=gen)
    _, logits = sim.step(tok.reshape(-1), _rows(start, 4), c_sim, random.Random(0))
    expect = ref.forward(tok, start, c_ref)[0]
    assert not torch.allclose(logits[1:], expect[1:], rtol=1e-3, atol=1e-3)


def _attention_without_earlier_rows(attention):
    def run(self, t, buf, positions, cache):
        vt = self.vt
        self.vt = 1            # each row its own sequence start: no earlier rows' keys, cache read up to pos
        try:
            return attention(self, t, buf, positions, _SeqView(cache, vt))
        finally:
            self.vt = vt
    return run


class _SeqView:
    """The cache seen with each row its own sequence (rows of one sequence map to the same slot)."""
    def __init__(self, cache, vt):
        self.k = _Rows(cache.k, vt)
        self.v = _Rows(cache.v, vt)


class _Rows:
    def __init__(self, t, vt):
        self.t, self.vt = t, vt

    def _key(self, idx):
        layer, row, *rest = idx
        return (layer, row // self.vt, *rest)

    def __getitem__(self, idx):
        return self.t[self._key(idx)]

    def __setitem__(self, idx, value):
        self.t[self._key(idx)] = value


def test_positions_not_consecutive_are_refused():
    """A sequence's verify rows must be consecutive positions: the step refuses others before any task runs."""
    _, sim, _, c_sim, start, gen = _setup("llama", 2, 3)
    tok = torch.randint(0, sim.spec.vocab_size, (6,), generator=gen)
    pos = _rows(start, 3)
    pos[4] += 1
    before = c_sim.k.clone()
    with pytest.raises(InputError, match=r"row 4 has position .* not one past the row before"):
        sim.step(tok, pos, c_sim, random.Random(0))
    assert torch.equal(c_sim.k, before)


@pytest.mark.parametrize("t,batch", [(0, 1), (9, 9), (3, 4), (2.0, 2)])
def test_bad_tokens_per_seq_is_refused(t, batch):
    with pytest.raises(UnsupportedModelError, match="tokens_per_seq"):
        plan_for(TINY_SPECS["llama"], batch, MAX_SEQ, tokens_per_seq=t)
