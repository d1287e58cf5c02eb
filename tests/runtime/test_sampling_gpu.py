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
