"""The one definition of everything Python and the generated CUDA must agree on: the parameter struct (with
each buffer's shape, so the decoder and the simulator allocate by looping over it), the error codes, the
kernel's name, the task record's width and the profile record's. config.cuh.j2 renders the C++ side from
here; ctypes mirrors the struct; nothing is kept in step by hand.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..gumbel import SAMPLE_WORDS, TOP_CANDIDATES
from .tasks import TASK_FIELDS, Op

KERNEL_NAME = "monokernel_decode_step"
TASK_WORDS = len(TASK_FIELDS)     # int32 words of one task record
PROFILE_STAMPS = 3                # globaltimer stamps a task: wait start, work start, end


@dataclass(frozen=True)
class GemvOp:
    """What one matrix-vector op reads, in the names of Params and of the kernel's shape constants: the weight
    matrix (`rows` x `k` a layer), the input it multiplies (RMSNorm'd by `norm` where given, else read as it
    is), and the residual added to its output."""
    weight: str
    rows: str
    k: str
    input: str
    norm: str | None = None
    residual: str | None = None


OP_TABLE: dict[Op, GemvOp] = {
    Op.QKV: GemvOp("w_qkv", "QKV", "H", "x", norm="attn_norm"),
    Op.OPROJ: GemvOp("w_o", "H", "QSIZE", "attn_out", residual="x"),
    Op.GATEUP: GemvOp("w_gu", "2 * ISIZE", "H", "x_mid", norm="mlp_norm"),
    Op.DOWN: GemvOp("w_down", "H", "ISIZE", "act", residual="x_mid"),
    Op.LMHEAD: GemvOp("lm_head", "V", "H", "x", norm="final_norm"),   # x[L], after the last layer
}


def spec_dims(s) -> dict[str, int]:
    """The model's shape constants under the kernel's names (config.cuh.j2 renders the same)."""
    return dict(L=s.num_layers, H=s.hidden_size, QKV=s.qkv_size, QSIZE=s.q_size, ISIZE=s.intermediate_size,
                V=s.vocab_size, NKV=s.num_kv_heads, G=s.group_size, D=s.head_dim)


def op_matrix_shape(s, op: Op) -> tuple[int, int]:
    """(rows, K) of the op's weight matrix per layer."""
    g, d = OP_TABLE[op], spec_dims(s)
    return eval(g.rows, {}, d), eval(g.k, {}, d)   # our own constant expressions over integer dims


@dataclass(frozen=True)
class ErrorCode:
    name: str
    code: int
    message: str


ERRORS = (ErrorCode("ERR_NONE", 0, "no error"),
          ErrorCode("ERR_COUNTER_TIMEOUT", 1, "a block waited too long on a dependency counter"),
          ErrorCode("ERR_RING_TIMEOUT", 2, "a block waited too long on its weight ring"),
          ErrorCode("ERR_BAD_TOKEN", 3, "an input token is outside the vocabulary"),
          ErrorCode("ERR_BAD_POSITION", 4, "an input position is outside the KV cache"),
          ErrorCode("ERR_BAD_VERIFY_POSITION", 5, "a verify step's positions of one sequence are not consecutive"))
ERROR_MESSAGES = {e.code: e.message for e in ERRORS}
# Errors of the step's inputs: the kernel checks them before any block writes (step_check.cuh), so the step
# did nothing and the decoder runs on; after any other error its counters are out of step and it resets.
INPUT_ERRORS = frozenset(e.code for e in ERRORS if e.name in ("ERR_BAD_TOKEN", "ERR_BAD_POSITION",
                                                               "ERR_BAD_VERIFY_POSITION"))
# Params::error: the code, then for an input error the step's epoch, the sequence and the bad value.
ERROR_WORDS = 4


@dataclass(frozen=True)
class Field:
    """One member of Params. ctype: "T" is the activation type, "WT" the weight storage type, "ST" its scales'.
    role: `weight`
    (a PackedWeights tensor of that name, the codes of a quantised one), `scale` (the scales of the quantised
    weight named before "_scale"), `cache` (the KV cache's k or v), `buffer` (the decoder allocates it:
    `shape` over the dims of `dims()`, `init` empty or zeros; `sim`: the simulator keeps one too), `table`
    (filled by the decoder from the schedule or the spec), `launch` (set per launch)."""
    ctype: str
    name: str
    doc: str
    role: str
    shape: str = ""
    init: str = "empty"
    sim: bool = False

    @property
    def comment(self) -> str:
        return f"({self.shape}) {self.doc}".strip() if self.shape else self.doc


