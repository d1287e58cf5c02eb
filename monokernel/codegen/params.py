"""The kernel's parameter struct, defined once: rendered into C++ and mirrored as a ctypes Structure,
so Python and CUDA can never disagree on field order or width."""
from __future__ import annotations

import ctypes

# (C++ type, name, comment). "T" is the model dtype. Pointers are 8 bytes on both sides.
PARAMS: tuple[tuple[str, str, str], ...] = (
    ("const T*", "embed", "(V, H)"),
    ("const T*", "lm_head", "(V, H)"),
    ("const T*", "final_norm", "(H)"),
    ("const T*", "attn_norm", "(L, H)"),
    ("const T*", "mlp_norm", "(L, H)"),
    ("const T*", "w_qkv", "(L, QKV, H)"),
    ("const T*", "b_qkv", "(L, QKV) or null"),
    ("const T*", "q_norm", "(L, D) or null"),
    ("const T*", "k_norm", "(L, D) or null"),
    ("const T*", "w_o", "(L, H, QSIZE)"),
    ("const T*", "w_gu", "(L, 2*ISIZE, H), gate/up rows interleaved"),
    ("const T*", "w_down", "(L, H, ISIZE)"),
    ("T*", "k_cache", "(L, B, NKV, MAX_SEQ, D)"),
    ("T*", "v_cache", "(L, B, NKV, MAX_SEQ, D)"),
    ("T*", "x", "(L+1, B, H) residual stream entering each layer; x[L] feeds the final norm"),
    ("T*", "x_mid", "(L, B, H) residual after attention"),
    ("T*", "qkv", "(L, B, QKV)"),
    ("T*", "act", "(L, B, ISIZE) silu(gate) * up"),
    ("T*", "scratch", "(blocks, B, SCRATCH_LEN) RMSNorm inputs that do not fit in shared memory"),
    ("float*", "attn_o", "(L, B, NKV, KV_SPLITS, G, D) unnormalised partial outputs"),
    ("float*", "attn_m", "(L, B, NKV, KV_SPLITS, G) running max"),
    ("float*", "attn_l", "(L, B, NKV, KV_SPLITS, G) softmax denominators"),
    ("T*", "attn_out", "(L, B, QSIZE) attention output, combined by each head group's last split"),
    ("uint32_t*", "attn_done", "(L, B, NKV) splits finished this step; wraps to 0 after the last"),
    ("float*", "logits", "(B, V)"),
    ("float*", "lm_max", "(LM tiles, B)"),
    ("int*", "lm_idx", "(LM tiles, B)"),
    ("const float*", "inv_freq", "(D/2) rotary inverse frequencies"),
    ("const int*", "tokens", "(B) input tokens, int32 or int64 (ids_i64 bit 0): the caller's tensor, read in place"),
    ("const int*", "positions", "(B) position of each input token, int32 or int64 (ids_i64 bit 1)"),
    ("int*", "out_tokens", "(B) greedy next tokens"),
    ("uint32_t*", "counters", "dependency counters, counting up across steps"),
    ("int*", "error", "0, or the Error code of a failed wait"),
    ("const Task*", "tasks", "task table, block-major"),
    ("const int*", "task_offsets", "(blocks + 1)"),
    ("uint64_t*", "profile", "(tasks, 3) globaltimer ns: wait start, work start, end; then each block's SM; null = off"),
    ("uint32_t", "epoch", "1-based step number: waits target epoch * count"),
    ("uint32_t", "ids_i64", "bit 0: tokens are int64, bit 1: positions are int64"),
    ("uint64_t", "timeout_ns", "a wait longer than this is an error; 0 = wait forever"),
)

_CTYPES = {"uint32_t": ctypes.c_uint32, "uint64_t": ctypes.c_uint64}


def params_struct() -> type[ctypes.Structure]:
    fields = [(name, _CTYPES.get(ctype, ctypes.c_uint64)) for ctype, name, _ in PARAMS]
    return type("Params", (ctypes.Structure,), {"_fields_": fields})
