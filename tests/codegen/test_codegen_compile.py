"""The generated kernels render and compile for sm_90a with nvcc (no GPU needed) and never spill."""
from __future__ import annotations

import argparse
import json
import shutil

import pytest

from monokernel.codegen import cli as compile_cli
from monokernel.codegen.compile import compile_kernel
from monokernel.errors import CompileError
from monokernel.models.presets import preset
from monokernel.schedule.plan import plan_for

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MONOKERNEL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernel-cache"))


def _compile(model: str, batch: int, capsys) -> dict:
    p = argparse.ArgumentParser()
    compile_cli.add_arguments(p)
    assert compile_cli.run(p.parse_args(["--model", model, "--batch", str(batch), "--json", "--fail-on-spill"])) == 0
    return json.loads(capsys.readouterr().out)


@needs_nvcc
@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"])
@pytest.mark.parametrize("batch", [1, 8, 16])
def test_presets_compile_without_spills(name, batch, capsys):
    r = _compile(f"preset:{name}", batch, capsys)
    assert r["spill_bytes"] == 0 and r["stack_bytes"] <= 64
    assert 0 < r["registers"] <= 65536 // plan_for(preset(name), batch, 4096).threads
    assert r["plan"]["smem"]["total"] <= 227 * 1024


@needs_nvcc
def test_cache_hit_and_error_log(capsys):
    """A cache hit, and a compile error that carries the log."""
    first = _compile("preset:llama-3.2-1b", 1, capsys)
    again = _compile("preset:llama-3.2-1b", 1, capsys)
    assert again["cached"] and again["cubin"] == first["cubin"]
    with pytest.raises(CompileError) as e:
        compile_kernel("this is not CUDA;", "sm_90a", name="broken")
    assert "error" in e.value.log and "nvcc failed" in str(e.value)


def test_emit_source(capsys):
    """--emit-source shows the generated constants."""
    p = argparse.ArgumentParser()
    compile_cli.add_arguments(p)
    compile_cli.run(p.parse_args(["--model", "preset:llama-3.1-8b", "--emit-source"]))
    src = capsys.readouterr().out
    assert "constexpr int H = 4096;" in src and "constexpr int ISIZE = 14336;" in src
    assert "monokernel_decode_step" in src and "OP_LMHEAD = 6" in src
