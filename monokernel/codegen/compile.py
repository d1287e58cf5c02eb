"""Compiles a rendered kernel to a cubin with nvcc, through a content-addressed on-disk cache.

Key: sha256 of (source, arch, flags, nvcc version, package version). Entries are built in a temporary
directory and moved into place with os.replace under a file lock, so concurrent loaders never see a
half-written binary. The rendered source and the ptxas report are kept beside the cubin.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from filelock import FileLock

from .. import __version__
from ..errors import CompileError, InputError, UnsupportedModelError

NVCC_FLAGS = ("-cubin", "-O3", "-std=c++17", "-Xptxas", "-v", "-lineinfo")
# The kernel uses Hopper's arch-specific instructions (wgmma, TMA bulk copies, clusters): sm_90a and nothing else.
KERNEL_ARCH = "sm_90a"
_ARCH = re.compile(r"sm_\d{2,3}[af]?")


@dataclass(frozen=True)
class CompiledKernel:
    cubin: bytes
    path: Path
    registers: int
    spill_bytes: int
    stack_bytes: int
    log: str
    cached: bool


def check_arch(arch: str) -> None:
    """Refuses an arch the kernel cannot be built for, before anything is written to the cache."""
    if not isinstance(arch, str) or not _ARCH.fullmatch(arch):
        raise InputError(f"arch={arch!r} is not a CUDA architecture name (e.g. {KERNEL_ARCH}); the megakernel needs "
                         f"{KERNEL_ARCH}")
    if arch != KERNEL_ARCH:
        raise UnsupportedModelError(f"the megakernel needs {KERNEL_ARCH} (Hopper: H100, H200); it cannot be built for "
                                    f"{arch}: it uses Hopper-only instructions (wgmma, TMA)")


def cache_root() -> Path:
    env = os.environ.get("MONOKERNEL_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "monokernel" / __version__


@lru_cache(maxsize=None)
def find_nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
        nvcc = str(home) if home.exists() else None
    if nvcc is None:
        raise CompileError("nvcc not found: install the CUDA toolkit (12.4 or newer) or put nvcc on PATH")
    return nvcc


@lru_cache(maxsize=None)
def nvcc_version() -> str:
    out = subprocess.run([find_nvcc(), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def _gencode(arch: str) -> list[str]:
    num = arch.removeprefix("sm_")
    return [f"-gencode=arch=compute_{num},code=sm_{num}"]


def parse_ptxas(log: str) -> tuple[int, int, int]:
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", log)), default=0)
    spills = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log))
    stack = max((int(x) for x in re.findall(r"(\d+) bytes stack frame", log)), default=0)
    return regs, spills, stack


def compile_kernel(source: str, arch: str, name: str = "kernel") -> CompiledKernel:
    check_arch(arch)
    flags = (*NVCC_FLAGS, *_gencode(arch))
    key = hashlib.sha256("\0".join((source, arch, " ".join(flags), nvcc_version(), __version__)).encode()).hexdigest()[:24]
    entry = cache_root() / arch / f"{name}-{key}"
    try:
        if not (entry / "kernel.cubin").exists():
            entry.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(entry) + ".lock"):
                if not (entry / "kernel.cubin").exists():     # another process may have built it meanwhile
                    _build(source, flags, entry)
                    cached = False
                else:
                    cached = True
        else:
            cached = True
        log = (entry / "ptxas.log").read_text()
        cubin = (entry / "kernel.cubin").read_bytes()
    except OSError as e:
        # an OSError here is the cache's (nvcc's own failures are CompileErrors with its log): say where it is
        # and how to move it, instead of a traceback that the engine's fallback would not catch
        where = "MONOKERNEL_CACHE_DIR" if os.environ.get("MONOKERNEL_CACHE_DIR") else "the default"
        raise CompileError(f"the kernel cache {cache_root()} ({where}) cannot be used: {e.strerror or e} "
                           f"({e.filename or entry}); set MONOKERNEL_CACHE_DIR to a writable directory") from None
    regs, spills, stack = parse_ptxas(log)
    return CompiledKernel(cubin=cubin, path=entry / "kernel.cubin",
                          registers=regs, spill_bytes=spills, stack_bytes=stack, log=log, cached=cached)


def _build(source: str, flags: tuple[str, ...], entry: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    try:
        (tmp / "kernel.cu").write_text(source)
        cmd = [find_nvcc(), *flags, "-o", str(tmp / "kernel.cubin"), str(tmp / "kernel.cu")]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise CompileError(f"nvcc ({cmd[0]}) cannot be run: {e.strerror or e}; reinstall the CUDA toolkit or put "
                               "a working nvcc on PATH") from None
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            kept = entry.parent / f"{entry.name}.failed.cu"     # kept for the bug report
            shutil.copyfile(tmp / "kernel.cu", kept)
            raise CompileError(f"nvcc failed (exit {proc.returncode}) compiling the generated kernel {kept}", log)
        (tmp / "ptxas.log").write_text(log)
        os.replace(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
