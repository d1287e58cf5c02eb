"""The profiled-step summary on hand-made timestamps (the kernel side needs a GPU; this is the arithmetic)."""
import numpy as np

from monokernel.runtime.step_profile import phase_timeline, summarize_step
from monokernel.schedule.tasks import Op, Task


def _table(blocks):
    offsets = np.cumsum([0] + [len(q) for q in blocks])
    records = np.array([t.record() for q in blocks for t in q], dtype=np.int32)
    return records, offsets


def test_summarize_step():
    """summarize_step: waits, work, straggle and last blocks."""
    blocks = [[Task(Op.EMBED), Task(Op.QKV, 0), Task(Op.QKV, 1)],
              [Task(Op.QKV, 0), Task(Op.QKV, 1)],
              [Task(Op.QKV, 0), Task(Op.QKV, 1)]]
    records, offsets = _table(blocks)
    us = 1000
    stamps = np.array([
        [0, 0, 5 * us],                    # block 0: embed
        [5 * us, 6 * us, 20 * us],         # block 0: qkv layer 0 (median end)
        [20 * us, 21 * us, 30 * us],       # block 0: qkv layer 1 (last)
        [1 * us, 3 * us, 25 * us],         # block 1: qkv layer 0 (last)
        [25 * us, 26 * us, 28 * us],       # block 1: qkv layer 1 (median end)
        [2 * us, 2 * us, 10 * us],         # block 2: qkv layer 0
        [10 * us, 12 * us, 27 * us],       # block 2: qkv layer 1
    ])
    s = summarize_step(stamps, records, offsets)
    assert s["blocks"] == 3 and s["span_us"] == 30
    assert s["EMBED"] == {"wait_us": 0, "work_us": 5, "straggle_us": 0, "tasks": 1, "sight_us": 0,
                          "median_work_us": 5}
    qkv = s["QKV"]
    assert qkv["tasks"] == 6
    assert qkv["wait_us"] == (1 + 1 + 2 + 1 + 0 + 2)
    assert qkv["work_us"] == (14 + 9 + 22 + 2 + 8 + 15)
    assert qkv["straggle_us"] == (25 - 20) + (30 - 28)        # last end minus median end, per layer
    assert s["last_blocks"] == [[1, 1], [0, 1]]               # layer 0: block 1, layer 1: block 0
    # phases in order: embed (last end 5), qkv 0 (sights 6, 3, 2: median 3; ends 20, 25, 10: median 20,
    # last 25), qkv 1 (sights 21, 26, 12: median 21; ends 30, 28, 27: median 28)
    assert qkv["sight_us"] == (3 - 5) + (21 - 25)
    assert qkv["median_work_us"] == (20 - 3) + (28 - 21)


def test_last_blocks_name_their_sm():
    blocks = [[Task(Op.QKV, 0)], [Task(Op.QKV, 0)], [Task(Op.QKV, 0)]]
    records, offsets = _table(blocks)
    stamps = np.array([[0, 0, 10], [0, 0, 30], [0, 0, 20]]) * 1000
    s = summarize_step(stamps, records, offsets, sm_ids=np.array([7, 3, 5]))
    assert s["last_blocks"] == [[1, 1, 3]]


def test_phase_timeline():
    """The phase timeline, per layer in step order."""
    blocks = [[Task(Op.EMBED), Task(Op.PREFETCH, 1), Task(Op.GATEUP, 1)],
              [Task(Op.QKV, 1), Task(Op.ATTN, 1)],
              [Task(Op.QKV, 1), Task(Op.QKV, 2)]]
    records, offsets = _table(blocks)
    us = 1000
    stamps = np.array([[1, 1, 2], [2, 3, 9], [9, 30, 50],       # block 0: embed (layer 0), lookahead, gate/up
                       [1, 4, 10], [10, 14, 20],     # block 1: qkv, attention
                       [1, 6, 12], [60, 61, 70]]) * us   # block 2: qkv, qkv of layer 2 (not asked for)
    rows = phase_timeline(stamps, records, [1])
    assert phase_timeline(stamps, records, [0]) == []     # the embedding copy is not a layer's phase
    assert [r["op"] for r in rows] == ["PREFETCH", "QKV", "ATTN", "GATEUP"]
    qkv = rows[1]
    assert qkv == {"layer": 1, "op": "QKV", "tasks": 2, "sight_us": 4.0, "median_end_us": 10.0, "last_end_us": 11.0,
                   "median_work_us": 6.0}
    assert rows[3]["median_work_us"] == 20.0 and rows[0]["sight_us"] == 2.0
