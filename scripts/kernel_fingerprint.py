"""Fingerprints of the generated megakernels, to show that a restructuring of the Python leaves the
kernel that runs identical.

For every (model, batch, max_seq) below, the rendered source is compiled with nvcc to PTX (the flags of
the real build, with -ptx for -cubin); the fingerprint is the sha256 of that PTX without comments and
debug lines, the sha256 of the schedule's task table (the kernel's other input), and the registers,
spill and stack bytes ptxas reports. A config that does not build records its first error line instead. A restructuring that keeps `--compare` silent generates the
same code.

  python scripts/kernel_fingerprint.py --out docs/kernel-fingerprints.json
  python scripts/kernel_fingerprint.py --compare docs/kernel-fingerprints.json [--only llama-3.2-1b]
"""
from __future__ import annotations

# Only the stdlib at module level: the pool's workers re-import this file and need nothing else.
import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

PRESETS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b")
BATCHES = (1, 2, 3, 8, 16)
MAX_SEQS = (4096, 32768)
TINY_MAX_SEQS = (320, 512)     # the tiny specs hold 512 positions; 320 is what the GPU logits tests use
# Tuning overrides the GPU tests and the sanitizer force (tests/runtime/test_megakernel_gpu.py PATHS, sanitize
# configs), fingerprinted on the tiny specs at max_seq 320: every knob path the refactor re-derives
VARIANTS = ((2, "gemv_mma=1"), (5, "gemv_mma=0"), (1, "attn_mma=0"), (4, "attn_mma=0"),
            (1, "l2_lookahead_kb=64"), (3, "l2_lookahead_kb=64,helpers_skip_mlp=0"), (3, "next_step_lookahead=0"),
            (1, "input_smem_budget=0"), (9, "input_smem_budget=0"), (3, "input_smem_budget=2304,mma_kseg_max=160"),
            (3, "input_smem_budget=0,mma_kseg_max=160"), (9, "input_smem_budget=0,seg_staging=0"),
            (1, "min_kv_chunk=8"), (16, "min_kv_chunk=8"))
CACHE_FORMAT = "1"   # bump when strip_ptx or the ptxas command changes: old entries then no longer match

REPO = Path(__file__).resolve().parent.parent


# ---- The only code that touches monokernel or tests/: a refactor that moves them edits just these. ----

def build_for(spec, batch: int, max_seq: int, overrides: str = "") -> tuple[str, bytes]:
    """(CUDA source, task table bytes) the package builds for (spec, batch, max_seq) and tuning overrides
    written "k=v,k=v" in 02be4f3's KernelConfig names. Speaks both the plan API and 02be4f3's KernelConfig,
    so the baseline can be recomputed from that tree (its bitmask helpers_skip_mlp is the plan's set)."""
    from monokernel.codegen.render import render_source
    from monokernel.schedule.build import build_schedule
    knobs = {k: int(v) for k, v in (kv.split("=") for kv in overrides.split(",") if kv)}
    try:
        from monokernel.schedule.plan import plan_for
    except ImportError:
        from monokernel.schedule.config import GpuInfo, KernelConfig
        plan = KernelConfig(spec, batch, max_seq, "bf16", GpuInfo(), **knobs)
    else:
        from monokernel.schedule.tasks import Op
        if "helpers_skip_mlp" in knobs:
            bits = knobs.pop("helpers_skip_mlp")
            knobs["helpers_skip"] = frozenset(op for bit, op in ((1, Op.GATEUP), (2, Op.DOWN)) if bits & bit)
        plan = plan_for(spec, batch, max_seq, "bf16", **knobs)
    offsets, records = build_schedule(plan).task_table()
    return render_source(plan), offsets.tobytes() + records.tobytes()


def tiny_specs() -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from conftest import TINY_SPECS
    except ImportError:
        from megakernel_cases import TINY_SPECS  # 02be4f3, whose baseline this script recomputes
    return TINY_SPECS


def preset_spec(name: str):
    from monokernel.models.presets import preset
    return preset(name)


