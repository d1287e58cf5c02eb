"""Summary of one profiled megakernel step: the kernel stamps every task with three globaltimer readings
(start, counter wait done, end), and this turns them into where blocks spend the step.

Per op: the summed wait and work over all tasks, and the phase's critical path summed over the layers:
`sight_us`, from the previous phase's last end to this phase's median counter sight (signal latency plus
the previous phase's tail); `median_work_us`, from the median sight to the median end; and the straggle,
how long after the median task the last one ended. Every block waits for a phase's last task, so
the straggle is what a phase's slowest block costs everyone; `last_blocks` says which blocks those are
(a block that is last again and again streams more slowly than the rest, not by chance), with the SM it
ran on where `sm_ids` is given: blocks land on SMs afresh each launch, so a slow SM shows as a repeated
SM, not a repeated block."""
from __future__ import annotations

from collections import Counter

import numpy as np

from ..schedule.build import phase_key
from ..schedule.tasks import LAYER_OPS, TASK_FIELDS, Op, Task


def _columns(stamps, records):
    """The stamps as int64 ns, each task's op and layer, and the step's first stamp."""
    stamps = np.asarray(stamps, dtype=np.int64)
    records = np.asarray(records).reshape(-1, len(TASK_FIELDS))
    return stamps, records[:, TASK_FIELDS.index("op")], records[:, TASK_FIELDS.index("layer")], int(stamps[:, 0].min())


def _marks(s: np.ndarray) -> tuple[float, float, int]:
    """Of one phase's task stamps: the median counter sight, the median end and the last end (ns)."""
    return np.median(s[:, 1]), np.median(s[:, 2]), s[:, 2].max()


def summarize_step(stamps: np.ndarray, records: np.ndarray, offsets: np.ndarray, sm_ids=None) -> dict:
    """stamps: (tasks, 3) ns; records: (tasks, 8) int32 task table; offsets: (blocks + 1,) per-block starts;
    sm_ids: (blocks,) the SM of each block, or None."""
    stamps, op_col, layer_col, t0 = _columns(stamps, records)
    blocks = len(offsets) - 1
    block_of = np.repeat(np.arange(blocks), np.diff(offsets))
    out: dict = {"span_us": (int(stamps[:, 2].max()) - t0) / 1e3, "blocks": blocks}
    last = Counter()
    phases = {}                            # (op, layer) -> (median sight, median end, last end)
    for op in Op:
        sel = op_col == int(op)
        if not sel.any():
            continue
        wait = (stamps[sel, 1] - stamps[sel, 0]).sum() / 1e3
        work = (stamps[sel, 2] - stamps[sel, 1]).sum() / 1e3
        straggle = 0.0
        for layer in np.unique(layer_col[sel]):
            idx = np.flatnonzero(sel & (layer_col == layer))
            ends = stamps[idx, 2]
            straggle += (ends.max() - np.median(ends)) / 1e3
            if op == Op.PREFETCH:          # off the critical path: nothing waits on it
                continue
            phases[(op, int(layer))] = _marks(stamps[idx])
            if len(idx) > 1:
                last[int(block_of[idx[ends.argmax()]])] += 1
        out[op.name] = {"wait_us": float(wait), "work_us": float(work), "straggle_us": float(straggle),
                        "tasks": int(sel.sum()), "sight_us": 0.0, "median_work_us": 0.0}
    prev_end = None
    for (op, layer) in sorted(phases, key=lambda ph: phase_key(Task(*ph))):
        go, end, last_end = phases[(op, layer)]
        out[op.name]["median_work_us"] += float(end - go) / 1e3
        if prev_end is not None:
            out[op.name]["sight_us"] += float(go - prev_end) / 1e3
        prev_end = last_end
    out["last_blocks"] = [[b, n] for b, n in last.most_common(8)]
    if sm_ids is not None:
        out["last_blocks"] = [[b, n, int(sm_ids[b])] for b, n in out["last_blocks"]]
    return out



def phase_timeline(stamps: np.ndarray, records: np.ndarray, layers) -> list[dict]:
    """Per (layer, op) of the given layers, in step order, µs from the step's first stamp: the median counter
    sight, the median and the last end, and the median work (sight to end) of the phase's tasks: where a
    layer's time goes, read off the raw stamps (`scripts/profile_megakernel.py --raw`, then
    `scripts/phase_timeline.py`)."""
    stamps, op_col, layer_col, t0 = _columns(stamps, records)
    rows = []
    for layer in layers:
        ops = {Op(int(o)) for o in op_col[layer_col == layer]} & {*LAYER_OPS, Op.PREFETCH}   # not embed, LM head, argmax
        for op in sorted(ops, key=lambda o: phase_key(Task(o, layer))):
            s = stamps[(op_col == int(op)) & (layer_col == layer)]
            sight, end, last_end = _marks(s)
            rows.append({"layer": int(layer), "op": op.name, "tasks": len(s), "sight_us": float(sight - t0) / 1e3,
                         "median_end_us": float(end - t0) / 1e3, "last_end_us": float(last_end - t0) / 1e3,
                         "median_work_us": float(np.median(s[:, 2] - s[:, 1])) / 1e3})
    return rows
