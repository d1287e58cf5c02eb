"""The Scheduler's use of a decoder that samples in the kernel (the megakernel's set_sampling), on the CPU: a
stand-in decoder draws by the numpy model of the kernel's sampler (monokernel/gumbel.py) from the reference
logits. Sampled requests (top-k and top-p included) take the decoder's draw, with their seed; greedy ones the
argmax."""
from __future__ import annotations

import pytest
import torch

from monokernel import gumbel
from monokernel.errors import InputError
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.engine import Engine
from monokernel.runtime.kv_cache import KVCache
from monokernel.runtime.sampling import SamplingParams
from monokernel.runtime.scheduler import Scheduler

from conftest import ENGINE_SPEC as SPEC, mega_sampling_stand_in

PROMPTS = [[3, 17, 9, 44, 5, 21, 8], [30], [12, 7, 7, 58, 1, 2, 3, 4, 5, 6, 7, 8, 9]]


class KernelSampling:
    """A decoder with the megakernel's sampling interface: its step's tokens are gumbel.sample_tokens of the
    wrapped decoder's logits under the words set_sampling last wrote (checked as MegaDecoder checks them)."""

    samples_in_kernel = True

    def __init__(self, inner, batch: int):
        self.inner, self.words, self.calls = inner, gumbel.sampling_words([0] * batch, [0] * batch, batch), []
        self.status = None

    def set_sampling(self, temperatures, seeds, top_ks=None, top_ps=None):
        self.words = gumbel.sampling_words(temperatures, seeds, len(self.words), top_ks, top_ps)
        self.calls.append((list(temperatures), list(seeds), top_ks and list(top_ks), top_ps and list(top_ps)))

    def step(self, tokens, positions):
        _, logits = self.inner.step(tokens, positions)
        return torch.from_numpy(gumbel.sample_tokens(logits.numpy(), self.words, positions.numpy())), logits

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def engine():
    return Engine.from_weights(random_weights(SPEC, torch.float32, "cpu", seed=3))


def _run(engine, prompts, params, batch=3):
    made = []

    def wrap(d):
        made.append(KernelSampling(d, batch))
        return made[-1]

    sched = Scheduler(engine, batch, wrap_decoder=wrap)
    gens = sched.generate(prompts, params)
    return [g.token_ids for g in gens], made[-1]


def _by_recompute(weights, prompt, params):
    """The slow obvious way: the whole sequence through a fresh cache for every token, each drawn by the
    kernel's rule at the position of the token whose logits it reads."""
    model, ids = ReferenceModel(weights), list(prompt)
    for _ in range(params.max_new_tokens):
        cache = KVCache(SPEC, 1, len(ids), torch.float32, "cpu")
        logits = model.forward(torch.tensor([ids]), torch.zeros(1, dtype=torch.long), cache)[0, -1]
        ids.append(gumbel.sample_one(logits.numpy(), params.temperature, params.seed, len(ids) - 1, params.top_k,
                                     params.top_p))
    return ids[len(prompt):]


def test_pure_temperature_draws_in_the_kernel(engine):
    """A pure temperature request takes the decoder's draw (its first token by the same rule on the host):
    the tokens equal recomputing the sequence with the numpy model, alone or at any place in the batch, and
    the decoder was told the request's temperature and seed for its slot only."""
    params = SamplingParams(temperature=0.9, seed=21, max_new_tokens=10)
    got, dec = _run(engine, PROMPTS, params)
    for p, toks in zip(PROMPTS, got):
        assert toks == _by_recompute(engine.weights, p, params)
    assert _run(engine, PROMPTS[::-1], params)[0][::-1] == got
    assert _run(engine, [PROMPTS[1]], params, batch=1)[0] == [got[1]]
    assert all((t, s) in ((0.0, 0), (0.9, 21)) for temps, seeds, _, _ in dec.calls for t, s in zip(temps, seeds))
    assert any(temps == [0.9] * 3 and seeds == [21] * 3 for temps, seeds, _, _ in dec.calls)
    greedy = _run(engine, PROMPTS, SamplingParams(max_new_tokens=10))[0]
    assert got != greedy and _run(engine, PROMPTS, params)[0] == got
    assert _run(engine, PROMPTS, SamplingParams(temperature=0.9, seed=22, max_new_tokens=10))[0] != got


