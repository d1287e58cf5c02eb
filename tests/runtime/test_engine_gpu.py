"""The engine on the megakernel: prefill through the reference forward into the shared KV cache, then one
launch per token, must give the reference engine's greedy tokens (skipped without CUDA)."""
from __future__ import annotations

import pytest
import torch

from monokernel.models.weights import random_weights
from monokernel.runtime.engine import Engine

from conftest import TINY_SPECS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# tied N(0, 1) embeddings as the LM head: well-separated logits, so bf16 rounding cannot flip a greedy token
SPEC = TINY_SPECS["llama"]
PROMPTS = [[5, 9, 300, 2, 77], [1], [int(x) for x in torch.arange(3, 400, 13)]]


@pytest.fixture(scope="module")
def weights():
    return random_weights(SPEC, torch.bfloat16, "cuda", seed=11)


def test_auto_picks_mega(weights):
    """engine="auto" picks mega and matches the reference."""
    mega = Engine(weights, engine="auto", max_seq=256)
    assert mega.engine == "mega", mega.notice
    ref = Engine(weights, engine="reference", max_seq=256)
    for prompts in (PROMPTS[:1], PROMPTS):
        got = mega.generate_ids(prompts, max_new_tokens=24)
        assert mega.last_stats.engine == "mega"
        want = ref.generate_ids(prompts, max_new_tokens=24)
        assert [g.token_ids for g in got] == [g.token_ids for g in want]


def test_seeded_sampling_mega(weights):
    """Seeded sampling on mega is reproducible."""
    mega = Engine(weights, engine="mega", max_seq=256)
    run = lambda: [g.token_ids for g in mega.generate_ids(PROMPTS, max_new_tokens=16, temperature=1.0, seed=3)]
    assert run() == run()


def test_too_large_batch_falls_back(weights, capsys):
    mega = Engine(weights, engine="auto", max_seq=64)
    gens = mega.generate_ids([[1, 2]] * 17, max_new_tokens=2)
    assert len(gens) == 17 and mega.last_stats.engine == "reference"
    assert "batch 17 runs on the reference engine" in capsys.readouterr().err


def test_unusable_cache_falls_back(weights, tmp_path, monkeypatch):
    """An unusable kernel cache is a notice under engine="auto" (naming MONOKERNEL_CACHE_DIR), an error under
    "mega", never an OSError."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MONOKERNEL_CACHE_DIR", str(blocker / "cache"))
    auto = Engine(weights, engine="auto", max_seq=256)
    assert auto.engine == "reference" and "MONOKERNEL_CACHE_DIR" in auto.notice
    assert len(auto.generate_ids(PROMPTS, max_new_tokens=4)) == 3
    from monokernel.errors import CompileError

    with pytest.raises(CompileError, match="MONOKERNEL_CACHE_DIR"):
        Engine(weights, engine="mega", max_seq=256)


def test_quantised_falls_back(tiny_preset):
    """A quantised model on the GPU: engine "auto" falls back to the reference engine, saying why, and runs;
    engine "mega" refuses with the same reason."""
    from monokernel.errors import UnsupportedModelError

    eng = Engine.load("preset:tiny", device="cuda", weights="fp8-g128", quiet=True)
    assert eng.engine == "reference" and "not in the megakernel yet" in eng.notice
    [g] = eng.generate_ids([[1, 2, 3]], max_new_tokens=4)
    assert len(g.token_ids) == 4
    with pytest.raises(UnsupportedModelError, match=r"quantised weights \(fp8-g128\) are not in the megakernel yet"):
        Engine.load("preset:tiny", device="cuda", engine="mega", weights="fp8-g128")