PARAMS: tuple[Field, ...] = (
    Field("const T*", "embed", "(V, H)", "weight"),
    Field("const T*", "lm_head", "(V, H)", "weight"),
    Field("const T*", "final_norm", "(H)", "weight"),
    Field("const T*", "attn_norm", "(L, H)", "weight"),
    Field("const T*", "mlp_norm", "(L, H)", "weight"),
    Field("const WT*", "w_qkv", "(L, QKV, H)", "weight"),
    Field("const T*", "b_qkv", "(L, QKV) or null", "weight"),
    Field("const T*", "q_norm", "(L, D) or null", "weight"),
    Field("const T*", "k_norm", "(L, D) or null", "weight"),
    Field("const WT*", "w_o", "(L, H, QSIZE)", "weight"),
    Field("const WT*", "w_gu", "(L, 2*ISIZE, H), gate/up rows interleaved", "weight"),
    Field("const WT*", "w_down", "(L, H, ISIZE)", "weight"),
    Field("const ST*", "w_qkv_scale", "(L, QKV) int8 row scales, or (L, QKV, SCALE_GROUPS) int4 group scales, "
          "padded to 16 bytes a row; null for dense weights", "scale"),
    Field("const ST*", "w_o_scale", "(L, H[, groups])", "scale"),
    Field("const ST*", "w_gu_scale", "(L, 2*ISIZE[, groups])", "scale"),
    Field("const ST*", "w_down_scale", "(L, H[, groups])", "scale"),
    Field("T*", "k_cache", "(L, SEQS, NKV, MAX_SEQ, D)", "cache"),
    Field("T*", "v_cache", "(L, SEQS, NKV, MAX_SEQ, D)", "cache"),
    Field("T*", "x", "residual stream entering each layer; x[L] feeds the final norm", "buffer", "L+1, B, H", sim=True),
    Field("T*", "x_mid", "residual after attention", "buffer", "L, B, H", sim=True),
    Field("T*", "qkv", "", "buffer", "L, B, QKV", sim=True),
    Field("T*", "act", "silu(gate) * up", "buffer", "L, B, ISIZE", sim=True),
    Field("T*", "scratch", "(blocks, B, SCRATCH_LEN) RMSNorm inputs that do not fit in shared memory", "buffer",
          "max(1, BLOCKS * B * SCRATCH_LEN)"),
    Field("float*", "attn_o", "unnormalised partial outputs", "buffer", "L, B, NKV, KV_SPLITS, G, D", sim=True),
    Field("float*", "attn_m", "running max", "buffer", "L, B, NKV, KV_SPLITS, G", sim=True),
    Field("float*", "attn_l", "softmax denominators", "buffer", "L, B, NKV, KV_SPLITS, G", sim=True),
    Field("T*", "attn_out", "attention output, combined by each head group's last split", "buffer", "L, B, QSIZE",
          sim=True),
    Field("uint32_t*", "attn_done", "splits finished this step; wraps to 0 after the last", "buffer", "L, B, NKV",
          init="zeros"),
    Field("float*", "logits", "", "buffer", "B, V", sim=True),
    Field("float*", "lm_max", "per LM-head tile maxima", "buffer", "LM_TILES, B", sim=True),
    Field("int*", "lm_idx", "their indices", "buffer", "LM_TILES, B", sim=True),
    Field("const float*", "inv_freq", "(D/2) rotary inverse frequencies", "table"),
    Field("const int*", "tokens", "input tokens, int32 or int64 (ids_i64 bit 0): the caller's tensor, read in place",
          "buffer", "B"),
    Field("const int*", "positions", "position of each input token, int32 or int64 (ids_i64 bit 1)", "buffer", "B"),
    Field("int*", "out_tokens", "greedy next tokens; a verify step (VT > 1) then writes each sequence's accepted "
          "draft tokens (how many of rows 1..VT-1's tokens equal the greedy tokens of the rows before)", "buffer",
          "B + ACCEPT", sim=True),
    Field("uint32_t*", "counters", "dependency counters, counting up across steps", "buffer", "COUNTERS",
          init="zeros"),
    Field("int*", "error", "the Error code (0: none); for a bad input then its step's epoch, sequence, value",
          "buffer", "ERROR_WORDS", init="zeros"),
    Field("const Task*", "tasks", "task table, block-major", "table"),
    Field("const int*", "task_offsets", "(blocks + 1)", "table"),
    Field("uint64_t*", "profile", f"(tasks, {PROFILE_STAMPS}) globaltimer ns: wait start, work start, end; then each "
          "block's SM; null = off", "launch"),
    Field("uint32_t", "epoch", "1-based step number: waits target epoch * count", "launch"),
    Field("uint32_t", "ids_i64", "bit 0: tokens are int64, bit 1: positions are int64", "launch"),
    Field("uint64_t", "timeout_ns", "a wait longer than this is an error; 0 = wait forever", "launch"),
    # appended after the launch scalars so every earlier offset stays
    Field("const uint32_t*", "sampling", "per sequence: flags (bit 0: sample, else greedy; bits 1, 2: top-k, top-p), "
          "1/temperature as fp32 bits, seed low, seed high, top_k, top_p as fp32 bits, 0, 0 (gumbel.sampling_words); "
          "set by the host between launches", "buffer", "B, SAMPLE_WORDS", init="zeros"),
    Field("uint64_t*", "lm_cand", "a top-k/top-p row's first TOP_CANDIDATES rank keys of each LM-head tile, "
          "descending, 0 past the tile (topk.cuh)", "buffer", "LM_TILES, B, TOP_CANDIDATES", sim=True),
    Field("float*", "lm_sum", "a top-p row's sum over each tile of exp((logit - tile max) / T)", "buffer",
          "LM_TILES, B", sim=True),
    Field("int*", "host_draw", "1 where a row's top-k/top-p draw could not be made exactly in the kernel (the host "
          "draws it from the logits: gumbel.kernel_cannot), else 0; written every step", "buffer", "B", sim=True),
)

