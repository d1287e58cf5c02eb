"""fit_kernel never hands back a spilling kernel: it rebuilds with the whole register budget where the
rules chose the warps, and refuses with the numbers where that does not help."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_SPECS
from monokernel.codegen import fit
from monokernel.codegen.compile import CompiledKernel
from monokernel.errors import UnsupportedModelError
from monokernel.schedule.inputs import KernelInputs
from monokernel.schedule.tuning import Tuning


def _fake_compiler(monkeypatch, spills_by_threads: dict[int, int]):
    """compile_kernel stand-in: spills as given per block size (read from the rendered source)."""
    calls = []

    def compile_kernel(source, arch, name):
        threads = int(next(ln for ln in source.splitlines() if "constexpr int NCW" in ln).split("=")[1].split(";")[0])
        threads = (threads + 1) * 32
        calls.append(threads)
        return CompiledKernel(cubin=b"", path=Path("k.cubin"), registers=160, spill_bytes=spills_by_threads.get(threads, 0),
                              stack_bytes=32, log="", cached=True)
    monkeypatch.setattr(fit, "compile_kernel", compile_kernel)
    return calls


INPUTS = KernelInputs(TINY_SPECS["qwen3"], 1, 320)     # CUDA-core path: 8 consumer warps by the rules


def test_no_spill_first_build(monkeypatch):
    calls = _fake_compiler(monkeypatch, {})
    k = fit.fit_kernel(INPUTS)
    assert calls == [288] and k.plan.threads == 288 and k.headroom == 168 - 160


def test_spill_rebuilds_with_seven_consumers(monkeypatch):
    calls = _fake_compiler(monkeypatch, {288: 16})
    k = fit.fit_kernel(INPUTS)
    assert calls == [288, 256] and k.plan.tuning.consumer_warps == 7 and k.register_cap == 255
    assert k.compiled.spill_bytes == 0 and k.report()["headroom"] == 95


def test_spill_at_both_is_refused(monkeypatch):
    _fake_compiler(monkeypatch, {288: 16, 256: 40})
    with pytest.raises(UnsupportedModelError, match=r"more than the 255 registers a thread of 256 may have \(40 bytes "
                                                     r"spill.*head_dim 128.*--engine reference"):
        fit.fit_kernel(INPUTS)
    assert fit.fit_kernel(INPUTS, allow_spills=True).compiled.spill_bytes == 40     # what `compile` reports


def test_consumer_warps_set_by_the_caller_are_kept(monkeypatch):
    calls = _fake_compiler(monkeypatch, {288: 16})
    with pytest.raises(UnsupportedModelError, match="168 registers a thread of 288"):
        fit.fit_kernel(INPUTS, Tuning(consumer_warps=8))
    assert calls == [288]
