"""compute-sanitizer memcheck and racecheck on a small megakernel config."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


# (tiny spec, overrides): the default config (MHA: the tensor-core attention walk with one query head a kv
# head) and with 4 query heads a kv head; the CUDA-core attention walk; the O projection's input read from
# global memory, staged in shared memory one K segment at a time (segments of 160 with a tail: 512 = 3 x 160
# + 32); and every op's input staged that way, in an area of its own (no input fits in shared memory), the
# RMSNorm ones from the global scratch
CONFIGS = {"default": ("qwen3", ""), "gqa": ("llama", ""), "cuda-core-walk": ("qwen3", "attn_mma=0"),
           "seg-staged": ("qwen3", "input_smem_budget=2304,mma_kseg_max=160,seg_prefetch=0"),
           "all-seg-staged": ("qwen3", "input_smem_budget=0,mma_kseg_max=160"),
           # the same two with the next segment's copies in flight while a segment runs (perf note 40): a task's
           # first copies go out before its first barrier, so the input area's last readers must be done by then
           "seg-prefetch": ("qwen3", "input_smem_budget=2304,mma_kseg_max=160,seg_prefetch=1"),
           "all-seg-prefetch": ("qwen3", "input_smem_budget=0,mma_kseg_max=160,seg_prefetch=1"),
           # the L2 lookahead's helper blocks and tasks, forced on (derived off on the tiny models, whose
           # rings hold whole gate/up tiles: the prefetch ranges are empty)
           "helpers": ("qwen3", "l2_lookahead_kb=64"),
           # the prefetch ranges as derived for a real model (batch 3)
           "lookahead-1b": ("preset:llama-3.2-1b", ""),
           # a step that times out with weight copies in flight (the producer drains them before its block
           # exits), then one the kernel refuses for a bad token, then the good steps
           "abort": ("llama", "", "abort")}
# Racecheck on the preset also instruments the cuBLAS kernels of its torch reference (it reported hazards in
# nvjet kernels, and took 5 minutes); the lookahead adds no shared-memory access, and the "helpers" config,
# whose schedule has the same helper blocks and lookahead tasks, runs under racecheck.
RUNS = [(tool, c) for c in CONFIGS for tool in ("memcheck", "racecheck") if (tool, c) != ("racecheck", "lookahead-1b")]


@pytest.mark.parametrize("tool,config", RUNS, ids=[f"{t}-{c}" for t, c in RUNS])
def test_sanitizer_clean(tool, config):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer not installed")
    here = Path(__file__).resolve().parent
    tests = here.parent      # conftest.py, which sanitize_case.py imports
    path = [str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    # API errors are cuda-python probing the driver for optional entry points at import, not kernel faults
    proc = subprocess.run([sanitizer, f"--tool={tool}", "--report-api-errors", "no", sys.executable,
                           str(here / "sanitize_case.py"), *CONFIGS[config]],
                          capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "sanitize case ok" in out
    summary = "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)" if tool == "racecheck" \
        else "ERROR SUMMARY: 0 errors"
    assert summary in out, out[-4000:]