_SCALARS = {"uint32_t": ctypes.c_uint32, "uint64_t": ctypes.c_uint64}
_ELEMENT = {"float": torch.float32, "int": torch.int32, "uint32_t": torch.int32, "uint64_t": torch.int64}


def params_struct() -> type[ctypes.Structure]:
    fields = [(f.name, _SCALARS.get(f.ctype, ctypes.c_uint64)) for f in PARAMS]   # pointers: 8 bytes
    return type("Params", (ctypes.Structure,), {"_fields_": fields})


def dims(plan, schedule) -> dict[str, int]:
    """The names buffer shapes are written in, as the kernel's constants of the same names."""
    vt = plan.inputs.tokens_per_seq
    return dict(spec_dims(plan.spec), B=plan.batch, VT=vt, SEQS=plan.batch // vt, ACCEPT=plan.batch // vt if vt > 1 else 0,
                KV_SPLITS=plan.attn.splits, LM_TILES=schedule.lm_tiles,
                BLOCKS=plan.num_blocks, SCRATCH_LEN=plan.scratch_len, COUNTERS=schedule.num_counters,
                ERROR_WORDS=ERROR_WORDS, SAMPLE_WORDS=SAMPLE_WORDS,
                TOP_CANDIDATES=TOP_CANDIDATES)


def element_dtype(f: Field, act: torch.dtype) -> torch.dtype:
    base = f.ctype.removeprefix("const ").rstrip("*")
    return act if base in ("T", "WT") else _ELEMENT[base]


def shape_of(f: Field, d: dict[str, int]) -> tuple[int, ...]:
    shape = eval(f"({f.shape},)", {"max": max}, d)   # our own constant strings, over integer dims only
    return tuple(int(x) for x in shape)


def alloc_buffers(plan, schedule, act: torch.dtype, device, poison: bool = False) -> SimpleNamespace:
    """Every `buffer` field of Params (only those the simulator keeps, with poison=True: NaN, or -1 for
    integers, so a task that reads what no task wrote poisons the result)."""
    d, out = dims(plan, schedule), {}
    for f in PARAMS:
        if f.role != "buffer" or (poison and not f.sim):
            continue
        dt, shape = element_dtype(f, act), shape_of(f, d)
        if poison:
            out[f.name] = torch.full(shape, float("nan") if dt.is_floating_point else -1, dtype=dt, device=device)
        else:
            out[f.name] = (torch.zeros if f.init == "zeros" else torch.empty)(shape, dtype=dt, device=device)
    return SimpleNamespace(**out)
