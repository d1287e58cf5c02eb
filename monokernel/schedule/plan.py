"""KernelPlan: every number one generated kernel is built from, computed once from `KernelInputs` and a
`Tuning`, frozen, and handed whole to the schedule, the code generator, the runtime and the simulator.

`make_plan` resolves the tuning's `None`s (rules.py), lays the kernel out (layout.py), checks the result and
freezes it. The only rule that needs a layout to decide is the L2 lookahead's: it lays the kernel out as it
would be with the lookahead on and keeps it only where that layout leaves HBM idle through the attention chain.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import UnsupportedModelError
from .inputs import GpuInfo, KernelInputs
from .layout import MMA_ROWS, GemvPlan, Layout, SmemLayout, is_fp8, keys_per_pass, lanes_per_key, mma_kseg, mma_row_stride
from .rules import helpers_fit, mma_only, mma_quantised_fits, resolve
from .tasks import Op
from .tuning import Tuning


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
        return {"model": self.spec.name, "batch": self.batch, "tokens_per_seq": self.inputs.tokens_per_seq,
                "max_seq": self.max_seq,
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


def _check(i: KernelInputs, t: Tuning, lay: Layout) -> None:
    s = i.spec
    if t.l2_lookahead_kb and not helpers_fit(i, t):
        raise UnsupportedModelError(f"lookahead_blocks={t.lookahead_blocks} must be in 1..{i.gpu.sm_count // 4} "
                                    f"(a quarter of the blocks) while l2_lookahead_kb > 0")
    if t.attn_mma and s.group_size > MMA_ROWS:
        raise UnsupportedModelError(f"attn_mma=1 needs at most {MMA_ROWS} query heads per kv head "
                                    f"(the model has {s.group_size}); use attn_mma=0")
    if not 2 <= t.ring_stages_max <= 32:
        raise UnsupportedModelError(f"ring_stages_max={t.ring_stages_max} must be in 2..32 (barriers: 512 bytes)")
    if mma_only(i) and not is_fp8(i) and not t.gemv_mma:    # fp8's refusal follows its K check below
        raise UnsupportedModelError(f"{mma_only(i)} run on the tensor-core path only; use gemv_mma=1 (the default)")
    if is_fp8(i) and not mma_quantised_fits(i):
        raise UnsupportedModelError("fp8 weights need every layer matrix's K to be a multiple of 32 (the tensor-core "
                                    "path's 8 codes a lane); use engine='reference'")
    if is_fp8(i) and not t.gemv_mma:
        raise UnsupportedModelError("fp8 weights run on the tensor-core path only; use gemv_mma=1 (the default)")
    if t.gemv_mma and i.weights.quantised and not mma_quantised_fits(i):
        raise UnsupportedModelError(f"gemv_mma=1 with {i.weights.name} weights needs every layer matrix's K to be a "
                                    "multiple of 32 (8 codes a lane); use gemv_mma=0")
    if t.lmhead_mma and not t.gemv_mma:
        raise UnsupportedModelError("lmhead_mma=1 needs gemv_mma=1: a CUDA-core kernel has no tensor-core LM head")
    if not 1 <= t.mma_code_unroll <= 8:
        raise UnsupportedModelError(f"mma_code_unroll={t.mma_code_unroll} must be in 1..8 (warp steps of the "
                                    "quantised tensor-core loop unrolled together)")
    if t.mma_scale_swizzle and not (t.gemv_mma and i.weights.quantised and i.weights.group_size):
        raise UnsupportedModelError("mma_scale_swizzle=1 needs weights with a scale a group on tensor cores "
                                    f"(gemv_mma=1); {i.weights.name} with gemv_mma={int(t.gemv_mma)} has none")
    if t.seg_prefetch and i.weights.quantised:
        raise UnsupportedModelError(f"seg_prefetch=1 needs 16-bit weights: a {i.weights.name} kernel sizes its staged "
                                    "segments to the whole input area; use seg_prefetch=0")
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
    lay = Layout(inputs, t)
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
                      lookahead_rows=t.l2_lookahead_kb * 1024 // inputs.code_row_bytes(Op.GATEUP),
                      result_floats=lay.result_floats)


def _with_flush(g: GemvPlan, fc: int) -> GemvPlan:
    return replace(g, flush_chunks=fc)


def plan_for(spec, batch: int, max_seq: int, weights="bf16", activations=None, gpu: GpuInfo | None = None,
             tuning: Tuning | str | None = None, tokens_per_seq: int = 1, **knobs) -> KernelPlan:
    """One call for scripts and tests: inputs from their parts, tuning as a Tuning, "k=v" text or keywords."""
    if isinstance(tuning, str):
        tuning = Tuning.parse(tuning)
    tuning = (tuning or Tuning()).replace(**knobs) if knobs else tuning
    return make_plan(KernelInputs(spec, batch, max_seq, weights, activations or weights, gpu or GpuInfo(),
                                  tokens_per_seq), tuning)
