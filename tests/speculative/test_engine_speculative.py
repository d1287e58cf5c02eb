"""Speculative decoding through the Engine and the CLI: the same text as plain greedy, the tokens per pass
reported, and what it cannot do refused by name before anything runs."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_SPECS
from monokernel.cli import main
from monokernel.errors import InputError
from monokernel.models.weights import random_weights
from monokernel.runtime.engine import Engine
from monokernel.speculative.run import check_speculative


def test_engine_equals_plain_greedy():
    spec = TINY_SPECS["qwen3"].with_(vocab_size=71)
    eng = Engine.from_weights(random_weights(spec, torch.float32, seed=4), max_seq=128)
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 9, 3, 1, 9, 9, 3]]
    plain = eng.generate_ids(prompts, max_new_tokens=24)
    spec_out = eng.generate_ids(prompts, max_new_tokens=24, speculative="ngram", draft_tokens=6)
    assert [g.token_ids for g in spec_out] == [g.token_ids for g in plain]
    assert [g.finish_reason for g in spec_out] == [g.finish_reason for g in plain]
    s = eng.last_speculative
    assert s.passes + len(prompts) <= 2 * 24 and s.new_tokens == 2 * 23
    events = list(eng.stream_ids(prompts[:1], max_new_tokens=10, speculative="ngram"))
    assert [e.token_id for e in events] == plain[0].token_ids[:10] and events[-1].finish_reason == "length"


@pytest.mark.parametrize("method, draft, kind, match", [
    ("beam", 4, "reference", "'beam' is not one of ngram, model:PATH"),
    ("model:", 4, "reference", "names no draft model"),
    ("ngram", 0, "reference", "draft_tokens=0 must be an integer in 1..16"),
    ("ngram", 8, "mega", "the megakernel verifies at most 7 draft tokens a pass"),
])
def test_refused(method, draft, kind, match):
    with pytest.raises(InputError, match=match):
        check_speculative(method, draft, kind)


def test_the_megakernel_takes_up_to_seven_draft_tokens():
    check_speculative("ngram", 7, "mega")
    check_speculative("ngram", 16, "reference")


def test_cli_prints_tokens_per_pass(capsys, tiny_preset):
    assert main(["generate", "--model", "preset:tiny", "--speculative", "ngram", "--draft-tokens", "3",
                 "--max-new-tokens", "12", "1 2 3 1 2 3 1 2"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 12 and "tokens per pass over" in err
    assert main(["generate", "--model", "preset:tiny", "--max-new-tokens", "12", "1 2 3 1 2 3 1 2"]) == 0
    assert capsys.readouterr().out == out
    assert main(["generate", "--model", "preset:tiny", "--speculative", "ngram", "--draft-tokens", "17",
                 "1 2"]) == 2
    assert "--draft-tokens 17 must be an integer in 1..16" in capsys.readouterr().err


def test_cli_draft_model_and_sampling(capsys, tiny_preset, monkeypatch):
    """--speculative model:PATH gives plain greedy's tokens; sampling with a seed repeats itself; a draft model
    of another vocabulary is refused with both sizes."""
    from monokernel.models.presets import PRESETS
    monkeypatch.setitem(PRESETS, "tiny-other", TINY_SPECS["llama"].with_(name="tiny-other", vocab_size=103))
    base = ["generate", "--model", "preset:tiny", "--max-new-tokens", "10", "1 2 3 1 2 3"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--speculative", "model:preset:tiny", "--draft-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "speculative model:preset:tiny" in err and "(100 %)" in err
    sampled = base + ["--speculative", "ngram", "--temperature", "0.8", "--seed", "3"]
    assert main(sampled) == 0 and main(sampled) == 0
    a, b = capsys.readouterr().out.splitlines()
    assert a == b and len(a.split()) == 10
    assert main(base + ["--speculative", "model:preset:tiny-other"]) == 2
    assert "vocabulary of 103 tokens but the target has 101" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
@pytest.mark.parametrize("flags, message", [
    (["--speculative", "beam"], "'beam' is not one of ngram, model:PATH"),
    (["--speculative", "model:"], "names no draft model"),
    (["--speculative", "ngram", "--draft-tokens", "0"], "--draft-tokens 0 must be an integer in 1..16"),
    (["--speculative", "model:/no/such/dir"], "model '/no/such/dir' not found"),
])
def test_cli_bad_speculative_flags(capsys, tiny_preset, monkeypatch, command, flags, message):
    """Refused in one line, before any weights load."""
    from monokernel.runtime.engine import Engine
    loads = []
    real = Engine.load
    monkeypatch.setattr(Engine, "load", lambda *a, **k: loads.append(1) or real(*a, **k))
    prompt = ["1 2 3"] if command == "generate" else []
    assert main([command, "--model", "preset:tiny", *flags, *prompt]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not loads
