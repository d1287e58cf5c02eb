"""KernelPlan: every number one generated kernel is built from, computed once from `KernelInputs` and a
`Tuning`, frozen, and handed whole to the schedule, the code generator, the runtime and the simulator.

`make_plan` resolves the tuning's `None`s by the rules below, one function each, in the order of RULES
(a later rule may read what an earlier one decided), then lays out shared memory and the per-op shapes.
The only rule that needs a layout to decide is the L2 lookahead's: it lays the kernel out as it would be
with the lookahead on and keeps it only where that layout leaves HBM idle through the attention chain.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnsupportedModelError
from .inputs import GpuInfo, KernelInputs
from .tasks import GEMV_OPS, Op
from .tuning import Tuning

# Matrix-vector ops that, with the attention, make a layer's latency-bound chain: the L2 lookahead's helper
# blocks leave them to the others (`chain_blocks`).
CHAIN_OPS = (Op.QKV, Op.OPROJ)
MMA_ROWS = 8          # the N side of m16n8k16: weight rows of one tensor-core ring chunk
LOOKAHEAD_KB = 128    # perf note 23 (160 KB outran the helpers' issue rate)
SMEM_HEADER = 1024    # barriers, flags and alignment padding at the start of shared memory 


@dataclass(frozen=True)
class GemvPlan:
    """One op's matrix-vector shape: ROWS x K, `tile_rows` a task, `chunk_rows` a ring slot, `warps_per_row`
    consumer warps splitting a row's K; `flush_chunks` ring chunks whose results collect in shared memory
    before one epilogue; the input staged in shared memory or read from global memory; tensor-core ops with
    a global input stage it segment by segment (`seg_staged`); `chain_only`: tiled over the chain blocks."""
    rows: int
    cols: int
    tile_rows: int
    chunk_rows: int
    warps_per_row: int
    flush_chunks: int = 1
    in_smem: bool = True
    seg_staged: bool = False
    chain_only: bool = False

    @property
    def tiles(self) -> int:
        return -(-self.rows // self.tile_rows)


@dataclass(frozen=True)
class AttnPlan:
    splits: int            # KV splits per (sequence, kv head); a sequence uses as many as its keys need
    min_chunk: int         # keys per split at least
    keys_per_slot: int     # cached keys per ring slot (their K rows, then their V rows)
    lanes_per_key: int     # CUDA-core walk: lanes scoring one key together
    key_batch: int         # key groups per warp and softmax update
    pv_unroll: int
    mma: bool              # the key walk on tensor cores
    keys_per_pass: int     # keys all consumer warps score in one softmax update
    prologue_early: bool   # position and RoPE before the QKV wait

    def kv_chunk(self, n_keys: int) -> int:
        """Keys per split for a sequence with n_keys keys; the kernel computes the same (sync.cuh kv_chunk)."""
        return max(self.min_chunk, -(-n_keys // self.splits))


@dataclass(frozen=True)
class SmemLayout:
    """Byte offsets of the block's dynamic shared memory: header (barriers, flags), the weight ring, the
    staged inputs (B x input_len), then one scratch area used in turn by matrix-vector results, attention
    partials and the RMSNorm reduction."""
    ring: int
    ring_stages: int
    slot_bytes: int
    input: int
    input_len: int
    scratch: int
    total: int


@dataclass(frozen=True)
class KernelPlan:
    inputs: KernelInputs
    tuning: Tuning                  # resolved: no None left
    num_blocks: int
    chain_blocks: int               # blocks that run QKV, attention and O; the others prefetch meanwhile
    threads: int
    smem: SmemLayout
    gemv: dict[Op, GemvPlan]
    mma_kseg: int                   # K elements of one row per tensor-core chunk
    mma_row_stride: int             # bytes between a chunk's rows in shared memory
    attn: AttnPlan
    scratch_len: int                # row stride of the global scratch for RMSNorm inputs (0: none)
    lookahead_skip_rows: int        # gate/up rows of a tile its ring holds when the chain ends
    lookahead_rows: int             # gate/up rows of a tile prefetched into L2 past those
    result_floats: int = field(repr=False, default=0)

    @property
    def spec(self):
        return self.inputs.spec

    @property
    def batch(self) -> int:
        return self.inputs.batch

    @property
    def max_seq(self) -> int:
        return self.inputs.max_seq

    @property
    def gpu(self) -> GpuInfo:
        return self.inputs.gpu

    @property
    def helper_blocks(self) -> int:
        return self.num_blocks - self.chain_blocks

    def summary(self) -> dict:
        """The plan as `monokernel compile` prints it and results record it."""
        t, a, m = self.tuning, self.attn, self.smem
        return {"model": self.spec.name, "batch": self.batch, "max_seq": self.max_seq,
                "weights": self.inputs.weights.name, "activations": self.inputs.activations.name,
                "gpu": self.gpu.name, "blocks": self.num_blocks, "chain_blocks": self.chain_blocks,
                "threads": self.threads,
                "smem": {"ring": m.ring, "ring_stages": m.ring_stages, "slot_bytes": m.slot_bytes,
                         "input": m.input, "input_len": m.input_len, "scratch": m.scratch, "total": m.total},
                "scratch_len": self.scratch_len, "gemv_mma": t.gemv_mma, "mma_kseg": self.mma_kseg,
                "attn": {"splits": a.splits, "min_chunk": a.min_chunk, "keys_per_slot": a.keys_per_slot,
                         "key_batch": a.key_batch, "pv_unroll": a.pv_unroll, "mma": a.mma,
                         "prologue_early": a.prologue_early},
                "l2_lookahead_kb": t.l2_lookahead_kb, "lookahead_blocks": self.helper_blocks,
                "helpers_skip": sorted(o.name.lower() for o in t.helpers_skip) if self.helper_blocks else [],
                "lookahead_skip_rows": self.lookahead_skip_rows, "next_step_lookahead": t.next_step_lookahead,
                "gemv": {op.name: dict(g.__dict__) for op, g in self.gemv.items()}}


# ---- the layout: shapes and shared memory for a tuning whose layout knobs are decided ----------------

class _Layout:
    """Shapes and shared-memory offsets for inputs `i` and a tuning `t` whose gemv_mma, slot_bytes and
    l2_lookahead_kb are decided (the attention knobs do not enter the layout)."""

    def __init__(self, i: KernelInputs, t: Tuning):
        self.i, self.t, self.s = i, t, i.spec
        self.num_blocks = i.gpu.sm_count
        self.chain_blocks = self.num_blocks - (t.lookahead_blocks if t.l2_lookahead_kb else 0)
        self.gemv = {op: self._gemv(op) for op in GEMV_OPS}
        self.input_len = self._input_len()
        self.result_floats = self._result_floats()
        inp = i.batch * self.input_len * i.ab
        scratch = max(self.result_floats, attn_floats(i, t), t.consumer_warps * i.batch) * 4
        self.fixed = SMEM_HEADER + inp + scratch
        self.ring_stages = min(t.ring_stages_max, (i.gpu.smem_per_block - self.fixed) // t.slot_bytes)
        self.smem = SmemLayout(ring=SMEM_HEADER, ring_stages=self.ring_stages, slot_bytes=t.slot_bytes,
                               input=SMEM_HEADER + self.ring_stages * t.slot_bytes, input_len=self.input_len,
                               scratch=SMEM_HEADER + self.ring_stages * t.slot_bytes + inp,
                               total=self.fixed + self.ring_stages * t.slot_bytes)

    def chain_only(self, op: Op) -> bool:
        return op in CHAIN_OPS or op in self.t.helpers_skip

    def in_smem(self, op: Op, cols: int) -> bool:
        """An op's input (B x K) lives in shared memory when it fits beside a useful ring. Otherwise the
        RMSNorm ops stage it in a per-block global (L2-resident) scratch, and the O projection and the down
        projection read the attention output and the activations where other blocks wrote them."""
        return self.i.batch * cols * self.i.ab <= self.t.input_smem_budget

    def seg_staged(self, op: Op, cols: int) -> bool:
        """Tensor-core ops whose input lives in global memory: the producer streams their chunks K segment by
        K segment and the consumers stage each input segment once in the shared-memory input area, instead of
        loading the input from L2 inside the mma loop, where each slot waited a round trip (perf note 17)."""
        return self.t.gemv_mma and self.t.seg_staging and not self.in_smem(op, cols)

    def _gemv(self, op: Op) -> GemvPlan:
        s, t, wb = self.s, self.t, self.i.wb
        rows, cols = op_matrix_shape(s, op)
        chain = self.chain_only(op)
        tile = -(-rows // (self.chain_blocks if chain else self.num_blocks))
        extra = dict(in_smem=self.in_smem(op, cols), seg_staged=self.seg_staged(op, cols), chain_only=chain)
        if t.gemv_mma:       # chunks are row groups x K segments; results reduce across warps per group
            tile += tile % 2
            return GemvPlan(rows, cols, tile, MMA_ROWS, 1, **extra)
        chunk = max(1, t.slot_bytes // (cols * wb))
        if op == Op.GATEUP:       # gate/up pairs never straddle a tile or a chunk
            tile += tile % 2
            chunk -= chunk % 2
        chunk = min(chunk, tile)
        wpr = 1 if chunk >= t.consumer_warps else t.consumer_warps // chunk
        return GemvPlan(rows, cols, tile, chunk, wpr, **extra)

    def _input_len(self) -> int:
        """Row stride of the shared-memory input: the widest input that lives there, and at least one K
        segment where a tensor-core op stages its global input there (0: no input lives there)."""
        widest = max((g.cols for g in self.gemv.values() if g.in_smem), default=0)
        if any(g.seg_staged for g in self.gemv.values()):
            return max(widest, -(-mma_kseg(self.i, self.t) // 64) * 64)   # staged rows are whole 128-byte groups
        return widest

    def flush_chunks(self, g: GemvPlan) -> int:
        """Ring chunks whose row results collect in shared memory before one epilogue writes them: the
        epilogue (a barrier and, for residual ops, an L2 round trip) then runs once per task, not per chunk.
        A segment-staged op keeps every row group's per-warp accumulators until its last segment."""
        chunks = -(-g.tile_rows // g.chunk_rows)
        per_chunk = g.warps_per_row * g.chunk_rows * self.i.batch * 4
        budget = result_budget(self.i, self.t)
        if g.seg_staged:
            return max(1, min(chunks, budget // (mma_tile_floats(self.t) * 4 + per_chunk)))
        budget -= self.mma_part_floats * 4 if self.t.gemv_mma else 0
        return max(1, min(chunks, budget // per_chunk))

    @property
    def mma_part_floats(self) -> int:
        # two buffers (alternate row groups), or one per row group of a segment-staged op's flush
        staged = [self.flush_chunks(g) for g in self.gemv.values() if g.seg_staged]
        return max([2] + staged) * mma_tile_floats(self.t)

    def _result_floats(self) -> int:
        res = max(g.chunk_rows * g.warps_per_row * self.flush_chunks(g) for g in self.gemv.values()) * self.i.batch
        return res + (self.mma_part_floats if self.t.gemv_mma else 0)

    # the L2 lookahead's test: does the chain leave HBM idle, and gate/up rows to prefetch?
    @property
    def lookahead_skip_rows(self) -> int:
        """Gate/up rows of a tile that its block's ring already holds when the chain ends: the ring, less the
        O-projection tile it streams first."""
        o = self.gemv[Op.OPROJ]
        ring_left = self.ring_stages * self.t.slot_bytes - o.tile_rows * o.cols * self.i.wb
        return max(0, ring_left) // (self.s.hidden_size * self.i.wb)

    def chain_fits_ring(self) -> bool:
        q, o = self.gemv[Op.QKV], self.gemv[Op.OPROJ]
        return (q.tile_rows * q.cols + o.tile_rows * o.cols) * self.i.wb <= self.ring_stages * self.t.slot_bytes


def op_matrix_shape(s, op: Op) -> tuple[int, int]:
    """(rows, K) of the op's weight matrix per layer (abi.OP_TABLE names the matrices)."""
    return {Op.QKV: (s.qkv_size, s.hidden_size), Op.OPROJ: (s.hidden_size, s.q_size),
            Op.GATEUP: (2 * s.intermediate_size, s.hidden_size), Op.DOWN: (s.hidden_size, s.intermediate_size),
            Op.LMHEAD: (s.vocab_size, s.hidden_size)}[op]


def mma_kseg(i: KernelInputs, t: Tuning) -> int:
    """Elements of one row per tensor-core chunk (a multiple of 32: one warp step covers 32 of K)."""
    s = i.spec
    kmax = max(s.hidden_size, s.q_size, s.intermediate_size)
    return min(t.mma_kseg_max, -(-kmax // 32) * 32)


def mma_row_stride(i: KernelInputs, t: Tuning) -> int:
    # Rows sit 64 bytes off a multiple of 128 apart, so the two rows an 8-lane phase of 16-byte loads
    # touches fall in different banks.
    b = mma_kseg(i, t) * i.wb
    return b + (64 if b % 128 == 0 else 0)


def mma_tile_floats(t: Tuning) -> int:
    return t.consumer_warps * 16 * MMA_ROWS    # every warp's 16 x 8 accumulator tile


def attn_floats(i: KernelInputs, t: Tuning) -> int:
    s = i.spec
    g, d = s.group_size, s.head_dim
    # q (G x D), new k and v (2 x D), per-warp partial (G x (D + 2))
    return g * d + 2 * d + t.consumer_warps * g * (d + 2)


def result_budget(i: KernelInputs, t: Tuning) -> int:
    # the attention partials need this much scratch anyway; results may use as much (at least 8 KiB)
    return max(8 * 1024, attn_floats(i, t) * 4)


def lanes_per_key(i: KernelInputs) -> int:
    """Lanes that score one key together: 16-byte chunks, 8 lanes where a head splits into 8 of them."""
    return 8 if i.spec.head_dim % 64 == 0 else 4


def keys_per_pass(i: KernelInputs, t: Tuning) -> int:
    """Keys all consumer warps score in one pass of the key walk (one softmax update each): a key per lane
    group and key batch, or on tensor cores 8 keys a warp (the N side of the score mma)."""
    if t.attn_mma:
        return t.consumer_warps * MMA_ROWS
    return t.consumer_warps * (32 // lanes_per_key(i)) * t.attn_key_batch


# ---- the derivation rules, in order: each returns the resolved value of one knob ---------------------

def rule_gemv_mma(i: KernelInputs, t: Tuning) -> bool:
    # from batch 3: at batch 8 the CUDA-core path is compute-bound, 4x too slow
    return i.batch > 2


def rule_slot_bytes(i: KernelInputs, t: Tuning) -> int:
    if t.gemv_mma:
        return MMA_ROWS * mma_row_stride(i, t)
    # a slot holds one full row of the widest matrix (two for gate/up pairs); 32 KiB otherwise keeps 6 or so
    # slots in flight, enough bytes to cover HBM latency on one SM
    need = max(i.spec.intermediate_size, 2 * i.spec.hidden_size, i.spec.q_size) * i.wb
    return max(32 * 1024, -(-need // 1024) * 1024)


def _helpers_fit(i: KernelInputs, t: Tuning) -> bool:
    return 1 <= t.lookahead_blocks <= i.gpu.sm_count // 4


def rule_l2_lookahead_kb(i: KernelInputs, t: Tuning) -> int:
    # on where a chain block's QKV and O tiles fit its ring together (the ring is then full and HBM idle
    # through the chain: the 1B preset) and leave gate/up rows to prefetch; measured slower at 8B (note 23)
    if not _helpers_fit(i, t):
        return 0
    lay = _Layout(i, t.replace(l2_lookahead_kb=LOOKAHEAD_KB))
    on = lay.chain_fits_ring() and lay.lookahead_skip_rows < lay.gemv[Op.GATEUP].tile_rows
    return LOOKAHEAD_KB if on else 0


def rule_next_step_lookahead(i: KernelInputs, t: Tuning) -> bool:
    return i.batch > 2          # measured faster from batch 3, neutral at batch 1


def rule_attn_prologue_early(i: KernelInputs, t: Tuning) -> bool:
    return i.batch <= 2         # perf note 24; at batch 8 the registers it holds spill on the 3B preset


def rule_kv_splits(i: KernelInputs, t: Tuning) -> int:
    # no more attention tasks than blocks: one block running two would hold up the whole phase; and none where
    # one task per (sequence, kv head) already keeps a third of the SMs streaming KV rows: those blocks then
    # draw the copy bandwidth between them, and a split would only add the combine's round trips (perf note 20)
    chain = i.gpu.sm_count - (t.lookahead_blocks if t.l2_lookahead_kb else 0)
    per = i.batch * i.spec.num_kv_heads
    splits = 1 if 3 * per >= chain else chain // per
    return max(1, min(64, splits))


def rule_attn_key_batch(i: KernelInputs, t: Tuning) -> int:
    # 2 where 8k-32k contexts make tasks of 512-2048 keys; from batch 3 tasks are short and 1 measured faster
    return 2 if i.batch <= 2 else 1


def rule_attn_mma(i: KernelInputs, t: Tuning) -> bool:
    return i.spec.group_size <= MMA_ROWS     # faster at every batch and context measured (perf note 20)


def rule_min_kv_chunk(i: KernelInputs, t: Tuning) -> int:
    return keys_per_pass(i, t)   # a shorter split idles warps


RULES = (("gemv_mma", rule_gemv_mma), ("slot_bytes", rule_slot_bytes), ("l2_lookahead_kb", rule_l2_lookahead_kb),
         ("next_step_lookahead", rule_next_step_lookahead), ("attn_prologue_early", rule_attn_prologue_early),
         ("kv_splits", rule_kv_splits), ("attn_key_batch", rule_attn_key_batch), ("attn_mma", rule_attn_mma),
         ("min_kv_chunk", rule_min_kv_chunk))


def resolve(i: KernelInputs, t: Tuning) -> Tuning:
    """The tuning with every None replaced by its rule's value, in RULES order."""
    for name, rule in RULES:
        if getattr(t, name) is None:
            t = t.replace(**{name: rule(i, t)})
    missing = t.unresolved()
    assert not missing, f"knobs without a rule: {missing}"
    return t


def _check(i: KernelInputs, t: Tuning, lay: _Layout) -> None:
    s = i.spec
    if t.l2_lookahead_kb and not _helpers_fit(i, t):
        raise UnsupportedModelError(f"lookahead_blocks={t.lookahead_blocks} must be in 1..{i.gpu.sm_count // 4} "
                                    f"(a quarter of the blocks) while l2_lookahead_kb > 0")
    if t.attn_mma and s.group_size > MMA_ROWS:
        raise UnsupportedModelError(f"attn_mma=1 needs at most {MMA_ROWS} query heads per kv head "
                                    f"(the model has {s.group_size}); use attn_mma=0")
    if not 2 <= t.ring_stages_max <= 32:
        raise UnsupportedModelError(f"ring_stages_max={t.ring_stages_max} must be in 2..32 (barriers: 512 bytes)")
    if t.mma_kseg_max < 32 or t.mma_kseg_max % 32:
        raise UnsupportedModelError(f"mma_kseg_max={t.mma_kseg_max} must be a positive multiple of 32")
    if t.attn_key_batch < 1 or t.attn_pv_unroll < 1 or t.min_kv_chunk < 1:
        raise UnsupportedModelError(f"attn_key_batch={t.attn_key_batch}, attn_pv_unroll="
                                    f"{t.attn_pv_unroll} and min_kv_chunk={t.min_kv_chunk} must be at least 1")
    if lay.ring_stages < 2:
        raise UnsupportedModelError(
            f"shared memory too small: {lay.fixed} bytes fixed leave room for {lay.ring_stages} ring slots")


def make_plan(inputs: KernelInputs, tuning: Tuning | None = None) -> KernelPlan:
    t = resolve(inputs, tuning or Tuning())
    lay = _Layout(inputs, t)
    _check(inputs, t, lay)
    gemv = {op: _with_flush(g, lay.flush_chunks(g)) for op, g in lay.gemv.items()}
    kpp = keys_per_pass(inputs, t)
    keys = t.slot_bytes // (2 * inputs.spec.head_dim * inputs.ab)
    # whole passes of the key walk where a slot holds one (a tensor-core slot holds 65 keys of head_dim 128,
    # whose 65th key cost a pass of its own)
    keys = keys - keys % kpp if keys >= kpp else keys
    attn = AttnPlan(splits=t.kv_splits, min_chunk=t.min_kv_chunk, keys_per_slot=keys,
                    lanes_per_key=lanes_per_key(inputs), key_batch=t.attn_key_batch, pv_unroll=t.attn_pv_unroll,
                    mma=t.attn_mma, keys_per_pass=kpp, prologue_early=t.attn_prologue_early)
    return KernelPlan(inputs=inputs, tuning=t, num_blocks=lay.num_blocks, chain_blocks=lay.chain_blocks,
                      threads=(t.consumer_warps + 1) * 32, smem=lay.smem, gemv=gemv,
                      mma_kseg=mma_kseg(inputs, t), mma_row_stride=mma_row_stride(inputs, t), attn=attn,
                      scratch_len=0 if gemv[Op.QKV].in_smem else inputs.spec.hidden_size,
                      lookahead_skip_rows=lay.lookahead_skip_rows,
                      lookahead_rows=t.l2_lookahead_kb * 1024 // (inputs.spec.hidden_size * inputs.wb),
                      result_floats=lay.result_floats)


def _with_flush(g: GemvPlan, fc: int) -> GemvPlan:
    from dataclasses import replace
    return replace(g, flush_chunks=fc)


def plan_for(spec, batch: int, max_seq: int, weights="bf16", activations=None, gpu: GpuInfo | None = None,
             tuning: Tuning | str | None = None, **knobs) -> KernelPlan:
    """One call for scripts and tests: inputs from their parts, tuning as a Tuning, "k=v" text or keywords."""
    if isinstance(tuning, str):
        tuning = Tuning.parse(tuning)
    tuning = (tuning or Tuning()).replace(**knobs) if knobs else tuning
    return make_plan(KernelInputs(spec, batch, max_seq, weights, activations or weights, gpu or GpuInfo()), tuning)
