"""The one ABI definition: the rendered C++ struct, the ctypes mirror and the buffers agree field by field."""
import re

import torch

from monokernel.codegen.render import render_source
from monokernel.models.presets import preset
from monokernel.schedule.abi import ERRORS, PARAMS, alloc_buffers, params_struct
from monokernel.schedule.build import build_schedule
from monokernel.schedule.plan import plan_for
from monokernel.schedule.tasks import TASK_FIELDS, Op, Task


def _struct(src: str, name: str) -> list[str]:
    body = re.search(r"struct %s \{(.*?)\n\};" % name, src, re.S).group(1)
    return re.findall(r"^\s+(?:[\w:<>]+\s+)*[\w:<>*]+\s+(\w+);", body, re.M)


def test_rendered_struct():
    """The rendered struct matches the table and ctypes."""
    src = render_source(plan_for(preset("llama-3.2-1b"), 2, 512))
    names = [f.name for f in PARAMS]
    assert _struct(src, "Params") == names == [n for n, _ in params_struct()._fields_]
    assert _struct(src, "Task")[:len(TASK_FIELDS)] == list(TASK_FIELDS)
    assert "using WT = __nv_bfloat16;" in src


def test_buffer_shapes_and_poison():
    """The buffers follow the shapes and poison."""
    plan = plan_for(preset("llama-3.2-1b"), 3, 512)
    sched = build_schedule(plan)
    b = alloc_buffers(plan, sched, torch.bfloat16, "cpu")
    s = plan.spec
    assert b.x.shape == (s.num_layers + 1, 3, s.hidden_size) and b.x.dtype == torch.bfloat16
    assert b.attn_o.shape == (s.num_layers, 3, s.num_kv_heads, plan.attn.splits, s.group_size, s.head_dim)
    assert b.counters.shape == (sched.num_counters,) and int(b.counters.abs().sum()) == 0
    assert b.lm_idx.shape == (sched.lm_tiles, 3) and b.lm_idx.dtype == torch.int32
    sim = alloc_buffers(plan, sched, torch.float32, "cpu", poison=True)
    assert torch.isnan(sim.logits).all() and (sim.out_tokens == -1).all() and not hasattr(sim, "counters")


def test_error_codes():
    """Error codes are distinct and zero is none."""
    assert ERRORS[0].code == 0 and len({e.code for e in ERRORS}) == len(ERRORS)


def test_attention_task_head():
    """An attention task encodes and decodes its head."""
    t = Task.attention(layer=2, seq=3, kv_head=5, num_kv_heads=8, split=4, wait=(1, 2), signal=9)
    assert (t.op, t.seq_and_kv_head(8), t.split, t.record()[TASK_FIELDS.index("arg0")]) == (Op.ATTN, (3, 5), 4, 29)


def test_op_table_shapes():
    """The op table's matrix shapes, as the kernel's constants name them, over a real spec."""
    from monokernel.schedule.abi import op_matrix_shape
    s = preset("llama-3.1-8b")
    assert op_matrix_shape(s, Op.QKV) == (6144, 4096) and op_matrix_shape(s, Op.GATEUP) == (2 * 14336, 4096)
    assert op_matrix_shape(s, Op.DOWN) == (4096, 14336) and op_matrix_shape(s, Op.LMHEAD) == (128256, 4096)
