"""Per-step timing: CUDA events recorded between consecutive steps (no host synchronisation inside the
timed loop, so the GPU runs back to back whenever the host keeps ahead of it), median over the steps.
On a CPU device the same loop runs under time.perf_counter, so the tests can exercise it."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

MIN_STEPS = 100   # the project's rule for reported numbers; the runner warns below it


@dataclass(frozen=True)
class Timing:
    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    steps: int
    clock: str      # "cuda-events" or "perf-counter"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _summary(times_ms: list[float], clock: str) -> Timing:
    return Timing(median_ms=statistics.median(times_ms), mean_ms=statistics.fmean(times_ms), min_ms=min(times_ms),
                  max_ms=max(times_ms), steps=len(times_ms), clock=clock)


def time_steps(step: Callable[[int], object], steps: int, warmup: int, device: torch.device | str) -> Timing:
    """Calls step(0) .. step(warmup + steps - 1); times the last `steps` calls one by one."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    device = torch.device(device)
    for i in range(warmup):
        step(i)
    if device.type != "cuda":
        times = []
        for i in range(warmup, warmup + steps):
            t0 = time.perf_counter()
            step(i)
            times.append((time.perf_counter() - t0) * 1e3)
        return _summary(times, "perf-counter")
    with torch.cuda.device(device):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        torch.cuda.synchronize()
        events[0].record()
        for i in range(steps):
            step(warmup + i)
            events[i + 1].record()
        events[-1].synchronize()
    return _summary([events[i].elapsed_time(events[i + 1]) for i in range(steps)], "cuda-events")
