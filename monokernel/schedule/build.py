"""Builds the decode step's task DAG and assigns it to the persistent blocks.

Order is the deadlock argument: tasks are appended phase by phase (embed, then per layer the L2
lookahead of gate/up rows, qkv, attn, o, gate/up, down, then LM head and argmax), every task waits only
on an earlier phase, and each block runs its queue in that global order. The earliest unfinished task
therefore always has its inputs ready, so a grid whose blocks are all resident always makes progress.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import KernelPlan
from .tasks import GEMV_OPS, LAYER_OPS, TASK_DTYPE, Op, Task


def counter_of(op: Op, layer: int, num_layers: int) -> int:
    if op == Op.EMBED:
        return 0
    if op == Op.LMHEAD:
        return 1 + len(LAYER_OPS) * num_layers
    return 1 + len(LAYER_OPS) * layer + LAYER_OPS.index(op)


@dataclass
class Schedule:
    plan: KernelPlan
    blocks: list[list[Task]]
    num_counters: int
    lm_tiles: int

    @property
    def tasks(self) -> list[Task]:
        """All tasks in global (phase) order."""
        return sorted((t for q in self.blocks for t in q), key=phase_key)

    def task_table(self) -> tuple[np.ndarray, np.ndarray]:
        offsets = np.zeros(len(self.blocks) + 1, dtype=np.int32)
        records = []
        for i, q in enumerate(self.blocks):
            offsets[i + 1] = offsets[i] + len(q)
            records += [t.record() for t in q]
        return offsets, np.array(records, dtype=TASK_DTYPE)

    def bytes_per_block(self) -> np.ndarray:
        """Weight bytes each block streams per phase: (blocks, phases)."""
        plan = self.plan
        phases = 2 + len(LAYER_OPS) * plan.spec.num_layers
        out = np.zeros((len(self.blocks), phases), dtype=np.int64)
        for b, q in enumerate(self.blocks):
            for t in q:
                if t.op in GEMV_OPS:
                    out[b, counter_of(t.op, t.layer, plan.spec.num_layers)] += t.rows * plan.gemv[t.op].cols * plan.gemv[t.op].weight_bytes
        return out


def phase_key(t: Task):
    """Where a task's phase falls in the step: embed, then per layer the lookahead, qkv, attn, o, gate/up,
    down, then the LM head and the argmax."""
    order = {Op.EMBED: (-1, 0), Op.LMHEAD: (1 << 20, 0), Op.ARGMAX: (1 << 20, 1), Op.PREFETCH: (t.layer, -1)}
    return order.get(t.op, (t.layer, LAYER_OPS.index(t.op) if t.op in LAYER_OPS else 0))


def build_schedule(plan: KernelPlan) -> Schedule:
    spec = plan.spec
    L = spec.num_layers
    nb = plan.num_blocks
    blocks: list[list[Task]] = [[] for _ in range(nb)]
    load = np.zeros(nb, dtype=np.int64)

    chain = plan.chain_blocks   # blocks 0..chain-1 run the QKV -> attention -> O chain; the rest prefetch
    helpers = list(range(chain, nb))

    def assign(tasks: list[Task], cost: list[int], among: range | list[int] = range(nb)):
        # Largest first onto the block least loaded in this phase (ties: least loaded overall) keeps each
        # phase level, which is what the per-phase counters wait on, and the running total level too.
        phase = np.full(nb, np.iinfo(np.int64).max // 2, dtype=np.int64)
        phase[list(among)] = 0
        for i in sorted(range(len(tasks)), key=lambda i: -cost[i]):
            b = int(np.lexsort((load, phase))[0])
            blocks[b].append(tasks[i])
            phase[b] += cost[i]
            load[b] += cost[i]

    def gemv_tasks(op: Op, layer: int, wait: tuple[int, int]) -> int:
        g = plan.gemv[op]
        tasks, cost = [], []
        for tile, r0 in enumerate(range(0, g.rows, g.tile_rows)):
            n = min(g.tile_rows, g.rows - r0)
            tasks.append(Task.gemv(op, layer, r0, n, tile, wait, counter_of(op, layer, L)))
            cost.append(n * g.cols * g.weight_bytes)
        if g.chain_only:
            assign(tasks, cost, range(chain))
        elif op == Op.GATEUP and helpers:
            # a tile each for the chain blocks; the helpers, whose prefetching may run into the gate/up
            # phase, share the rows left over (half a tile each at 1B)
            assign(tasks[:chain], cost[:chain], range(chain))
            left = g.rows - chain * g.tile_rows
            per = max(2, -(-left // len(helpers) // 2) * 2)
            rest = [Task.gemv(op, layer, r0, min(per, g.rows - r0), chain + i, wait, counter_of(op, layer, L))
                    for i, r0 in enumerate(range(chain * g.tile_rows, g.rows, per))]
            assign(rest, [t.rows * g.cols * g.weight_bytes for t in rest], helpers)
            return min(chain, len(tasks)) + len(rest)
        else:
            assign(tasks, cost)
        return len(tasks)

    def lookahead_tasks(layer: int, start: tuple[int, int]):
        # The blocks kept out of the chain prefetch the chain blocks' gate/up rows past what each one's ring
        # will hold into L2, from the QKV phase's start: the chain leaves HBM idle, and a block issues only
        # ~128 bytes a cycle of bulk prefetches (perf note 23), too slow to do beside a chain task.
        tiles = min(chain, plan.gemv[Op.GATEUP].tiles)
        per = -(-tiles // len(helpers))
        for b, t0 in zip(helpers, range(0, tiles, per)):
            blocks[b].append(Task.prefetch(layer, t0, min(per, tiles - t0), start))

    blocks[0].append(Task(Op.EMBED, signal_counter=counter_of(Op.EMBED, 0, L)))
    prev = (counter_of(Op.EMBED, 0, L), 1)
    n_attn = plan.batch * spec.num_kv_heads * plan.attn.splits
    for layer in range(L):
        if helpers:
            lookahead_tasks(layer, prev)
        n = gemv_tasks(Op.QKV, layer, prev)
        wait = (counter_of(Op.QKV, layer, L), n)
        attn = [Task.attention(layer, b, h, spec.num_kv_heads, s, wait, counter_of(Op.ATTN, layer, L))
                for b in range(plan.batch) for h in range(spec.num_kv_heads) for s in range(plan.attn.splits)]
        # Cost of a split: its share of the KV bytes at full context (balances long contexts).
        assign(attn, [2 * spec.head_dim * plan.inputs.ab * plan.max_seq // plan.attn.splits] * n_attn, range(chain))
        n = gemv_tasks(Op.OPROJ, layer, (counter_of(Op.ATTN, layer, L), n_attn))
        n = gemv_tasks(Op.GATEUP, layer, (counter_of(Op.OPROJ, layer, L), n))
        n = gemv_tasks(Op.DOWN, layer, (counter_of(Op.GATEUP, layer, L), n))
        prev = (counter_of(Op.DOWN, layer, L), n)
    lm_tiles = gemv_tasks(Op.LMHEAD, 0, prev)
    blocks[0].append(Task(Op.ARGMAX, wait_counter=counter_of(Op.LMHEAD, 0, L), wait_count=lm_tiles))
    for q in blocks:
        q.sort(key=phase_key)
    return Schedule(plan=plan, blocks=blocks, num_counters=counter_of(Op.LMHEAD, 0, L) + 1, lm_tiles=lm_tiles)
