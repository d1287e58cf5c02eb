"""Renders the CUDA source of one megakernel: a generated constants/struct header followed by the
hand-written per-op templates, as one translation unit."""
from __future__ import annotations

import math
from importlib import resources

import jinja2

from ..schedule.config import KernelConfig
from ..schedule.tasks import GEMV_OPS, TASK_FIELDS, Op
from .headers import resolve_includes
from .params import PARAMS

KERNEL_NAME = "monokernel_decode_step"
_CTYPE = {"bf16": "__nv_bfloat16", "fp16": "__half"}


def _template(name: str) -> str:
    return resources.files(__package__).joinpath("templates", name).read_text()


def kernel_entry_name(cfg: KernelConfig) -> str:
    """The readable part of the kernel's cache entry name (the source hash follows it)."""
    return f"{cfg.spec.name.replace('/', '_')}-b{cfg.batch}-{cfg.dtype}"


def render_source(cfg: KernelConfig) -> str:
    s = cfg.spec
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    header = env.from_string(_template("config.cuh.j2")).render(
        model=s.name, batch=cfg.batch, dtype=cfg.dtype, arch=cfg.gpu.arch, ctype=_CTYPE[cfg.dtype],
        hidden=s.hidden_size, q_size=s.q_size, kv_size=s.kv_size, qkv_size=s.qkv_size,
        inter=s.intermediate_size, vocab=s.vocab_size, layers=s.num_layers, heads=s.num_heads,
        kv_heads=s.num_kv_heads, head_dim=s.head_dim, max_seq=cfg.max_seq, kv_splits=cfg.kv_splits, min_kv_chunk=cfg.min_kv_chunk,
        eps=repr(float(s.rms_norm_eps)), attn_scale=repr(1.0 / math.sqrt(s.head_dim)),
        qkv_bias=s.qkv_bias, qk_norm=s.qk_norm, consumer_warps=cfg.consumer_warps,
        ring_stages=cfg.ring_stages, slot_bytes=cfg.slot_bytes, input_len=cfg.input_len,
        scratch_len=cfg.scratch_len, smem_bytes=cfg.smem_bytes,
        ops=[(op.name, int(op)) for op in Op],
        gemv=[dict(op=op.name, flush_chunks=cfg.flush_chunks(op), in_smem=cfg.op_input_in_smem(op),
                   seg_staged=cfg.seg_staged(op), **cfg.gemv(op).__dict__)
              for op in GEMV_OPS],
        attn_keys=cfg.attn_keys, attn_lanes_per_key=cfg.attn_lanes_per_key, attn_key_batch=cfg.attn_key_batch, attn_pv_unroll=cfg.attn_pv_unroll,
        attn_mma=cfg.attn_mma, gemv_mma=cfg.gemv_mma, mma_kseg=cfg.mma_kseg,
        lookahead_skip_rows=cfg.lookahead_skip_rows, lookahead_rows=cfg.lookahead_rows, next_step_lookahead=cfg.next_step_lookahead,
        attn_prologue_early=cfg.attn_prologue_early,
        mma_row_stride=cfg.mma_row_stride,
        task_fields=TASK_FIELDS, params=PARAMS)
    return resolve_includes(header)
