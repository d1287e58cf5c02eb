"""Speculative sampling leaves the target's distribution as it is: chi-square tests of the first two tokens
after a fixed one, on a Markov chain whose next-token distribution is known exactly (cheap enough for
thousands of runs), with a draft model's q and with prompt lookup's point masses; the Engine's path seeded and
reproducible, and its second token distributed as the target's on a tiny model."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY
from monokernel.models.presets import PRESETS
from monokernel.runtime.engine import Engine
from monokernel.runtime.sampling import SamplingParams, probabilities
from monokernel.speculative import SpeculativeStats, sampled_accept, speculative_sampling

V = 5


def chi2_limit(df: int, z: float = 3.72) -> float:
    """The chi-square value exceeded with probability 1e-4 (z = 3.72), by Wilson and Hilferty's approximation."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """The statistic over the cells of non-zero probability, and its degrees of freedom; a count in a cell
    of probability zero fails at once."""
    n = counts.sum()
    assert counts[probs == 0].sum() == 0, "a token of probability 0 was drawn"
    live = probs > 0
    expected = n * probs[live]
    return float(((counts[live] - expected) ** 2 / expected).sum()), int(live.sum()) - 1


def chain(seed: int) -> torch.Tensor:
    """Logits (V, V) of a Markov chain: the next token's logits given the current one."""
    return 2 * torch.randn(V, V, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("drafter", ["model", "lookup", "self"])
def test_chain_distribution(drafter):
    """Tokens 2 and 3 (after a fixed first token) of 3000 seeded runs with 2-token drafts: their joint counts
    match p(a | first) p(b | a) of the target's top-k-restricted distribution (chi-square, p = 1e-4), whether
    the drafts come from another chain (q != p, zeros where p has mass and the reverse), are a fixed guess
    (point masses) or come from the target itself (every draft accepted)."""
    params = SamplingParams(temperature=0.9, top_k=4)
    target = chain(0)
    q_logits = target if drafter == "self" else chain(1)
    p = probabilities(target, params.temperature, params.top_k)
    q = probabilities(q_logits, 1.3, 3)           # the drafter's own distribution: any q is allowed
    if drafter == "self":
        q = p

    def verify(tokens, position):
        return target[tokens[0]][None]

    first, counts, stats = 2, torch.zeros(V, V), SpeculativeStats()
    for run in range(3000):
        gen = torch.Generator().manual_seed(run)
        if drafter == "lookup":
            def draft(ctx, k):
                return [(ctx[-1] + 1) % V, ctx[-1]][:k], None
        else:
            def draft(ctx, k, gen=gen):
                toks, rows, last = [], [], ctx[-1]
                for _ in range(k):
                    rows.append(q[last])
                    last = int(torch.multinomial(q[last], 1, generator=gen))
                    toks.append(last)
                return toks, torch.stack(rows)
        tokens = speculative_sampling(verify, draft, params, gen, [7, first], first, 1, 4, 64, 2, stats=stats)
        a, b = next(tokens), next(tokens)
        counts[a, b] += 1
    exact = p[first][:, None] * p
    value, df = chi2(counts.flatten(), exact.flatten())
    assert value < chi2_limit(df), (value, df)
    if drafter == "self":
        assert stats.accepted == stats.drafted
    else:
        assert 0 < stats.accepted < stats.drafted


def test_rejection_draws_from_the_residual():
    """A draft token the target gives probability 0 is always rejected; a draft of q == p always accepted."""
    params = SamplingParams(temperature=1.0, top_k=1)
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    accept = sampled_accept(params, torch.Generator().manual_seed(0))
    assert accept([2], None, logits) == [1]                       # point mass on 2, p(2) = 0: the argmax instead
    q = torch.tensor([[0.0, 0.0, 1.0]])
    assert accept([2], q, logits) == [1]
    q = torch.tensor([[0.0, 1.0, 0.0]])
    assert accept([1], q, logits) == [1, 0]                       # accepted, then the next from p


def test_engine_reproducible_and_distributed(tiny_preset, monkeypatch):
    """Engine sampling with speculative='ngram' or 'model:...': the same seed gives the same tokens; over
    seeds, the second token (a draft's, or the rule's after it) follows the target's marginal (exact from V + 1 forward passes)."""
    spec = TINY.with_(name="tiny8", vocab_size=8)
    monkeypatch.setitem(PRESETS, "tiny8", spec)
    monkeypatch.setitem(PRESETS, "tiny8-draft", spec.with_(name="tiny8-draft", num_layers=1))
    eng = Engine.load("preset:tiny8", engine="reference", max_seq=64)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=3)
    prompt = [[1, 2, 3, 1, 2]]
    for method in ("ngram", "model:preset:tiny8-draft"):
        runs = [eng.generate_ids(prompt, params, speculative=method, draft_tokens=3)[0].token_ids for _ in range(2)]
        assert runs[0] == runs[1] and len(runs[0]) == 6
    plain = eng.generate_ids(prompt, params)[0].token_ids
    spec_first = eng.generate_ids(prompt, params, speculative="ngram")[0].token_ids[0]
    assert spec_first == plain[0]                # the prefill's token is drawn as plain sampling draws it

    from monokernel.runtime.kv_cache import KVCache
    model = eng.model

    def dist(ids):
        cache = KVCache(spec, 1, 16, torch.float32, "cpu")
        logits = model.forward(torch.tensor([ids]), torch.tensor([0]), cache)[0, -1]
        return probabilities(logits[None], 1.0, None, 0.9)[0]

    p1 = dist(prompt[0])
    marginal = sum(p1[a] * dist(prompt[0] + [a]) for a in range(8))
    counts = torch.zeros(8)
    for seed in range(400):
        g = eng.generate_ids(prompt, params, seed=seed, max_new_tokens=3, speculative="model:preset:tiny8-draft",
                             draft_tokens=2)[0]
        counts[g.token_ids[1]] += 1
    value, df = chi2(counts, marginal)
    assert value < chi2_limit(df), (value, df, counts, marginal)