def toolchain() -> dict:
    """nvcc, its version, the real build's flags with -ptx, the target arch and the ptxas parser."""
    from monokernel.codegen.compile import NVCC_FLAGS, _gencode, find_nvcc, nvcc_version, parse_ptxas
    arch = "sm_90a"                              # what the package builds for Hopper
    nvcc = find_nvcc()
    sibling = Path(nvcc).with_name("ptxas")     # the ptxas of the same toolkit, not whichever is first on PATH
    ptxas = str(sibling) if sibling.exists() else shutil.which("ptxas")
    flags = ["-ptx" if f == "-cubin" else f for f in NVCC_FLAGS] + _gencode(arch)
    return dict(nvcc=nvcc, ptxas=ptxas, version=nvcc_version(), flags=flags, arch=arch, parse=parse_ptxas)


# ---- Compiling (in the workers: stdlib only) ----

_BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_LINE_COMMENT = re.compile(r"//.*")
_DEBUG_SECTION = re.compile(r"^\s*\.section\s+\.debug_\w+\s*\{.*?^\s*\}", re.S | re.M)


def strip_ptx(ptx: str) -> str:
    """The PTX that decides the machine code: comments carry the compiler build and debug lines carry
    source paths and line numbers, which a pure move of code changes without changing the kernel."""
    ptx = _DEBUG_SECTION.sub("", ptx)
    ptx = _BLOCK_COMMENT.sub("", ptx)
    keep = []
    for line in ptx.splitlines():
        line = _LINE_COMMENT.sub("", line).rstrip()
        s = line.lstrip()
        if not s or s.startswith((".loc", ".file", "@@DWARF")):
            continue
        keep.append(line)
    return "\n".join(keep) + "\n"


def _first_error_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    return next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "")


def compile_job(source: str, tc: dict) -> dict:
    """{"ptx_sha256", "ptxas_log"} or {"error"}; deterministic in (source, toolchain), hence cacheable."""
    # A fixed relative file name: the PTX must not depend on where the temporary directory landed.
    with tempfile.TemporaryDirectory(prefix="mk-fingerprint-") as tmp:
        Path(tmp, "kernel.cu").write_text(source)
        p = subprocess.run([tc["nvcc"], *tc["flags"], "-o", "kernel.ptx", "kernel.cu"],
                           cwd=tmp, capture_output=True, text=True)
        if p.returncode != 0:
            return {"error": f"nvcc failed (exit {p.returncode}): {_first_error_line(p.stdout + p.stderr)}"}
        ptx = Path(tmp, "kernel.ptx").read_text()
        q = subprocess.run([tc["ptxas"], f"-arch={tc['arch']}", "-O3", "-v", "-o", "kernel.cubin", "kernel.ptx"],
                           cwd=tmp, capture_output=True, text=True)
        if q.returncode != 0:
            return {"error": f"ptxas failed (exit {q.returncode}): {_first_error_line(q.stdout + q.stderr)}"}
    return {"ptx_sha256": hashlib.sha256(strip_ptx(ptx).encode()).hexdigest(), "ptxas_log": q.stdout + q.stderr}


def _worker(source: str, tc: dict) -> tuple[dict, float]:
    t = time.perf_counter()
    return compile_job(source, tc), time.perf_counter() - t


# ---- Driver ----

def jobs(only: str | None):
    """(key, source or None, task-table sha256 or None, error or None) for every config, filtered by `only`."""
    tiny = list(tiny_specs().values())
    configs = [(s, b, m, "") for s in map(preset_spec, PRESETS) for b in BATCHES for m in MAX_SEQS]
    configs += [(s, b, m, "") for s in tiny for b in BATCHES for m in TINY_MAX_SEQS]
    configs += [(s, b, 320, v) for s in tiny for b, v in VARIANTS]
    for spec, batch, max_seq, var in configs:
        key = f"{spec.name}-b{batch}-s{max_seq}" + (f"[{var}]" if var else "")
        if only and only not in key:
            continue
        try:
            source, table = build_for(spec, batch, max_seq, var)
        except Exception as e:     # a config the package refuses is part of the fingerprint
            yield key, None, None, (str(e).strip().splitlines() or [type(e).__name__])[0]
        else:
            yield key, source, hashlib.sha256(table).hexdigest(), None


