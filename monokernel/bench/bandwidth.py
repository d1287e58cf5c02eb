"""Device-to-device copy bandwidth, the roofline's denominator, measured in the same run as the engines.

Counts bytes read plus bytes written (a copy of N bytes moves 2N), the convention of the roofline's
byte counts, which add weight reads to KV writes. The buffer (1 GiB by default) is far larger than L2
(50 MB on an H100), so the copy streams from HBM."""
from __future__ import annotations

import statistics
import time

import torch


def copy_bandwidth_TBps(device: torch.device | str, nbytes: int = 1 << 30, reps: int = 20, warmup: int = 3) -> float:
    """Median over `reps` copies of an nbytes buffer, in TB/s (1e12 bytes per second), read + written."""
    device = torch.device(device)
    n = nbytes // 4
    src = torch.randn(n, device=device)   # random, never zeros
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    times_s = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            torch.cuda.synchronize()
            for start, end in pairs:
                start.record()
                dst.copy_(src)
                end.record()
            torch.cuda.synchronize()
            times_s = [start.elapsed_time(end) / 1e3 for start, end in pairs]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            times_s.append(time.perf_counter() - t0)
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    return moved / statistics.median(times_s) / 1e12