@pytest.mark.parametrize("extra", [dict(top_k=5), dict(top_p=0.8), dict(top_k=9, top_p=0.6)],
                         ids=["top-k", "top-p", "both"])
def test_top_k_top_p_draw_in_the_kernel(engine, extra):
    """top-k / top-p requests take the decoder's draw too: the tokens equal recomputing each sequence with the
    numpy model's restricted rule, the decoder was told the request's top_k / top_p for its slot, and the
    restriction changes the tokens (against the pure temperature stream of the same seed)."""
    params = SamplingParams(temperature=3.0, seed=21, max_new_tokens=8, **extra)
    got, dec = _run(engine, PROMPTS, params)
    for p, toks in zip(PROMPTS, got):
        assert toks == _by_recompute(engine.weights, p, params)
    k, tp = extra.get("top_k"), extra.get("top_p")
    assert any(ks == [k] * 3 and ps == [tp] * 3 for t, _, ks, ps in dec.calls if t == [3.0] * 3)
    assert got != _run(engine, PROMPTS, SamplingParams(temperature=3.0, seed=21, max_new_tokens=8))[0]


def test_in_kernel_rule():
    """Which params the kernel samples: every temperature > 0, with or without top-k / top-p; not greedy."""
    assert SamplingParams(temperature=0.5).in_kernel
    assert SamplingParams(temperature=0.5, top_k=61, top_p=1.0).in_kernel
    assert SamplingParams(temperature=0.5, top_k=3, top_p=0.5).in_kernel
    assert not SamplingParams().in_kernel
    assert not SamplingParams(top_k=3).in_kernel


@pytest.mark.parametrize("temperature", [-1.0, float("nan"), float("inf")])
def test_bad_temperature_never_reaches_the_decoder(temperature):
    """A bad temperature is refused when the request is made (SamplingParams), and by the words the decoder
    hands the kernel."""
    with pytest.raises(InputError, match="must be a finite number >= 0"):
        SamplingParams(temperature=temperature)
    with pytest.raises(InputError, match="temperature of sequence 0=.* must be a finite number >= 0"):
        KernelSampling(None, 1).set_sampling([temperature], [0])


def test_megadecoder_set_sampling_writes_the_words():
    """MegaDecoder.set_sampling on the CPU (no kernel: a stand-in holding what it reads): the words it copies are
    gumbel.sampling_words of its arguments, top-k/top-p included, for the plan's rows; an unchanged call copies
    nothing; a bad top_p raises and leaves the words. (Its arguments once went to sampling_words out of order,
    which only the GPU tests saw.)"""
    import numpy as np
    from monokernel.runtime.mega import MegaDecoder

    B, V = 3, 50
    fake = mega_sampling_stand_in(B, V)
    args = ([0.7, 0.0, 1.3], [5, 6, 7], [None, 3, 10], [0.9, None, None])
    MegaDecoder.set_sampling(fake, *args)
    want = gumbel.sampling_words(args[0], args[1], B, args[2], args[3], vocab_size=V)
    assert np.array_equal(fake.sampling.numpy().view(np.uint32), want) and fake.sampling.abs().sum() > 0
    fake.sampling.zero_()
    MegaDecoder.set_sampling(fake, *args)                 # unchanged: nothing copied again
    assert fake.sampling.abs().sum() == 0
    with pytest.raises(InputError, match="top_p"):
        MegaDecoder.set_sampling(fake, [0.7] * 3, [1] * 3, None, [1.5, None, None])
    assert np.array_equal(fake._sampling_words, want)
