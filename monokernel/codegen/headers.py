"""Joins the kernel headers (templates/kernel/) into the one translation unit that is compiled.

Starting from the entry file, every `#include "x.cuh"` is replaced by that header's text the first time
it is met and dropped after that, as `#pragma once` would have it; "config.cuh" is the rendered config
header. System includes (`<...>`) stay for nvcc. One file keeps the compile command as it was and lets
the kernel cache's content hash cover every line that is compiled.
"""
from __future__ import annotations

import re
from importlib import resources
from typing import Callable

ENTRY = "megakernel.cu"
CONFIG = "config.cuh"
_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\b")


def kernel_dir():
    return resources.files(__package__).joinpath("templates", "kernel")


def header_names() -> list[str]:
    """The kernel's headers (not the entry file), sorted."""
    return sorted(f.name for f in kernel_dir().iterdir() if f.name.endswith(".cuh"))


def read_kernel_file(name: str) -> str:
    f = kernel_dir().joinpath(name)
    if not f.is_file():
        raise FileNotFoundError(f"kernel header {name!r} not found in {kernel_dir()}")
    return f.read_text()


def resolve_includes(config: str, entry: str = ENTRY, read: Callable[[str], str] = read_kernel_file) -> str:
    """The entry file with its quoted includes inlined, depth first, each file once. A `// ---- name ----`
    line precedes each run of a file's own lines, so the compiled source still shows where code lives."""
    seen: set[str] = set()
    out: list[str] = []

    def visit(name: str) -> None:
        seen.add(name)
        text = config if name == CONFIG else read(name)
        marked = False
        for line in text.splitlines():
            m = _INCLUDE.match(line)
            if m:
                if m.group(1) not in seen:
                    visit(m.group(1))
                    marked = False      # what follows is this file's again
                continue
            if _PRAGMA_ONCE.match(line) or (not marked and not line.strip()):
                continue
            if not marked:
                out.append(f"// ---- {name} ----")
                marked = True
            out.append(line)

    visit(entry)
    return "\n".join(out) + "\n"
