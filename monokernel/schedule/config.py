"""KernelConfig: every compile-time choice of one generated kernel, derived from the model, the batch
size and the GPU, and recorded so that a kernel can be reproduced and explained."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnsupportedModelError
from ..models.spec import ModelSpec
from .tasks import GEMV_OPS, Op

DTYPE_BYTES = {"bf16": 2, "fp16": 2}
# Matrix-vector ops that, with the attention, make a layer's latency-bound chain: the L2 lookahead's helper
# blocks leave them to the others (`chain_blocks`).
CHAIN_OPS = (Op.QKV, Op.OPROJ)
MAX_BATCH = 16


@dataclass(frozen=True)
class GpuInfo:
    name: str = "H100"
    sm_count: int = 132
    smem_per_block: int = 227 * 1024   # opt-in dynamic shared memory per block on sm_90
    arch: str = "sm_90a"


@dataclass(frozen=True)
class GemvShape:
    rows: int             # N: output rows of the whole matrix
    cols: int             # K: the input length
    tile_rows: int        # rows per task
    chunk_rows: int       # rows per shared-memory ring slot
    warps_per_row: int    # consumer warps that split one row's K range

    @property
    def tiles(self) -> int:
        return -(-self.rows // self.tile_rows)


def parse_overrides(text: str) -> dict:
    """KernelConfig overrides written "k=v,k=v" (integers; booleans as 0/1), as the profiling and sanitizer
    scripts take them; "" is none."""
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv)}


@dataclass(frozen=True)
class KernelConfig:
    spec: ModelSpec
    batch: int
    max_seq: int
    dtype: str = "bf16"
    gpu: GpuInfo = field(default_factory=GpuInfo)
    consumer_warps: int = 8
    slot_bytes: int = 0          # 0: derived
    kv_splits: int = 0           # 0: derived
    # Keys per split at least this many: short contexts then use few splits, and the combine and the
    # empty split tasks cost nothing for the rest (the split count adapts per step and sequence).
    # -1: derived, the keys one pass of every warp's key groups takes (a shorter split idles warps).
    min_kv_chunk: int = -1
    # Matrix-vector products on tensor cores (mma.sync m16n8k16, the batch as the M side) instead of CUDA
    # cores; -1: derived (from batch 3 on: at batch 8 the CUDA-core path is compute-bound, 4x too slow).
    gemv_mma: int = -1
    # Shared memory an op's staged input may take (bytes); larger inputs are read from global memory.
    input_smem_budget: int = 96 * 1024
    # Attention key walk: key groups per warp and softmax update (a group scores 4 keys at head_dim 64
    # or 128), -1: derived (2 at batch 1-2, where 8k-32k contexts make tasks of 512-2048 keys; 1 from
    # batch 3 on, where tasks are short and the tensor-core kernel is measured a little faster with it);
    # and how far P.V unrolls over a group's keys (more in flight, more registers: at batch 16 the
    # kernel sits at the 168-register cap of 9 warps).
    attn_key_batch: int = -1
    attn_pv_unroll: int = 1
    # Attention key walk on tensor cores (scores and P.V by mma.sync, 8 keys a warp step) instead of lane
    # groups on CUDA cores; needs at most 8 query heads per kv head. -1: derived (on where it can be:
    # faster at every batch and context measured, perf note 20).
    attn_mma: int = -1
    # Tensor-core path: at most this many K elements of a row per ring chunk (8 rows a chunk); and at most
    # this many ring slots (perf note 15: more, smaller slots measured no faster).
    mma_kseg_max: int = 2048
    ring_stages_max: int = 8
    # Tensor-core ops with a global input stage it K segment by K segment in shared memory (see seg_staged).
    seg_staging: int = 1
    # KB of each gate/up tile, past what its block's ring holds when the attention chain ends, that
    # `lookahead_blocks` helper blocks, kept out of the chain, prefetch into L2 while the chain leaves HBM
    # idle (perf note 23). -1: derived, 128 where a block's QKV and O tiles fit its ring together (the ring
    # is then full and HBM idle through the chain: the 1B preset), else 0 (measured slower at 8B).
    l2_lookahead_kb: int = -1
    lookahead_blocks: int = 4
    # Which MLP ops the helper blocks sit out as well (bit 0 gate/up, bit 1 down): their prefetch backlog delays
    # their own loads (task records, counters) by microseconds, so their MLP tiles ended phases last (perf note
    # 25: 3, both, 1B b1 1.015 -> 1.008 ms; 0 gives them the gate/up rows the chain blocks' tiles leave).
    helpers_skip_mlp: int = 3
    # After its last LM-head tile, each block prefetches its first weight tile of the next step into L2.
    # -1: derived, on from batch 3 (measured faster there, neutral at batch 1).
    next_step_lookahead: int = -1
    # An attention task's position, key range and RoPE cosines/sines computed before its wait on the QKV
    # counter, off the critical path (perf note 24). They stay in registers through the wait: -1 derived,
    # on up to batch 2 (at batch 8 the extra registers spill on the 3B preset).
    attn_prologue_early: int = -1

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES:
            raise UnsupportedModelError(f"kernel dtype {self.dtype!r} not supported (use bf16 or fp16)")
        if not 1 <= self.batch <= MAX_BATCH:
            raise UnsupportedModelError(f"batch {self.batch} out of range: the megakernel takes 1..{MAX_BATCH}")
        if self.max_seq > self.spec.max_position_embeddings or self.max_seq < 1:
            raise UnsupportedModelError(
                f"max_seq={self.max_seq} must be in 1..max_position_embeddings={self.spec.max_position_embeddings}")
        s = self.spec
        for name, k in (("hidden_size", s.hidden_size), ("q_size", s.q_size), ("intermediate_size", s.intermediate_size)):
            if k % 8:
                raise UnsupportedModelError(f"{name}={k} must be a multiple of 8 for 16-byte weight loads")
        if self.gemv_mma < 0:
            object.__setattr__(self, "gemv_mma", int(self.batch > 2))
        if self.slot_bytes == 0:
            object.__setattr__(self, "slot_bytes", self._derive_slot_bytes())
        helpers_ok = 1 <= self.lookahead_blocks <= self.gpu.sm_count // 4
        if self.l2_lookahead_kb < 0:
            object.__setattr__(self, "l2_lookahead_kb", self.LOOKAHEAD_KB)   # the tiles as they would be
            # and where a chain block's ring leaves gate/up rows to prefetch (not on the tiny test models)
            on = (helpers_ok and self._chain_fits_ring()
                  and self.lookahead_skip_rows < self.gemv(Op.GATEUP).tile_rows)
            object.__setattr__(self, "l2_lookahead_kb", self.LOOKAHEAD_KB if on else 0)
        if self.l2_lookahead_kb and not helpers_ok:
            raise UnsupportedModelError(f"lookahead_blocks={self.lookahead_blocks} must be in 1..{self.gpu.sm_count // 4} "
                                        f"(a quarter of the blocks) while l2_lookahead_kb > 0")
        if self.next_step_lookahead < 0:
            object.__setattr__(self, "next_step_lookahead", int(self.batch > 2))
        if self.attn_prologue_early < 0:
            object.__setattr__(self, "attn_prologue_early", int(self.batch <= 2))
        if self.kv_splits == 0:
            # no more attention tasks than blocks: one block running two would hold up the whole phase; and
            # none where one task per (sequence, kv head) already keeps a third of the SMs streaming KV rows:
            # those blocks then draw the copy bandwidth between them, and a split would only add the
            # combine's round trips (perf note 20: 8B batch 8, 64 tasks, 1 split 1.7 % faster than 2)
            per = self.batch * s.num_kv_heads
            splits = 1 if 3 * per >= self.chain_blocks else self.chain_blocks // per
            object.__setattr__(self, "kv_splits", max(1, min(64, splits)))
        if self.attn_key_batch < 0:
            object.__setattr__(self, "attn_key_batch", 2 if self.batch <= 2 else 1)
        if self.attn_mma < 0:
            object.__setattr__(self, "attn_mma", int(s.group_size <= self.MMA_ROWS))
        if self.attn_mma and s.group_size > self.MMA_ROWS:
            raise UnsupportedModelError(f"attn_mma=1 needs at most {self.MMA_ROWS} query heads per kv head "
                                        f"(the model has {s.group_size}); use attn_mma=0")
        if self.min_kv_chunk < 0:
            object.__setattr__(self, "min_kv_chunk", self.attn_keys_per_pass)
        if not 2 <= self.ring_stages_max <= 32:
            raise UnsupportedModelError(f"ring_stages_max={self.ring_stages_max} must be in 2..32 (barriers: 512 bytes)")
        if self.mma_kseg_max < 32 or self.mma_kseg_max % 32:
            raise UnsupportedModelError(f"mma_kseg_max={self.mma_kseg_max} must be a positive multiple of 32")
        if self.attn_key_batch < 1 or self.attn_pv_unroll < 1 or self.min_kv_chunk < 1:
            raise UnsupportedModelError(f"attn_key_batch={self.attn_key_batch}, attn_pv_unroll="
                                        f"{self.attn_pv_unroll} and min_kv_chunk={self.min_kv_chunk} must be at least 1")
        if s.head_dim % 32:
            raise UnsupportedModelError(f"head_dim={s.head_dim} must be a multiple of 32 (one warp spans a head)")
        if self.ring_stages < 2:
            raise UnsupportedModelError(
                f"shared memory too small: {self.smem_bytes_fixed} bytes fixed leave room for {self.ring_stages} ring slots")

    def kv_chunk(self, n_keys: int) -> int:
        """Keys per split for a sequence with n_keys keys; the kernel computes the same."""
        return max(self.min_kv_chunk, -(-n_keys // self.kv_splits))

    @property
    def elt(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def num_blocks(self) -> int:
        return self.gpu.sm_count

    @property
    def threads(self) -> int:
        return (self.consumer_warps + 1) * 32   # + one producer warp

    @property
    def attn_lanes_per_key(self) -> int:
        """Lanes that score one key together: 16-byte chunks, 8 lanes where a head splits into 8 of them."""
        return 8 if self.spec.head_dim % 64 == 0 else 4

    @property
    def attn_keys_per_pass(self) -> int:
        """Keys all consumer warps score in one pass of the key walk (one softmax update each): a key per
        lane group and key batch, or on tensor cores 8 keys a warp (the N side of the score mma)."""
        if self.attn_mma:
            return self.consumer_warps * self.MMA_ROWS
        return self.consumer_warps * (32 // self.attn_lanes_per_key) * self.attn_key_batch

    @property
    def attn_keys(self) -> int:
        """Cached keys per ring slot for attention (their K rows, then their V rows): whole passes of the
        key walk where a slot holds one (a tensor-core slot holds 65 keys of head_dim 128, whose 65th key
        cost a pass of its own)."""
        keys = self.slot_bytes // (2 * self.spec.head_dim * self.elt)
        return keys - keys % self.attn_keys_per_pass if keys >= self.attn_keys_per_pass else keys

    # --- tensor-core path: a ring chunk is MMA_ROWS weight rows x one K segment --------------------
    MMA_ROWS = 8     # the N side of m16n8k16

    @property
    def mma_kseg(self) -> int:
        """Elements of one row per chunk (a multiple of 32: one warp step covers 32 of K)."""
        s = self.spec
        kmax = max(s.hidden_size, s.q_size, s.intermediate_size)
        return min(self.mma_kseg_max, -(-kmax // 32) * 32)

    @property
    def mma_row_stride(self) -> int:
        # Rows sit 64 bytes off a multiple of 128 apart, so the two rows an 8-lane phase of 16-byte loads
        # touches fall in different banks.
        b = self.mma_kseg * self.elt
        return b + (64 if b % 128 == 0 else 0)

    def _derive_slot_bytes(self) -> int:
        if self.gemv_mma:
            return self.MMA_ROWS * self.mma_row_stride
        # A slot must hold one full row of the widest matrix (two for gate/up pairs); 32 KiB otherwise keeps
        # 6 or so slots in flight, enough bytes to cover HBM latency on one SM.
        need = max(self.spec.intermediate_size, 2 * self.spec.hidden_size, self.spec.q_size) * self.elt
        return max(32 * 1024, -(-need // 1024) * 1024)

    # --- matrix-vector shapes, one per op ---------------------------------------------------
    def gemv(self, op: Op) -> GemvShape:
        s = self.spec
        rows, cols = {
            Op.QKV: (s.qkv_size, s.hidden_size),
            Op.OPROJ: (s.hidden_size, s.q_size),
            Op.GATEUP: (2 * s.intermediate_size, s.hidden_size),
            Op.DOWN: (s.hidden_size, s.intermediate_size),
            Op.LMHEAD: (s.vocab_size, s.hidden_size),
        }[op]
        row_bytes = cols * self.elt
        tile = -(-rows // (self.chain_blocks if self.chain_only(op) else self.num_blocks))
        if self.gemv_mma:       # chunks are row groups x K segments; results reduce across warps per group
            tile += tile % 2
            return GemvShape(rows=rows, cols=cols, tile_rows=tile, chunk_rows=self.MMA_ROWS, warps_per_row=1)
        chunk = max(1, self.slot_bytes // row_bytes)
        if op == Op.GATEUP:       # gate/up pairs never straddle a tile or a chunk
            tile += tile % 2
            chunk -= chunk % 2
        chunk = min(chunk, tile)
        wpr = 1 if chunk >= self.consumer_warps else self.consumer_warps // chunk
        return GemvShape(rows=rows, cols=cols, tile_rows=tile, chunk_rows=chunk, warps_per_row=wpr)

    # --- L2 lookahead of the gate/up rows during the attention chain (see build.lookahead_tasks) -----
    @property
    def lookahead_skip_rows(self) -> int:
        """Gate/up rows of a tile that its block's ring already holds when the chain ends: the ring, less the
        O-projection tile it streams first."""
        o = self.gemv(Op.OPROJ)
        ring_left = self.ring_stages * self.slot_bytes - o.tile_rows * o.cols * self.elt
        return max(0, ring_left) // (self.spec.hidden_size * self.elt)

    LOOKAHEAD_KB = 128   # perf note 23: 1B b1 1.058 -> 1.033 ms; 160 KB outran the helpers' issue rate

    def _chain_fits_ring(self) -> bool:
        q, o = self.gemv(Op.QKV), self.gemv(Op.OPROJ)
        return (q.tile_rows * q.cols + o.tile_rows * o.cols) * self.elt <= self.ring_stages * self.slot_bytes

    def chain_only(self, op: Op) -> bool:
        """Whether the op's tiles go to the chain blocks only (the helpers, when there are any, sit it out)."""
        skip = {Op.GATEUP: 1, Op.DOWN: 2}.get(op, 0) & self.helpers_skip_mlp
        return op in CHAIN_OPS or bool(skip)

    @property
    def chain_blocks(self) -> int:
        """Blocks that run the QKV, attention and O-projection tasks; the others prefetch meanwhile."""
        return self.num_blocks - (self.lookahead_blocks if self.l2_lookahead_kb else 0)

    @property
    def lookahead_rows(self) -> int:
        return self.l2_lookahead_kb * 1024 // (self.spec.hidden_size * self.elt)

    # --- shared memory layout (bytes) ----------------------------------------------------------
    def op_input_in_smem(self, op: Op) -> bool:
        """An op's input (B x K) lives in shared memory when it fits beside a useful ring. Otherwise the
        RMSNorm ops stage it in a per-block global (L2-resident) scratch, and the O projection and the down
        projection read the attention output and the activations where other blocks wrote them."""
        return self.batch * self.gemv(op).cols * self.elt <= self.input_smem_budget

    @property
    def input_len(self) -> int:
        """Row stride of the shared-memory input: the widest input that lives there, and at least one K
        segment where a tensor-core op stages its global input there (0: no input lives there)."""
        widest = max((self.gemv(op).cols for op in GEMV_OPS if self.op_input_in_smem(op)), default=0)
        if any(self.seg_staged(op) for op in GEMV_OPS):
            return max(widest, -(-self.mma_kseg // 64) * 64)   # staged rows are whole 128-byte groups
        return widest

    @property
    def scratch_len(self) -> int:
        """Row stride of the global scratch for RMSNorm inputs that do not fit in shared memory (0: none)."""
        return 0 if self.op_input_in_smem(Op.QKV) else self.spec.hidden_size

    def seg_staged(self, op: Op) -> bool:
        """Tensor-core ops whose input lives in global memory: the producer streams their chunks K segment by
        K segment (all row groups of a flush per segment) and the consumers stage each input segment once in
        the shared-memory input area, instead of loading the input from L2 inside the mma loop, where each
        slot waited a round trip. The area is the one the other ops' inputs use, or, where no input fits in
        shared memory (8B at batch 16), one segment wide (perf note 17)."""
        return bool(self.gemv_mma) and bool(self.seg_staging) and not self.op_input_in_smem(op)

    def flush_chunks(self, op: Op) -> int:
        """Ring chunks whose row results collect in shared memory before one epilogue writes them: the
        epilogue (a barrier and, for residual ops, an L2 round trip) then runs once per task, not per chunk.
        A segment-staged op keeps every row group's per-warp accumulators until its last segment."""
        g = self.gemv(op)
        chunks = -(-g.tile_rows // g.chunk_rows)
        per_chunk = g.warps_per_row * g.chunk_rows * self.batch * 4
        if self.seg_staged(op):
            return max(1, min(chunks, self.result_budget // (self._mma_tile_floats * 4 + per_chunk)))
        budget = self.result_budget - (self.mma_part_floats * 4 if self.gemv_mma else 0)
        return max(1, min(chunks, budget // per_chunk))

    @property
    def _mma_tile_floats(self) -> int:
        return self.consumer_warps * 16 * self.MMA_ROWS    # every warp's 16 x 8 accumulator tile

    @property
    def mma_part_floats(self) -> int:
        # two buffers (alternate row groups), or one per row group of a segment-staged op's flush
        staged = [self.flush_chunks(op) for op in GEMV_OPS if self.seg_staged(op)]
        return max([2] + staged) * self._mma_tile_floats

    @property
    def result_budget(self) -> int:
        # the attention partials need this much scratch anyway; results may use as much (at least 8 KiB)
        return max(8 * 1024, self.attn_floats * 4)

    @property
    def result_floats(self) -> int:
        res = max(self.gemv(op).chunk_rows * self.gemv(op).warps_per_row * self.flush_chunks(op)
                  for op in GEMV_OPS) * self.batch
        return res + (self.mma_part_floats if self.gemv_mma else 0)

    @property
    def attn_floats(self) -> int:
        s = self.spec
        g, d = s.group_size, s.head_dim
        # q (G x D), new k and v (2 x D), per-warp partial (G x (D + 2))
        return g * d + 2 * d + self.consumer_warps * g * (d + 2)

    @property
    def smem_bytes_fixed(self) -> int:
        inp = self.batch * self.input_len * self.elt
        # one scratch area, used in turn by: matrix-vector results, attention partials and the RMSNorm
        # reduction (NCW x B)
        scratch = max(self.result_floats, self.attn_floats, self.consumer_warps * self.batch) * 4
        return 1024 + inp + scratch      # 1 KiB: barriers, flags and alignment padding

    @property
    def ring_stages(self) -> int:
        return min(self.ring_stages_max, (self.gpu.smem_per_block - self.smem_bytes_fixed) // self.slot_bytes)

    @property
    def smem_bytes(self) -> int:
        return self.smem_bytes_fixed + self.ring_stages * self.slot_bytes

    def summary(self) -> dict:
        return {"model": self.spec.name, "batch": self.batch, "max_seq": self.max_seq, "dtype": self.dtype,
                "gpu": self.gpu.name, "blocks": self.num_blocks, "threads": self.threads,
                "slot_bytes": self.slot_bytes, "ring_stages": self.ring_stages, "smem_bytes": self.smem_bytes,
                "input_len": self.input_len, "scratch_len": self.scratch_len, "kv_splits": self.kv_splits,
                "attn_keys": self.attn_keys, "attn_key_batch": self.attn_key_batch, "min_kv_chunk": self.min_kv_chunk,
                "attn_pv_unroll": self.attn_pv_unroll, "attn_mma": bool(self.attn_mma), "gemv_mma": bool(self.gemv_mma),
                "l2_lookahead_kb": self.l2_lookahead_kb, "lookahead_blocks": self.lookahead_blocks if self.l2_lookahead_kb else 0,
                "helpers_skip_mlp": self.helpers_skip_mlp if self.l2_lookahead_kb else 0,
                "lookahead_skip_rows": self.lookahead_skip_rows, "next_step_lookahead": bool(self.next_step_lookahead),
                "attn_prologue_early": bool(self.attn_prologue_early),
                "gemv": {op.name: dict(self.gemv(op).__dict__, flush_chunks=self.flush_chunks(op),
                                       seg_staged=self.seg_staged(op))
                         for op in GEMV_OPS}}
