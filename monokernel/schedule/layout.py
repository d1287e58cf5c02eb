"""The layout of one kernel: per-op matrix-vector shapes and the block's shared memory, for inputs and a
tuning whose layout knobs (gemv_mma, slot_bytes, l2_lookahead_kb) are decided. plan.py freezes the result;
rules.py asks it once, for the L2 lookahead's rule."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError
from ..gumbel import TOP_CANDIDATES
from ..models.formats import FORMATS
from .abi import op_matrix_shape
from .inputs import KernelInputs
from .tasks import GEMV_OPS, Op
from .tuning import Tuning

# Matrix-vector ops that, with the attention, make a layer's latency-bound chain: the L2 lookahead's helper
# blocks leave them to the others (`chain_blocks`).
CHAIN_OPS = (Op.QKV, Op.OPROJ)
MMA_ROWS = 8          # the N side of m16n8k16: weight rows of one tensor-core ring chunk
SMEM_HEADER = 1024    # barriers, flags and alignment padding at the start of shared memory
ABORT_FLAG = 512      # past the barriers of up to 32 slots (ring_stages_max), in the header
SWIZZLE_SPAN = 64     # mma_scale_swizzle: 4 pieces of 16 bytes, one per bank quarter, the rows' keys permute


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
    seg_major: bool = False   # tensor cores: chunks segment-major over a flush, one cross-warp reduction a flush
    chain_only: bool = False
    scaled: bool = False      # int8 codes times a scale a row
    code_bits: int = 16       # bits of one stored weight
    code_row_bytes: int = 0   # bytes of one row's codes
    scale_row_bytes: int = 0  # bytes of one row's group scales after a chunk's codes in a slot (int4)
    group: int = 0            # weights sharing one of those scales
    # tensor-core ops: K elements of one ring chunk's rows, bytes between them in the slot, stored bytes of a
    # full segment; quantised ones keep each segment's group scales after its codes (mma_tiles.py), and
    # `sblock` is the K one warp step covers (4 lanes x one load of codes)
    kseg: int = 0
    row_stride: int = 0
    seg_bytes: int = 0
    sblock: int = 0
    zero_points: bool = False   # int4 with a zero point a group (two a byte after each segment's scales)
    fp8: bool = False           # the 8-bit codes are e4m3 values, not integers
    mins: bool = False          # w = d*q + m (GGUF Q4_1): a float min a group after each segment's scales
    # each segment's scale (and min) table padded to 64 bytes and its 16-byte pieces XOR-swizzled by the row's
    # (row // 2) % 4 (mma_tiles.py), so the rows 2c a warp reads scales from together fall in different banks
    scale_swizzle: bool = False

    @property
    def tiles(self) -> int:
        return -(-self.rows // self.tile_rows)

    @property
    def on_tensor_cores(self) -> bool:
        return self.kseg > 0


@dataclass(frozen=True)
class SmemLayout:
    """Byte offsets of the block's dynamic shared memory: header (barriers, flags), the weight ring, the
    staged inputs (B x input_len), then one scratch area used in turn by matrix-vector results, attention
    partials and the RMSNorm reduction."""
    full_bars: int        # an mbarrier (8 bytes) per ring slot: filled
    empty_bars: int       # and one per slot: consumed
    abort_flag: int       # the consumers' "a wait failed" flag
    ring: int
    ring_stages: int
    slot_bytes: int
    input: int
    input_len: int
    scratch: int
    total: int


class Layout:
    """Shapes and shared-memory offsets for inputs `i` and a tuning `t` whose gemv_mma, slot_bytes and
    l2_lookahead_kb are decided (the attention knobs do not enter the layout)."""

    def __init__(self, i: KernelInputs, t: Tuning):
        self.i, self.t, self.s = i, t, i.spec
        self.num_blocks = i.gpu.sm_count
        self.chain_blocks = chain_blocks(i, t)
        self.gemv = {op: self._gemv(op) for op in GEMV_OPS}
        self.input_len = self._input_len()
        self.result_floats = self._result_floats()
        inp = i.batch * self.input_len * i.ab
        # the LM head's top-k/top-p candidates: 2 x TOP_CANDIDATES 8-byte keys a warp (topk.cuh)
        keep = t.consumer_warps * 4 * TOP_CANDIDATES
        scratch = max(self.result_floats, attn_floats(i, t), t.consumer_warps * i.batch, keep) * 4
        self.fixed = SMEM_HEADER + inp + scratch
        self.ring_stages = min(t.ring_stages_max, (i.gpu.smem_per_block - self.fixed) // t.slot_bytes)
        self.smem = SmemLayout(full_bars=0, empty_bars=8 * self.ring_stages, abort_flag=ABORT_FLAG,
                               ring=SMEM_HEADER, ring_stages=self.ring_stages, slot_bytes=t.slot_bytes,
                               input=SMEM_HEADER + self.ring_stages * t.slot_bytes, input_len=self.input_len,
                               scratch=SMEM_HEADER + self.ring_stages * t.slot_bytes + inp,
                               total=self.fixed + self.ring_stages * t.slot_bytes)

    def chain_only(self, op: Op) -> bool:
        return op in CHAIN_OPS or op in self.t.helpers_skip

    def in_smem(self, op: Op, cols: int) -> bool:
        return input_in_smem(self.i, self.t, cols)

    def seg_staged(self, op: Op, cols: int) -> bool:
        return seg_staged(self.i, self.t, cols)

    def _gemv(self, op: Op) -> GemvPlan:
        s, t, i = self.s, self.t, self.i
        rows, cols = op_matrix_shape(s, op)
        chain = self.chain_only(op)
        tile = -(-rows // (self.chain_blocks if chain else self.num_blocks))
        dense = op == Op.LMHEAD or not i.weights.quantised
        extra = dict(in_smem=self.in_smem(op, cols), seg_staged=self.seg_staged(op, cols), chain_only=chain,
                     scaled=i.scaled and op != Op.LMHEAD,
                     code_bits=8 * i.ab if dense else i.weights.bits, code_row_bytes=i.code_row_bytes(op),
                     scale_row_bytes=i.scale_row_bytes(op), group=0 if dense else i.weights.group_size)
        if t.gemv_mma and (op != Op.LMHEAD or t.lmhead_mma):   # row groups x K segments, reduced per group
            tile += tile % 2
            seg = MmaSegments(i, t, op)
            if not dense:    # the segments' scales ride inside the stored rows: no scale copies of their own
                extra.update(code_row_bytes=seg.stored_row_bytes, scale_row_bytes=0)
            extra["seg_major"] = extra["seg_staged"] or i.weights.quantised
            return GemvPlan(rows, cols, tile, MMA_ROWS, 1, kseg=seg.kseg, row_stride=seg.row_stride,
                            seg_bytes=seg.seg_bytes(seg.kseg), sblock=0 if dense else seg.sblock,
                            zero_points=not dense and i.weights.zero == "int", fp8=not dense and is_fp8(i),
                            mins=not dense and i.weights.zero == "min", scale_swizzle=seg.swizzle, **extra)
        chunk = max(1, t.slot_bytes // i.row_bytes(op))
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
            # staged rows are whole 128-byte groups; seg_prefetch stages the next segment beside the current one
            return max(widest, staged_buffers(self.t) * (-(-mma_kseg(self.i, self.t) // 64) * 64))
        return widest

    def flush_chunks(self, g: GemvPlan) -> int:
        """Ring chunks whose row results collect in shared memory before one epilogue writes them: the
        epilogue (a barrier and, for residual ops, an L2 round trip) then runs once per task, not per chunk.
        A segment-staged op keeps every row group's per-warp accumulators until its last segment."""
        chunks = -(-g.tile_rows // g.chunk_rows)
        per_chunk = g.warps_per_row * g.chunk_rows * self.i.batch * 4
        budget = result_budget(self.i, self.t)
        if g.seg_major:
            return max(1, min(chunks, budget // (mma_tile_floats(self.t) * 4 + per_chunk)))
        if g.on_tensor_cores:
            budget -= self.mma_part_floats * 4
        elif self.t.gemv_mma:    # a CUDA-core op of a tensor-core kernel (lmhead_mma=0): the scratch those take
            budget = self._mma_result_floats() * 4
        return max(1, min(chunks, budget // per_chunk))

    @property
    def mma_part_floats(self) -> int:
        # two buffers (alternate row groups), or one per row group of a segment-major op's flush
        major = [self.flush_chunks(g) for g in self.gemv.values() if g.seg_major]
        return max([2] + major) * mma_tile_floats(self.t)

    def _op_result_floats(self, mma: bool) -> int:
        return max((g.chunk_rows * g.warps_per_row * self.flush_chunks(g) for g in self.gemv.values()
                    if g.on_tensor_cores == mma), default=0) * self.i.batch

    def _mma_result_floats(self) -> int:
        return self._op_result_floats(True) + (self.mma_part_floats if self.t.gemv_mma else 0)

    def _result_floats(self) -> int:
        # a CUDA-core op's results (the LM head of a tensor-core kernel, lmhead_mma=0) take the scratch from its
        # start, no more than the tensor-core ops' (flush_chunks): their accumulators are not live then
        return max(self._mma_result_floats(), self._op_result_floats(False))

    # the L2 lookahead's test: does the chain leave HBM idle, and gate/up rows to prefetch?
    @property
    def lookahead_skip_rows(self) -> int:
        """Gate/up rows of a tile that its block's ring already holds when the chain ends: the ring, less the
        O-projection tile it streams first."""
        o = self.gemv[Op.OPROJ]
        ring_left = self.ring_stages * self.t.slot_bytes - o.tile_rows * self.i.row_bytes(Op.OPROJ)
        return max(0, ring_left) // self.i.row_bytes(Op.GATEUP)

    def chain_fits_ring(self) -> bool:
        q, o = self.gemv[Op.QKV], self.gemv[Op.OPROJ]
        return (q.tile_rows * self.i.row_bytes(Op.QKV) + o.tile_rows * self.i.row_bytes(Op.OPROJ)
                <= self.ring_stages * self.t.slot_bytes)


def chain_blocks(i: KernelInputs, t: Tuning) -> int:
    """Blocks that run QKV, attention and O: all, less the lookahead's helpers where it is on."""
    return i.gpu.sm_count - (t.lookahead_blocks if t.l2_lookahead_kb else 0)


def mma_kseg(i: KernelInputs, t: Tuning) -> int:
    """Elements of one row per tensor-core chunk (a multiple of 32: one warp step covers 32 of K)."""
    s = i.spec
    kmax = max(s.hidden_size, s.q_size, s.intermediate_size)
    return min(t.mma_kseg_max, -(-kmax // 32) * 32)


def banked_stride(b: int) -> int:
    # Rows sit 64 bytes off a multiple of 128 apart, so the two rows an 8-lane phase of 16-byte loads
    # touches fall in different banks.
    return b + (64 - b) % 128


def mma_row_stride(i: KernelInputs, t: Tuning) -> int:
    """Row stride of a dense (16-bit) tensor-core chunk: MMA_KSEG elements."""
    return banked_stride(mma_kseg(i, t) * 2)


class MmaSegments:
    """How one op's rows split into tensor-core ring chunks: K segments of `kseg` elements. A bf16 plan keeps
    MMA_KSEG for every op. A quantised plan sizes every op's segment to the same bytes a row (its narrowest
    layer matrix's row, at least 2 KB: 4096 int4 codes, and the bf16 LM head 1024 elements), so every chunk
    fills its slot; each segment stores its groups' scales after its codes, padded to 16 bytes (the bulk
    copy's unit), then its zero points or mins where the format has them: one copy a row and segment. A
    staged op's segment fits the staged input area."""

    def __init__(self, i: KernelInputs, t: Tuning, op: Op):
        self.i, self.op = i, op
        self.k = op_matrix_shape(i.spec, op)[1]
        self.dense = op == Op.LMHEAD or not i.weights.quantised
        self.bits = 16 if self.dense else i.weights.bits
        self.sblock = mma_sblock(i, op)
        self.swizzle = t.mma_scale_swizzle and not self.dense and bool(i.weights.group_size)
        if not i.weights.quantised:
            self.kseg, self.row_stride = min(self.k, mma_kseg(i, t)), mma_row_stride(i, t)
            return
        staged = seg_staged(i, t, self.k)
        base = quantised_seg_bytes(i, t) * 8 // self.bits
        if staged:
            base = min(base, staged_capacity(i, t))
        self.kseg = min(self.k, max(self.sblock, base // self.sblock * self.sblock))
        if staged and self.kseg > staged_capacity(i, t):
            raise UnsupportedModelError(f"mma_kseg_max={t.mma_kseg_max} is shorter than one warp step of {op.name} "
                                        f"({self.sblock} of {i.weights.name}); raise it")
        self.row_stride = banked_stride(self.seg_bytes(self.kseg))

    def scale_bytes(self, klen: int) -> int:
        g = self.i.weights.group_size
        if self.dense or not g:
            return 0
        n = klen // g * FORMATS[self.i.weights.scale_format].element_bytes
        return -(-n // SWIZZLE_SPAN) * SWIZZLE_SPAN if self.swizzle else whole_copies(n)

    def zero_bytes(self, klen: int) -> int:
        """A segment's zero points, two a byte, padded to 16 (integer-zero int4: GPTQ asym, AWQ), or its float
        mins in the scale format, padded to 16 (GGUF Q4_1)."""
        f = self.i.weights
        if self.dense or not f.zero:
            return 0
        if f.zero == "min":
            return self.scale_bytes(klen)
        return whole_copies(-(-(klen // f.group_size) // 2))

    def seg_bytes(self, klen: int) -> int:
        return klen * self.bits // 8 + self.scale_bytes(klen) + self.zero_bytes(klen)

    @property
    def lengths(self) -> list[int]:
        return [min(self.kseg, self.k - k0) for k0 in range(0, self.k, self.kseg)]

    @property
    def stored_row_bytes(self) -> int:
        return sum(self.seg_bytes(n) for n in self.lengths)


def quantised_seg_bytes(i: KernelInputs, t: Tuning) -> int:
    rows = [op_matrix_shape(i.spec, op)[1] * i.weights.bits // 8 for op in (Op.QKV, Op.OPROJ, Op.GATEUP, Op.DOWN)]
    return min(t.mma_kseg_max * 2, max(2048, min(rows)))


def staged_capacity(i: KernelInputs, t: Tuning) -> int:
    """K elements a staged input segment may take: the input area (Layout._input_len) of the ops that fit."""
    widest = max((k for k in (op_matrix_shape(i.spec, op)[1] for op in GEMV_OPS) if input_in_smem(i, t, k)),
                 default=0)
    return max(widest, -(-mma_kseg(i, t) // 64) * 64)


def input_in_smem(i: KernelInputs, t: Tuning, cols: int) -> bool:
    """An op's input (B x K) lives in shared memory when it fits beside a useful ring. Otherwise the RMSNorm
    ops stage it in a per-block global (L2-resident) scratch, and the O projection and the down projection
    read the attention output and the activations where other blocks wrote them."""
    return i.batch * cols * i.ab <= t.input_smem_budget


def seg_staged(i: KernelInputs, t: Tuning, cols: int) -> bool:
    """Tensor-core ops whose input lives in global memory: the producer streams their chunks K segment by K
    segment and the consumers stage each input segment once in the shared-memory input area, instead of
    loading the input from L2 inside the mma loop, where each slot waited a round trip (perf note 17)."""
    return t.gemv_mma and t.seg_staging and not input_in_smem(i, t, cols)


def staged_buffers(t: Tuning) -> int:
    """Input segments the staged input area holds: the current one, and with seg_prefetch the next one."""
    return 2 if t.seg_prefetch else 1


def whole_copies(nbytes: int) -> int:
    """Bytes rounded up to the bulk copy's 16-byte unit."""
    return -(-nbytes // 16) * 16


def is_fp8(i: KernelInputs) -> bool:
    return i.weights.quantised and i.weights.torch_dtype == torch.float8_e4m3fn


def mma_sblock(i: KernelInputs, op: Op) -> int:
    """K one warp step of a quantised tensor-core op covers: its 4 lanes (c = lane % 4) each load 16 bytes of
    codes (32 int4, 16 int8) where K allows, 8 or 4 bytes where K is only a multiple of 64 or 32."""
    k = op_matrix_shape(i.spec, op)[1]
    if op == Op.LMHEAD or not i.weights.quantised:
        return 32
    per = 4 * 128 // i.weights.bits
    while k % per and per > 32:
        per //= 2
    return per


def mma_slot_bytes(i: KernelInputs, t: Tuning) -> int:
    """A tensor-core slot: 8 rows of the widest op's segment."""
    return MMA_ROWS * max(MmaSegments(i, t, op).row_stride for op in GEMV_OPS)


def mma_tile_floats(t: Tuning) -> int:
    return t.consumer_warps * 16 * MMA_ROWS    # every warp's 16 x 8 accumulator tile


def attn_floats(i: KernelInputs, t: Tuning) -> int:
    s = i.spec
    g, d, vt = s.group_size, s.head_dim, i.tokens_per_seq
    # q (G x D), new keys and values (2 x VT x D), per-warp partials (G x (D + 2)), where the walk first finds
    # the new keys and values in the model dtype (VT x D floats' worth)
    return g * d + 2 * vt * d + max(t.consumer_warps * g * (d + 2), vt * d)


def result_budget(i: KernelInputs, t: Tuning) -> int:
    # the attention partials need this much scratch anyway; results may use as much (at least 8 KiB), and a
    # quantised kernel's segment-major flushes 32 KiB (8 row groups of accumulators a flush at 7 warps)
    least = 32 * 1024 if i.weights.quantised and t.gemv_mma else 8 * 1024
    return max(least, attn_floats(i, t) * 4)


def lanes_per_key(i: KernelInputs) -> int:
    """Lanes that score one key together: 16-byte chunks, 8 lanes where a head splits into 8 of them."""
    return 8 if i.spec.head_dim % 64 == 0 else 4


def keys_per_pass(i: KernelInputs, t: Tuning) -> int:
    """Keys all consumer warps score in one pass of the key walk (one softmax update each): a key per lane
    group and key batch, or on tensor cores 8 keys a warp (the N side of the score mma)."""
    if t.attn_mma:
        return t.consumer_warps * MMA_ROWS
    return t.consumer_warps * (32 // lanes_per_key(i)) * t.attn_key_batch
