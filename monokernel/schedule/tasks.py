"""The decode step as tile tasks: the one definition of opcodes and the task record, shared by the
simulator, the code generator (which renders the C++ enum from OPS) and the runtime (which uploads
the task table)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Op(IntEnum):
    EMBED = 0    # x[0][b] = embed[token[b]]
    QKV = 1      # rows of W_qkv on rmsnorm(x[l]) (+ bias)             -> qkv[l]
    ATTN = 2     # (b, kv head, split): q/k norm, RoPE, KV append, flash-decoding partial -> attn_ws[l]
    OPROJ = 3    # rows of W_o on the split-combined attention, + residual -> x_mid[l]
    GATEUP = 4   # row pairs of W_gu on rmsnorm(x_mid[l]), silu(g)*u     -> act[l]
    DOWN = 5     # rows of W_down on act[l], + residual                   -> x[l+1]
    LMHEAD = 6   # vocab rows on rmsnorm(x[L]) -> logits, per-tile (max, index)
    ARGMAX = 7   # combine the per-tile maxima -> next token
    PREFETCH = 8  # gate/up tiles [arg0, arg0 + arg1) of a layer into L2 while the attention chain idles HBM


GEMV_OPS = (Op.QKV, Op.OPROJ, Op.GATEUP, Op.DOWN, Op.LMHEAD)
LAYER_OPS = (Op.QKV, Op.ATTN, Op.OPROJ, Op.GATEUP, Op.DOWN)

# Field order of one task record as the kernel reads it (8 x int32, 32 bytes).
TASK_FIELDS = ("op", "layer", "arg0", "arg1", "tile", "wait_counter", "wait_count", "signal_counter")
TASK_DTYPE = np.dtype([(f, np.int32) for f in TASK_FIELDS])
NO_COUNTER = -1


@dataclass(frozen=True)
class Task:
    """One unit of work. GEMV ops: rows [arg0, arg0 + arg1); ATTN: arg0 = b * KVH + kv_head, arg1 = split;
    PREFETCH: gate/up tiles [arg0, arg0 + arg1).
    `tile` numbers the LM-head tiles (slot of the per-tile maximum). The task may start once
    counter[wait_counter] >= wait_count (per step; the kernel scales by the step's epoch); when done
    it adds 1 to counter[signal_counter]."""

    op: Op
    layer: int = 0
    arg0: int = 0
    arg1: int = 0
    tile: int = 0
    wait_counter: int = NO_COUNTER
    wait_count: int = 0
    signal_counter: int = NO_COUNTER

    def record(self) -> tuple[int, ...]:
        return tuple(int(getattr(self, f)) for f in TASK_FIELDS)

    # Named constructors and readers: the meaning of arg0/arg1 per op lives here and in TASK_ACCESSORS (its
    # C++ twin, generated into the Task struct), nowhere else.
    @classmethod
    def gemv(cls, op: Op, layer: int, row0: int, rows: int, tile: int, wait: tuple[int, int], signal: int) -> Task:
        return cls(op, layer, row0, rows, tile, wait[0], wait[1], signal)

    @classmethod
    def attention(cls, layer: int, seq: int, kv_head: int, num_kv_heads: int, split: int, wait: tuple[int, int],
                  signal: int) -> Task:
        return cls(Op.ATTN, layer, seq * num_kv_heads + kv_head, split, 0, wait[0], wait[1], signal)

    @classmethod
    def prefetch(cls, layer: int, tile0: int, tiles: int, wait: tuple[int, int]) -> Task:
        return cls(Op.PREFETCH, layer, tile0, tiles, 0, wait[0], wait[1])

    @property
    def row0(self) -> int:
        return self.arg0

    @property
    def rows(self) -> int:
        return self.arg1

    def seq_and_kv_head(self, num_kv_heads: int) -> tuple[int, int]:
        return divmod(self.arg0, num_kv_heads)

    @property
    def split(self) -> int:
        return self.arg1


# The same readers for the kernel: (name, C++ expression over the record and the model constants)
TASK_ACCESSORS = (("row0", "arg0"), ("rows", "arg1"), ("seq", "arg0 / NKV"), ("kv_head", "arg0 % NKV"),
                  ("split", "arg1"), ("tile0", "arg0"), ("tiles", "arg1"))
