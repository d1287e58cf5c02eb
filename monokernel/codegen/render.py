"""Renders the CUDA source of one megakernel: the plan into config.cuh.j2 (constants, the Params and Task
structs, error codes, per-op shapes, all from schedule/), then the kernel headers of templates/kernel/
inlined after it by headers.resolve_includes, as one translation unit."""
from __future__ import annotations

import math
from importlib import resources

import jinja2

from .. import gumbel
from ..models.formats import FORMATS
from ..schedule.abi import ERRORS, KERNEL_NAME, OP_TABLE, PARAMS, PROFILE_STAMPS
from ..schedule.inputs import MAX_TOKENS_PER_SEQ
from ..schedule.layout import MMA_ROWS
from ..schedule.plan import KernelPlan
from ..schedule.tasks import TASK_ACCESSORS, TASK_FIELDS, Op
from .headers import resolve_includes


def _template(name: str) -> str:
    return resources.files(__package__).joinpath("templates", name).read_text()


def kernel_entry_name(plan: KernelPlan) -> str:
    """The readable part of the kernel's cache entry name (the source hash follows it)."""
    t = plan.inputs.tokens_per_seq
    return f"{plan.spec.name.replace('/', '_')}-b{plan.batch}{f'-t{t}' if t > 1 else ''}-{plan.inputs.activations.name}"


def render_source(plan: KernelPlan) -> str:
    s, i, a = plan.spec, plan.inputs, plan.attn
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    header = env.from_string(_template("config.cuh.j2")).render(
        model=s.name, batch=plan.batch, tokens_per_seq=i.tokens_per_seq, dtype=i.activations.name, arch=plan.gpu.arch,
        ctype=i.activations.ctype, wtype=i.weights.ctype,
        # the scales' C++ type from the format table; fp32 (which the kernel reads only as scales) is float
        stype=(FORMATS[i.weights.scale_format].ctype if i.weights.scale_format else None) or "float",
        hidden=s.hidden_size, q_size=s.q_size, kv_size=s.kv_size, qkv_size=s.qkv_size,
        inter=s.intermediate_size, vocab=s.vocab_size, layers=s.num_layers, heads=s.num_heads,
        kv_heads=s.num_kv_heads, head_dim=s.head_dim, max_seq=plan.max_seq, kv_splits=a.splits, min_kv_chunk=a.min_chunk,
        eps=repr(float(s.rms_norm_eps)), attn_scale=repr(1.0 / math.sqrt(s.head_dim)),
        qkv_bias=s.qkv_bias, qk_norm=s.qk_norm, plan=plan, smem=plan.smem,
        ops=[(op.name, int(op)) for op in Op],
        gemv=[dict(op=op.name, table=OP_TABLE[op], **g.__dict__) for op, g in plan.gemv.items()],
        task_fields=TASK_FIELDS, task_accessors=TASK_ACCESSORS, params=PARAMS,
        errors=ERRORS, kernel_name=KERNEL_NAME, mma_rows=MMA_ROWS, profile_stamps=PROFILE_STAMPS,
        max_tokens_per_seq=MAX_TOKENS_PER_SEQ,
        sampling=dict(words=gumbel.SAMPLE_WORDS, flag_sample=gumbel.FLAG_SAMPLE, flag_top_k=gumbel.FLAG_TOP_K,
                      flag_top_p=gumbel.FLAG_TOP_P, top_candidates=gumbel.TOP_CANDIDATES))
    return resolve_includes(header)
