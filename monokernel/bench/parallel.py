"""One benchmark over several GPUs of one host: each (model, batch, context) runs as its own
`monokernel bench` process pinned to one device (CUDA_VISIBLE_DEVICES), at most one per device at a time,
and the rows are merged into one result as they finish.

Why processes: torch.compile spends minutes per row compiling and tuning (150-510 s on an H100), so a
full table takes longer on one GPU than a lent machine is held; rows on different GPUs do not share
anything that would skew a timing (each measures its own GPU's copy bandwidth and its own engines in
one process, so every ratio still compares engines of the same process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import MonokernelError
from . import report


@dataclass(frozen=True)
class Job:
    model: str
    batch: int
    context: int

    def label(self) -> str:
        return f"{self.model} b{self.batch} ctx{self.context}"


def parse_devices(text: str, cuda_count: int | None = None) -> list[str]:
    """'all' (every visible GPU), 'cuda:0,cuda:2', '0,2' or 'cpu,cpu' (tests) -> device strings."""
    if text.strip() == "all":
        if cuda_count is None:
            import torch
            cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cuda_count == 0:
            raise MonokernelError("--devices all: no CUDA device is visible")
        return [f"cuda:{i}" for i in range(cuda_count)]
    out = []
    for t in (t.strip() for t in text.split(",") if t.strip()):
        if t.isdigit():
            t = f"cuda:{t}"
        if t != "cpu" and not (t.startswith("cuda:") and t[5:].isdigit()):
            raise MonokernelError(f"--devices: {t!r} is not cuda:N, N or cpu")
        out.append(t)
    if not out:
        raise MonokernelError("--devices: no device given")
    return out


def _child_env(device: str) -> tuple[dict, str]:
    """Environment and --device for a child: a GPU is the only one it sees, so every library agrees on it."""
    env = dict(os.environ)
    if device == "cpu":
        return env, "cpu"
    env["CUDA_VISIBLE_DEVICES"] = device.split(":")[1]
    return env, "cuda"


def run_parallel(jobs: list[Job], devices: list[str], child_args: list[str], command: str,
                 checkpoint: Callable[[dict], None], log: Callable[[str], None]) -> dict:
    """Runs every job, one process per free device; `child_args` are the bench flags every child gets
    (engines, dtype, steps, ...). Returns the merged result; a failed child leaves skipped rows saying why."""
    pending = list(jobs)
    running: dict[int, tuple[subprocess.Popen, Job, Path, float]] = {}   # by slot: a device may be listed twice
    merged: dict | None = None
    failures: list[dict] = []
    done = 0
    with tempfile.TemporaryDirectory(prefix="monokernel-bench-") as tmp:
        while pending or running:
            for slot, dev in enumerate(devices):
                if slot in running or not pending:
                    continue
                job = pending.pop(0)
                out = Path(tmp) / f"job{len(jobs) - len(pending)}"
                env, child_device = _child_env(dev)
                cmd = [sys.executable, "-m", "monokernel", "bench", "--model", job.model, "--batch", str(job.batch),
                       "--context", str(job.context), "--device", child_device, "--out", str(out),
                       "--no-progress", *child_args]
                with open(out.with_suffix(".log"), "w") as logf:
                    proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
                running[slot] = (proc, job, out, time.monotonic())
                log(f"bench: {job.label()} started on {dev}")
            time.sleep(0.2)
            for slot, (proc, job, out, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                dev = devices[slot]
                done += 1
                result = _child_result(proc.returncode, job, out, dev)
                if result["rows"] or result.get("copy_bandwidth_TBps") is not None:
                    merged = result if merged is None else report.merge(merged, result)
                else:
                    failures.append(result)
                if merged is not None:
                    for f in failures:                 # as the older side: the run's own fields stay
                        merged = report.merge(f, merged)
                    failures.clear()
                    merged["command"] = command
                    checkpoint(merged)
                log(f"bench: [{done}/{len(jobs)}] {job.label()} on {dev}: "
                    f"{'done' if proc.returncode == 0 else f'failed (exit {proc.returncode})'} "
                    f"in {time.monotonic() - t0:.0f} s")
    if merged is None:
        raise MonokernelError("every bench process failed: " + " ; ".join(n for f in failures for n in f["notices"]))
    return merged


def _child_result(rc: int, job: Job, out: Path, dev: str) -> dict:
    files = sorted(out.glob("*.json"))
    if rc == 0 and files:
        result = json.loads(files[0].read_text())
        for row in result["rows"] + result.get("skipped", []):
            row["device_index"] = dev
        return result
    tail = out.with_suffix(".log").read_text(errors="replace").strip().splitlines()[-5:]
    reason = f"the bench process on {dev} exited with {rc}: " + " | ".join(tail)
    return {"device": "unknown", "date": time.strftime("%Y-%m-%d"), "command": "", "copy_bandwidth_TBps": None,
            "rows": [], "skipped": [{"engine": "all", "model": job.model, "batch": job.batch, "context": job.context,
                                     "reason": reason}], "notices": [f"{job.label()}: {reason}"]}


__all__ = ["Job", "parse_devices", "run_parallel"]
