"""The kernel sources are real headers: each has #pragma once and compiles on its own, and the resolver joins
them into the one translation unit that is built."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TINY_SPECS
from monokernel.codegen import headers, render
from monokernel.codegen.compile import find_nvcc
from monokernel.codegen.render import render_source
from monokernel.schedule.plan import plan_for

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
CFG = plan_for(TINY_SPECS["qwen3"], 3, 320)   # q/k norm, MHA, batch 3: the most branches on
MARKER = re.compile(r"^// ---- (\S+) ----$", re.M)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    """A folder holding config.cuh as rendered for CFG, with the #pragma once a header needs."""
    mp = pytest.MonkeyPatch()
    mp.setattr(render, "resolve_includes", lambda config, **_: config)
    try:
        config = render_source(CFG)
    finally:
        mp.undo()
    d = tmp_path_factory.mktemp("config")
    (d / headers.CONFIG).write_text("#pragma once\n" + config)
    return d


def test_headers_have_pragma_once():
    for name in headers.header_names():
        first = next(ln for ln in headers.read_kernel_file(name).splitlines() if ln.strip())
        assert first == "#pragma once", name


@needs_nvcc
@pytest.mark.parametrize("name", headers.header_names() + [headers.ENTRY])
def test_file_compiles_alone(name, config_dir, tmp_path):
    """A unit of just this file (and config.cuh on the include path): its own includes must be complete."""
    src = tmp_path / "alone.cu"
    src.write_text(f'#include "{name}"\n')
    kernel_dir = Path(str(headers.kernel_dir()))
    p = subprocess.run([find_nvcc(), "-std=c++17", "-arch=sm_90a", "-ptx", "-o", str(tmp_path / "alone.ptx"),
                        "-I", str(config_dir), "-I", str(kernel_dir), str(src)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_resolver_inlines_each_file_once():
    files = {
        "entry.cu": '#include "config.cuh"\n#include "a.cuh"\n#include "b.cuh"\nENTRY\n',
        "a.cuh": '#pragma once\n#include <type_traits>\n#include "common.cuh"\n\nA\n',
        "b.cuh": '#pragma once\n#include "common.cuh"\n#include "a.cuh"\n#include "config.cuh"\nB\n#include "c.cuh"\nB2\n',
        "c.cuh": '#pragma once\n#include "b.cuh"\nC\n',   # a cycle back to b: already open, so dropped
        "common.cuh": '#pragma once\n#include "config.cuh"\nCOMMON\n',
    }
    out = headers.resolve_includes("CONFIG\n", entry="entry.cu", read=files.__getitem__)
    assert "#pragma once" not in out and '#include "' not in out and "#include <type_traits>" in out
    body = [ln for ln in out.splitlines() if ln.isupper()]
    assert body == ["CONFIG", "COMMON", "A", "B", "C", "B2", "ENTRY"]
    # a file's marker comes again where its own lines resume after an include
    assert MARKER.findall(out) == ["config.cuh", "a.cuh", "common.cuh", "a.cuh", "b.cuh", "c.cuh", "b.cuh", "entry.cu"]
    with pytest.raises(KeyError):
        headers.resolve_includes("", entry="entry.cu", read={"entry.cu": '#include "missing.cuh"\n'}.__getitem__)


def test_rendered_source_holds_every_header_once():
    src = render_source(CFG)
    assert '#include "' not in src and "#pragma once" not in src
    names = MARKER.findall(src)
    assert sorted(names) == sorted([headers.CONFIG, headers.ENTRY, *headers.header_names()])
    assert names[0] == headers.CONFIG and names[-1] == headers.ENTRY
