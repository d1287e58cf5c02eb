"""How a kernel is built: every tuning knob, typed, in one place. `None` means "derive it": the rules
that do live in plan.py, one small function each, applied in a fixed order. A knob is added here (and,
if it has a rule, there) and nowhere else; the plan hands the resolved value to every later stage.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import get_type_hints

from ..errors import UnsupportedModelError
from .tasks import Op


@dataclass(frozen=True)
class Tuning:
    # Consumer warps beside the one producer warp; None: 8, or 7 (8 warps in all: 255 registers a thread
    # instead of 168, schedule/registers.py) where the kernel spills with 8 (codegen/fit.py).
    consumer_warps: int | None = None
    # Bytes of one weight-ring slot; None: one full row of the widest matrix on CUDA cores (at least 32 KiB,
    # about 6 slots in flight), an 8-row chunk of one K segment on tensor cores.
    slot_bytes: int | None = None
    ring_stages_max: int = 8                # perf note 15: more, smaller slots measured no faster
    # Matrix-vector products on tensor cores (mma.sync m16n8k16, the batch as the M side); None: from batch 3.
    gemv_mma: bool | None = None
    mma_kseg_max: int = 2048                # K elements of a row per tensor-core ring chunk
    # The quantised tensor-core loop (gemv_mma.cuh mma_codes_segment), issue- and latency-bound (perf note
    # 30): warp steps unrolled together, each a dependent chain of shared load, unpack, mma and group fold;
    # each segment's scale (and Q4_1 min) table stored XOR-swizzled by row, so the 4 rows 2c a warp reads
    # together (128-byte multiples apart) hit 4 banks instead of one (mma_tiles.py); the bf16 LM head on
    # tensor cores or on CUDA cores (None: where the other ops are, but CUDA cores in the quantised kernels at
    # batch 1-2 the H200 measured faster that way: rules.py, perf note 37).
    mma_code_unroll: int = 2
    mma_scale_swizzle: bool = False
    lmhead_mma: bool | None = None
    input_smem_budget: int = 96 * 1024      # bytes an op's staged input may take in shared memory
    seg_staging: bool = True                # tensor-core ops with a global input stage it K segment-wise
    # Segment staging double-buffered: the next K segment's input copies (cp.async) go out while the current
    # segment's chunks run, so the down projection at batch 8 stops waiting an L2 round trip at each of its
    # segments' starts (perf note 40); the input area then holds two segments. 16-bit weights only. None: on
    # where the area already holds two segments, so the ring keeps its slots (rules.py).
    seg_prefetch: bool | None = None
    # Attention: KV splits per (sequence, kv head) and the fewest keys a split takes; key groups per warp
    # and softmax update; P.V unroll over a group's keys; the key walk on tensor cores; the position and
    # RoPE computed before the QKV wait.
    kv_splits: int | None = None
    min_kv_chunk: int | None = None
    attn_key_batch: int | None = None
    attn_pv_unroll: int = 1
    attn_mma: bool | None = None
    attn_prologue_early: bool | None = None
    # L2 lookahead (perf note 23): KB of each gate/up tile that `lookahead_blocks` helper blocks, kept out of
    # the attention chain, prefetch into L2 while the chain leaves HBM idle; the MLP ops the helpers sit out
    # (perf note 25); each block prefetching its first tile of the next step after the LM head.
    l2_lookahead_kb: int | None = None
    lookahead_blocks: int = 4
    helpers_skip: frozenset[Op] = frozenset({Op.GATEUP, Op.DOWN})
    next_step_lookahead: bool | None = None

    def __post_init__(self):
        hints = get_type_hints(Tuning)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if "bool" in str(hints[f.name]):
                if not isinstance(v, bool) and v not in (0, 1):
                    raise UnsupportedModelError(f"tuning {f.name}={v!r} must be true or false")
                object.__setattr__(self, f.name, bool(v))
            elif f.name == "helpers_skip":
                object.__setattr__(self, f.name, frozenset(Op[o.upper()] if isinstance(o, str) else Op(o) for o in v))
            elif isinstance(v, bool) or not isinstance(v, int):
                raise UnsupportedModelError(f"tuning {f.name}={v!r} must be an integer")

    @classmethod
    def parse(cls, text: str) -> Tuning:
        """Knobs written "k=v,k=v" as the profiling, precompile and sanitizer scripts take them: integers,
        booleans as 0/1, helpers_skip as op names joined by '+' ("gateup+down"; "none" for none)."""
        return cls(**parse_knobs(text))

    def replace(self, **changes) -> Tuning:
        return dataclasses.replace(self, **changes)

    def unresolved(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is None]


def parse_knobs(text: str) -> dict:
    names = {f.name for f in dataclasses.fields(Tuning)}
    out = {}
    for kv in filter(None, text.split(",")):
        k, _, v = kv.partition("=")
        if k not in names:
            raise UnsupportedModelError(f"unknown tuning knob {k!r}; knobs: {', '.join(sorted(names))}")
        if k == "helpers_skip":
            out[k] = frozenset() if v in ("", "none") else frozenset(v.split("+"))
        else:
            out[k] = int(v)
    return out
