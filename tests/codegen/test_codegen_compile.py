"""The generated kernels render and compile for sm_90a with nvcc (no GPU needed) and never spill."""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest

from monokernel.cli import main
from monokernel.codegen import cli as compile_cli
from monokernel.codegen import fit
from monokernel.codegen.compile import CompiledKernel, compile_kernel
from monokernel.errors import CompileError, MonokernelError
from monokernel.models.presets import preset
from monokernel.schedule.plan import plan_for
from monokernel.schedule.registers import register_cap

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
@pytest.mark.parametrize("name, batch", [("llama-3.2-1b", 1), ("llama-3.1-8b", 3)])
def test_compile_reports_the_register_budget(name, batch, capsys):
    """`monokernel compile` reports registers against the cap of the block's warps (schedule/registers.py),
    with the headroom; the 8B preset at batch 3 spilled 132 bytes under 8 consumer warps, so its kernel is
    the one with 7."""
    r = _compile(f"preset:{name}", batch, capsys)
    plan = plan_for(preset(name), batch, 4096, consumer_warps=8 if batch == 1 else 7)
    assert r["spill_bytes"] == 0 and r["threads"] == plan.threads and r["plan"]["threads"] == plan.threads
    assert r["register_cap"] == register_cap(plan.threads) and r["headroom"] == r["register_cap"] - r["registers"] >= 0
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


def _no_nvcc_needed(monkeypatch):
    """The cache key names the nvcc version; these tests fail before nvcc would run."""
    monkeypatch.setattr("monokernel.codegen.compile.nvcc_version", lambda: "test")


def test_unusable_cache(tmp_path, monkeypatch, capsys):
    """A kernel cache that cannot be created is a CompileError naming MONOKERNEL_CACHE_DIR, one line at the
    CLI. (A path under a regular file: permission bits would not stop root, who runs CI.)"""
    _no_nvcc_needed(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MONOKERNEL_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(CompileError, match="set MONOKERNEL_CACHE_DIR to a writable directory"):
        compile_kernel("// any source", "sm_90a", name="k")
    assert main(["compile", "--model", "preset:llama-3.2-1b"]) == 2
    err = capsys.readouterr().err
    assert "MONOKERNEL_CACHE_DIR" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("arch, message", [("sm_80", "needs sm_90a \\(Hopper"), ("sm_90", "needs sm_90a"),
                                           ("banana", "'banana' is not a CUDA architecture name")])
def test_arch_refused(tmp_path, monkeypatch, capsys, arch, message):
    """A wrong --arch is refused before anything is written to the cache, in one line."""
    _no_nvcc_needed(monkeypatch)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MONOKERNEL_CACHE_DIR", str(cache))
    with pytest.raises(MonokernelError, match=message):
        compile_kernel("// any source", arch, name="k")
    assert main(["compile", "--model", "preset:llama-3.2-1b", "--arch", arch]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1
    assert not cache.exists()


def test_fail_on_spill_exits_1(monkeypatch, capsys):
    """--fail-on-spill exits 1 as its help says (2 is for bad arguments)."""
    spilling = CompiledKernel(cubin=b"", path=Path("kernel.cubin"), registers=168, spill_bytes=132, stack_bytes=136,
                              log="", cached=True)
    monkeypatch.setattr(fit, "compile_kernel", lambda *a, **k: spilling)
    assert "exit 1" in compile_cli_help()
    assert main(["compile", "--model", "preset:llama-3.2-1b", "--fail-on-spill"]) == 1
    # the rules' 8 consumer warps spilled, so the kernel was built again with 7 (255 registers): spilled too
    out, err = capsys.readouterr()
    assert "spills 132 bytes of registers (168 used of 255)" in err and "threads: 256" in out and "headroom: 0" in out
    assert main(["compile", "--model", "preset:llama-3.2-1b"]) == 0


def compile_cli_help() -> str:
    p = argparse.ArgumentParser()
    compile_cli.add_arguments(p)
    return p.format_help()
