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
from ..errors import CompileError

NVCC_FLAGS = ("-cubin", "-O3", "-std=c++17", "-Xptxas", "-v", "-lineinfo")


@dataclass(frozen=True)
class CompiledKernel:
    cubin: bytes
    path: Path
    registers: int
    spill_bytes: int
    stack_bytes: int
    log: str
    cached: bool


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
    flags = (*NVCC_FLAGS, *_gencode(arch))
    key = hashlib.sha256("\0".join((source, arch, " ".join(flags), nvcc_version(), __version__)).encode()).hexdigest()[:24]
    entry = cache_root() / arch / f"{name}-{key}"
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
    regs, spills, stack = parse_ptxas(log)
    return CompiledKernel(cubin=(entry / "kernel.cubin").read_bytes(), path=entry / "kernel.cubin",
                          registers=regs, spill_bytes=spills, stack_bytes=stack, log=log, cached=cached)


def _build(source: str, flags: tuple[str, ...], entry: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    try:
        (tmp / "kernel.cu").write_text(source)
        cmd = [find_nvcc(), *flags, "-o", str(tmp / "kernel.cubin"), str(tmp / "kernel.cu")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
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