def _record(key: str, tasks: str, result: dict, parse) -> dict:
    if "error" in result:
        return {"key": key, "error": result["error"]}
    regs, spills, stack = parse(result["ptxas_log"])
    return {"key": key, "ptx_sha256": result["ptx_sha256"], "tasks_sha256": tasks, "registers": regs,
            "spill_bytes": spills, "stack_bytes": stack}


def _progress(i: int, n: int, rec: dict, note: str) -> None:
    what = (f"error: {rec['error']}" if "error" in rec else
            f"regs {rec['registers']:3d}  spills {rec['spill_bytes']:5d}  stack {rec['stack_bytes']:5d}")
    print(f"[{i:2d}/{n}] {rec['key']:28s} {what}  ({note})", flush=True)


def fingerprint(only: str | None, cache_dir: Path, n_jobs: int) -> tuple[list[dict], str]:
    tc = toolchain()
    parse = tc.pop("parse")      # the cache keeps the raw ptxas log, so a fixed parser needs no rebuild
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo = list(jobs(only))
    records, pending = [], {}
    n = len(todo)
    for key, source, tasks, error in todo:
        if error is not None:
            records.append({"key": key, "error": error})
            _progress(len(records), n, records[-1], "config")
            continue
        ck = hashlib.sha256("\0".join([CACHE_FORMAT, source, tc["version"], " ".join(tc["flags"]),
                                       tc["arch"]]).encode()).hexdigest()
        entry = cache_dir / f"{ck}.json"
        if entry.exists():
            records.append(_record(key, tasks, json.loads(entry.read_text()), parse))
            _progress(len(records), n, records[-1], "cached")
        else:
            pending.setdefault(ck, []).append((key, source, tasks))
    if pending:
        with ProcessPoolExecutor(max_workers=n_jobs) as pool:
            # Identical sources (possible for different keys) compile once.
            futs = {pool.submit(_worker, group[0][1], tc): ck for ck, group in pending.items()}
            for fut in as_completed(futs):
                ck = futs[fut]
                result, dt = fut.result()
                tmp = cache_dir / f".{ck}.{os.getpid()}.tmp"
                tmp.write_text(json.dumps(result))
                os.replace(tmp, cache_dir / f"{ck}.json")     # a killed run leaves no half-written entry
                for key, _, tasks in pending[ck]:
                    records.append(_record(key, tasks, result, parse))
                    _progress(len(records), n, records[-1], f"{dt:.0f} s")
    records.sort(key=lambda r: r["key"])
    return records, tc["version"]


def compare(records: list[dict], version: str, path: Path, only: str | None) -> int:
    old = json.loads(path.read_text())
    if old.get("nvcc") != version:
        print(f"note: {path} was made with nvcc {old.get('nvcc')}, this is {version}; the PTX may differ for that alone")
    before = {r["key"]: r for r in old["records"] if not only or only in r["key"]}
    now = {r["key"]: r for r in records if not only or only in r["key"]}
    differ = 0
    for key in sorted(before.keys() | now.keys()):
        a, b = before.get(key), now.get(key)
        if a == b:
            continue
        differ += 1
        if a is None or b is None:
            print(f"{key}: {'not in ' + str(path) if a is None else 'no longer built'}")
            continue
        fields = sorted((a.keys() | b.keys()) - {"key"})
        print(f"{key}: " + ", ".join(f"{f} {a.get(f)} -> {b.get(f)}" for f in fields if a.get(f) != b.get(f)))
    if differ:
        print(f"{differ} of {len(before.keys() | now.keys())} fingerprints differ")
        return 1
    print(f"{len(now)} fingerprints identical")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the fingerprints as JSON to this file")
    ap.add_argument("--compare", type=Path, help="print every key whose fingerprint differs from this file; exit 1 if any")
    ap.add_argument("--only", help="only the keys containing this substring")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "monokernel-fingerprint")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    records, version = fingerprint(args.only, args.cache_dir, args.jobs)
    print(f"{len(records)} records ({sum('error' in r for r in records)} errors) in {time.perf_counter() - t:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"records": records, "nvcc": version}, indent=1) + "\n")
    return compare(records, version, args.compare, args.only) if args.compare else 0


if __name__ == "__main__":
    sys.exit(main())
