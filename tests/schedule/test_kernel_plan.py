"""KernelPlan invariants the generated kernel relies on, for every preset and batch size."""
from __future__ import annotations

import pytest

from monokernel.errors import UnsupportedModelError
from monokernel.models.presets import preset
from monokernel.schedule.build import build_schedule
from monokernel.schedule.inputs import GpuInfo
from monokernel.schedule.layout import mma_tile_floats
from monokernel.schedule.plan import plan_for
from monokernel.schedule.tuning import Tuning
from monokernel.schedule.tasks import GEMV_OPS, Op

from conftest import TINY_SPECS

PRESETS = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 16])
def test_layout_fits(name, batch):
    """The layout fits and the attention tasks fit the grid."""
    cfg = plan_for(preset(name), batch, 8192)
    assert cfg.smem.total <= cfg.gpu.smem_per_block and cfg.smem.ring_stages >= 2
    # one block running two attention tasks would hold up the whole phase
    assert batch * cfg.spec.num_kv_heads * cfg.attn.splits <= cfg.num_blocks or cfg.attn.splits == 1
    assert cfg.attn.keys_per_slot >= 8
    assert bool(cfg.tuning.gemv_mma) == (batch > 2)
    if cfg.tuning.gemv_mma:
        assert cfg.mma_row_stride % 128 == 64 and cfg.smem.slot_bytes == 8 * cfg.mma_row_stride
        assert all(cfg.gemv[op].tile_rows % 2 == 0 for op in GEMV_OPS)
    for op in GEMV_OPS:
        if cfg.gemv[op].in_smem:
            assert cfg.gemv[op].cols <= cfg.smem.input_len
    # RMSNorm inputs that do not fit go to the global scratch; the others are read in place
    assert (cfg.scratch_len > 0) == (not cfg.gemv[Op.QKV].in_smem)


def test_down_input_seg_staged():
    """A large batch stages the down projection's input segment by segment."""
    cfg = plan_for(preset("llama-3.1-8b"), 8, 4096)
    assert cfg.gemv[Op.QKV].in_smem and not cfg.gemv[Op.DOWN].in_smem
    assert cfg.smem.input_len == cfg.spec.hidden_size and cfg.scratch_len == 0
    # one staged K segment of every sequence fits the input area the down projection does not use
    assert cfg.gemv[Op.DOWN].seg_staged and cfg.mma_kseg <= cfg.smem.input_len and cfg.mma_kseg % 64 == 0
    assert [op for op in GEMV_OPS if cfg.gemv[op].seg_staged] == [Op.DOWN]
    assert cfg.gemv[Op.DOWN].flush_chunks * 8 >= cfg.gemv[Op.DOWN].tile_rows   # the input crosses L2 once a task
    assert not plan_for(preset("llama-3.1-8b"), 8, 4096, seg_staging=0).gemv[Op.DOWN].seg_staged


def test_no_input_in_smem():
    """Without an input in shared memory, every tensor-core op stages segments in an area of its own."""
    cfg = plan_for(preset("llama-3.1-8b"), 16, 4096)   # every input is over the 96 KiB budget
    assert not any(cfg.gemv[op].in_smem for op in GEMV_OPS)
    assert all(cfg.gemv[op].seg_staged for op in GEMV_OPS)
    assert cfg.smem.input_len == cfg.mma_kseg == 2048 and cfg.scratch_len == cfg.spec.hidden_size
    off = plan_for(preset("llama-3.1-8b"), 16, 4096, seg_staging=0)
    assert off.smem.input_len == 0 and not any(off.gemv[op].seg_staged for op in GEMV_OPS)
    assert off.smem.ring_stages > cfg.smem.ring_stages   # the area costs ring slots; measured worth it (perf note 17)
    # K segments that are not a multiple of 64 elements still take whole 128-byte rows
    odd = plan_for(preset("llama-3.1-8b"), 16, 4096, mma_kseg_max=160)
    assert odd.mma_kseg == 160 and odd.smem.input_len == 192


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("batch", [3, 8, 16])
def test_seg_prefetch_fits(name, batch):
    """seg_prefetch=1 (perf note 40): the input area holds two staged segments wherever an op stages them, the
    layout still fits with a ring of at least two slots, and the schedule builds; the ops' paths are the
    default's. At 8B batch 8 the area already held two (B x 4096 for the RMSNorm ops): no ring slot lost."""
    base = plan_for(preset(name), batch, 4096, seg_prefetch=0)
    on = plan_for(preset(name), batch, 4096, seg_prefetch=1)
    assert on.smem.total <= on.gpu.smem_per_block and on.smem.ring_stages >= 2
    # (the ring a slot shorter may turn the L2 lookahead's rule, and with it the tiles, at 1B)
    shape = lambda p: {op: (g.in_smem, g.seg_staged, g.seg_major, g.kseg) for op, g in p.gemv.items()}
    assert shape(on) == shape(base) and on.mma_kseg == base.mma_kseg
    seg_row = -(-on.mma_kseg // 64) * 64
    if any(g.seg_staged for g in on.gemv.values()):
        assert on.smem.input_len >= 2 * seg_row
        assert on.smem.input_len == max(base.smem.input_len, 2 * seg_row)
    else:
        assert on.smem == base.smem
    build_schedule(on)
    if (name, batch) == ("llama-3.1-8b", 8):
        assert on.smem == base.smem and on.gemv == base.gemv
        assert [op for op in GEMV_OPS if on.gemv[op].seg_staged] == [Op.DOWN]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 8, 12, 13, 16])
def test_seg_prefetch_rule(name, batch):
    """seg_prefetch left to its rule: on exactly where a 16-bit kernel stages an op's input and the layout with two
    segments is the layout with one (8B at batch 4-12: down alone staged, measured -1.4 % at b8, perf note 40);
    off where the second segment would cost ring slots (1B and 3B at b8, 8B at b16), unmeasured there."""
    p = plan_for(preset(name), batch, 4096)
    off, on = plan_for(preset(name), batch, 4096, seg_prefetch=0), plan_for(preset(name), batch, 4096, seg_prefetch=1)
    free = any(g.seg_staged for g in off.gemv.values()) and on.smem == off.smem
    assert p.tuning.seg_prefetch is free
    assert p.smem == off.smem
    if name == "llama-3.1-8b":
        assert free is (4 <= batch <= 12)
    if name in ("llama-3.2-1b", "llama-3.2-3b"):
        assert not free
    assert plan_for(preset(name), batch, 4096, "int4-g128", "bf16").tuning.seg_prefetch is False


def test_seg_prefetch_refused_for_quantised_weights():
    """A quantised kernel sizes its staged segments to the whole input area: two do not fit."""
    with pytest.raises(UnsupportedModelError, match="seg_prefetch=1 needs 16-bit weights"):
        plan_for(preset("llama-3.1-8b"), 8, 4096, "int4-g128", "bf16", seg_prefetch=1)
    assert plan_for(preset("llama-3.1-8b"), 8, 4096, "int4-g128", "bf16").tuning.seg_prefetch is False


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 16])
def test_attention_slots(name, batch):
    """Attention slots hold whole passes of the key walk."""
    cfg = plan_for(preset(name), batch, 4096)
    assert cfg.attn.keys_per_slot % cfg.attn.keys_per_pass == 0
    assert 2 * cfg.attn.keys_per_slot * cfg.spec.head_dim * cfg.inputs.ab <= cfg.smem.slot_bytes


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("batch", [1, 3, 8, 16])
def test_seg_accumulators_fit(name, batch):
    """Segment-staged accumulators fit the scratch. A segment-staged task keeps one per-warp accumulator tile per row
    group of a flush, plus its results, in the scratch area; the other tensor-core ops keep two tiles."""
    cfg = plan_for(preset(name), batch, 4096)
    scratch = cfg.smem.total - cfg.smem.scratch
    for op in GEMV_OPS:
        if cfg.gemv[op].seg_staged:
            tiles = cfg.gemv[op].flush_chunks * mma_tile_floats(cfg.tuning)
            assert (tiles + cfg.gemv[op].flush_chunks * 8 * batch) * 4 <= scratch
            assert cfg.result_floats * 4 <= scratch


def test_ring_and_segment_knobs():
    """The ring and segment knobs are checked."""
    spec = preset("llama-3.1-8b")
    with pytest.raises(UnsupportedModelError, match="ring_stages_max=1 must be in 2..32"):
        plan_for(spec, 8, 4096, ring_stages_max=1)
    with pytest.raises(UnsupportedModelError, match="mma_kseg_max=100 must be a positive multiple of 32"):
        plan_for(spec, 8, 4096, mma_kseg_max=100)
    assert plan_for(spec, 8, 4096, mma_kseg_max=1024, ring_stages_max=16).smem.slot_bytes == 8 * (2048 + 64)


@pytest.mark.parametrize("batch", [1, 8])
def test_bytes_balanced(batch):
    """Bytes stay balanced across blocks."""
    sched = build_schedule(plan_for(preset("llama-3.1-8b"), batch, 4096))
    per = sched.bytes_per_block()
    busy = per[:, per.sum(axis=0) > 0]
    assert (busy.max(axis=0) <= 1.15 * busy.mean(axis=0)).all()


def test_head_dim_refused():
    """A head_dim that is not a multiple of 32 is refused."""
    spec = preset("llama-3.2-1b").with_(head_dim=48)
    with pytest.raises(UnsupportedModelError, match="head_dim=48 must be a multiple of 32"):
        plan_for(spec, 1, 4096)


def test_wide_groups_refused():
    """More than 16 query heads a KV head is refused before anything compiles: 32 over 1 spills even with 255
    registers a thread; 16 over 1 is planned (its kernel fits, on the CUDA-core attention walk)."""
    spec = preset("llama-3.2-1b")
    with pytest.raises(UnsupportedModelError, match=r"32 query heads over 1 KV heads \(32 per KV head\).*at most 16"):
        plan_for(spec.with_(num_kv_heads=1), 1, 4096)
    assert not plan_for(spec.with_(num_heads=16, num_kv_heads=1), 1, 4096).attn.mma


def test_attn_key_batch():
    """The attention key batch is derived from the batch, and checked."""
    spec = preset("llama-3.1-8b")
    assert plan_for(spec, 1, 4096).attn.key_batch == 2
    assert plan_for(spec, 8, 4096).attn.key_batch == 1
    assert plan_for(spec, 8, 4096, attn_key_batch=3).summary()["attn"]["key_batch"] == 3
    with pytest.raises(UnsupportedModelError, match="attn_pv_unroll=0 and min_kv_chunk=64 must be at least 1"):
        plan_for(spec, 1, 4096, attn_pv_unroll=0)


def test_min_kv_chunk():
    """min_kv_chunk is one pass of the key walk."""
    # 8 consumer warps x 4 key groups (8 lanes each at head_dim 128) x key batch, or on tensor cores 8 warps
    # x 8 keys: a shorter split idles warps
    spec = preset("llama-3.1-8b")
    assert plan_for(spec, 1, 4096, attn_mma=False).attn.min_chunk == 8 * 4 * 2
    assert plan_for(spec, 8, 4096, attn_mma=False).attn.min_chunk == 8 * 4 * 1
    assert plan_for(spec, 8, 4096).attn.min_chunk == plan_for(spec, 1, 4096).attn.min_chunk == 8 * 8
    assert plan_for(spec, 8, 4096, consumer_warps=7).attn.min_chunk == 7 * 8     # as fit_kernel may rebuild it
    assert plan_for(spec, 1, 4096, min_kv_chunk=16).attn.kv_chunk(100) == 16
    assert plan_for(spec, 1, 4096).attn.kv_chunk(8192) == 8192 // plan_for(spec, 1, 4096).attn.splits
    with pytest.raises(UnsupportedModelError, match="min_kv_chunk=0 must be at least 1"):
        plan_for(spec, 1, 4096, min_kv_chunk=0)


def test_tuning_parses():
    assert Tuning.parse("") == Tuning()
    assert Tuning.parse("input_smem_budget=0,mma_kseg_max=160,gemv_mma=1,helpers_skip=down") == Tuning(
        input_smem_budget=0, mma_kseg_max=160, gemv_mma=True, helpers_skip=frozenset({Op.DOWN}))
    assert Tuning.parse("helpers_skip=none").helpers_skip == frozenset()
    with pytest.raises(UnsupportedModelError, match="unknown tuning knob 'gemv'"):
        Tuning.parse("gemv=1")
    with pytest.raises(UnsupportedModelError, match="gemv_mma=2 must be true or false"):
        Tuning(gemv_mma=2)
    cfg = plan_for(preset("llama-3.1-8b"), 16, 4096, tuning="mma_kseg_max=160")
    assert cfg.mma_kseg == 160


def test_attn_mma():
    """Tensor-core attention is derived from the group size."""
    spec = preset("llama-3.1-8b")
    assert plan_for(spec, 1, 4096).attn.mma and plan_for(spec, 16, 4096).attn.mma
    assert plan_for(spec, 1, 4096, attn_mma=False).summary()["attn"]["mma"] is False
    cfg = plan_for(spec, 8, 4096)
    assert cfg.attn.keys_per_slot % cfg.attn.keys_per_pass == 0
    assert cfg.attn.keys_per_pass == 8 * cfg.tuning.consumer_warps == 64   # 8 keys a warp
    wide = spec.with_(num_kv_heads=2)          # 16 query heads per kv head: more than the mma's N of 8
    assert not plan_for(wide, 8, 4096).attn.mma
    with pytest.raises(UnsupportedModelError, match="attn_mma=1 needs at most 8 query heads per kv head"):
        plan_for(wide, 8, 4096, attn_mma=True)


def test_kv_splits():
    """KV splits fill the blocks unless one task per kv head fills a third."""
    spec = preset("llama-3.1-8b")                  # 8 kv heads, 132 blocks
    assert [plan_for(spec, b, 4096).attn.splits for b in (1, 2, 4, 5, 6, 8, 16)] == [16, 8, 4, 3, 1, 1, 1]
    assert plan_for(spec, 8, 4096, kv_splits=2).attn.splits == 2


def test_l2_lookahead():
    """The L2 lookahead is derived where the chain tiles fit the ring, and checked."""
    one_b, eight_b = preset("llama-3.2-1b"), preset("llama-3.1-8b")
    c = plan_for(one_b, 1, 4096)
    assert (c.tuning.l2_lookahead_kb, c.chain_blocks, c.tuning.next_step_lookahead) == (128, 128, False)
    assert c.lookahead_skip_rows * one_b.hidden_size * 2 == c.smem.ring_stages * c.smem.slot_bytes - 16 * 2048 * 2   # ring less the O tile
    assert plan_for(one_b, 8, 4096).tuning.next_step_lookahead is True
    for b in (1, 8):   # 8B's QKV and O tiles outgrow the ring: its HBM is not idle through the chain
        assert plan_for(eight_b, b, 4096).tuning.l2_lookahead_kb == 0
        assert plan_for(eight_b, b, 4096).chain_blocks == 132
    assert plan_for(one_b, 1, 4096, gpu=GpuInfo(sm_count=12)).tuning.l2_lookahead_kb == 0   # 4 helpers: over a quarter
    for spec in TINY_SPECS.values():   # each ring holds a whole gate/up tile: nothing to prefetch, no helpers
        c = plan_for(spec, 1, 320)
        assert c.lookahead_skip_rows >= c.gemv[Op.GATEUP].tile_rows and c.tuning.l2_lookahead_kb == 0
        assert c.chain_blocks == c.num_blocks
    assert plan_for(one_b, 1, 4096, lookahead_blocks=40, l2_lookahead_kb=0).chain_blocks == 132
    for n in (0, 40):   # derived off, not refused
        assert plan_for(one_b, 1, 4096, lookahead_blocks=n).tuning.l2_lookahead_kb == 0
    with pytest.raises(UnsupportedModelError, match="lookahead_blocks=40 must be in 1..33"):
        plan_for(one_b, 1, 4096, lookahead_blocks=40, l2_lookahead_kb=64)
    with pytest.raises(UnsupportedModelError, match="lookahead_blocks=0 must be in 1..33"):
        plan_for(one_b, 1, 4096, lookahead_blocks=0, l2_lookahead_kb=64)


@pytest.mark.parametrize("skip", [{Op.GATEUP, Op.DOWN}, {Op.DOWN}, {Op.GATEUP}, set()], ids=["both", "down", "gateup", "none"])
def test_lookahead_helpers(skip):
    """Lookahead helpers leave the chain and prefetch every chain tile once a layer."""
    cfg = plan_for(preset("llama-3.2-1b"), 1, 4096, helpers_skip=frozenset(skip))
    assert plan_for(preset("llama-3.2-1b"), 1, 4096).tuning.helpers_skip == {Op.GATEUP, Op.DOWN}   # the default
    sched = build_schedule(cfg)
    helpers = range(cfg.chain_blocks, cfg.num_blocks)
    gu = cfg.gemv[Op.GATEUP]
    allowed = {Op.PREFETCH, Op.LMHEAD} | ({Op.GATEUP, Op.DOWN} - skip)
    for b in helpers:
        assert {t.op for t in sched.blocks[b]} <= allowed
    for layer in (0, 7):
        pre = sorted((t.arg0, t.arg1) for b in helpers for t in sched.blocks[b] if t.op == Op.PREFETCH and t.layer == layer)
        assert [i for a, n in pre for i in range(a, a + n)] == list(range(min(cfg.chain_blocks, gu.tiles)))
        for op in (Op.GATEUP, Op.DOWN):   # every row once
            rows = sorted((t.arg0, t.arg1) for t in sched.tasks if t.op == op and t.layer == layer)
            assert [r for a, n in rows for r in range(a, a + n)] == list(range(cfg.gemv[op].rows))
        helper_rows = [t.arg1 for b in helpers for t in sched.blocks[b] if t.op == Op.GATEUP and t.layer == layer]
        if Op.GATEUP in skip:
            assert helper_rows == [] and gu.tiles <= cfg.chain_blocks
        else:   # the helpers' prefetching may outlast the chain, so their own gate/up rows are fewer
            assert len(helper_rows) == len(helpers) and max(helper_rows) < gu.tile_rows


def test_quantised_tensor_core_refusals():
    """Forced onto tensor cores, int8 needs every K a multiple of 32 (tiny llama's 688 is not); and a staged
    quantised op whose staged input area is shorter than one warp step of its codes is refused by name."""
    with pytest.raises(UnsupportedModelError, match=r"gemv_mma=1 with int8 weights needs every layer matrix's K"):
        plan_for(TINY_SPECS["llama"], 3, 256, "int8", "bf16", gemv_mma=True)
    with pytest.raises(UnsupportedModelError, match=r"mma_kseg_max=32 is shorter than one warp step of QKV \(128 of "
                                                    r"int4-g128\); raise it"):
        plan_for(TINY_SPECS["qwen3"], 3, 256, "int4-g128", "bf16", input_smem_budget=0, mma_kseg_max=32)
    plan_for(TINY_SPECS["qwen3"], 3, 256, "int4-g128", "bf16", input_smem_budget=0, mma_kseg_max=128)   # one step fits


@pytest.mark.parametrize("fmt", ["int4-g128", "int4-g32-min", "int8-g32"])
@pytest.mark.parametrize("batch", [1, 8])
def test_quantised_loop_knobs(fmt, batch):
    """The quantised tensor-core loop's knobs (perf note 35): every value builds a plan that fits and schedules,
    the defaults are today's kernel (unroll 2, tables unswizzled, the LM head with the other ops), and each
    value reaches the plan the templates read."""
    spec = preset("llama-3.1-8b")
    t = plan_for(spec, batch, 4096, weights=fmt, activations="bf16").tuning
    assert (t.mma_code_unroll, t.mma_scale_swizzle, t.lmhead_mma) == (2, False, batch != 1)   # perf note 37
    base = plan_for(spec, batch, 4096, weights=fmt, activations="bf16", lmhead_mma=True)
    assert base.gemv[Op.LMHEAD].on_tensor_cores and not any(g.scale_swizzle for g in base.gemv.values())
    for knobs in ({"mma_code_unroll": 1}, {"mma_code_unroll": 4}, {"mma_code_unroll": 8},
                  {"mma_scale_swizzle": True}, {"lmhead_mma": False},
                  {"mma_code_unroll": 4, "mma_scale_swizzle": True, "lmhead_mma": False}):
        p = plan_for(spec, batch, 4096, weights=fmt, activations="bf16", **{"lmhead_mma": True, **knobs})
        assert p.smem.total <= p.gpu.smem_per_block and p.smem.ring_stages >= 2, knobs
        assert p.tuning.mma_code_unroll == knobs.get("mma_code_unroll", 2)
        build_schedule(p)
        swz = knobs.get("mma_scale_swizzle", False)
        for op in (Op.QKV, Op.OPROJ, Op.GATEUP, Op.DOWN):
            g = p.gemv[op]
            assert g.scale_swizzle == swz and g.on_tensor_cores
            if swz:   # every segment's tables are whole 64-byte spans: the XOR of 16-byte pieces stays inside
                full = g.kseg // g.group * 2
                assert g.seg_bytes == g.kseg * g.code_bits // 8 + -(-full // 64) * 64 * (1 + g.mins)
            else:
                assert g.seg_bytes == base.gemv[op].seg_bytes
        lm = p.gemv[Op.LMHEAD]
        if knobs.get("lmhead_mma", True):
            assert lm == base.gemv[Op.LMHEAD]
        else:     # CUDA-core rows: whole rows a slot, its warps sharing a row's K; the slot stays the mma one
            assert not lm.on_tensor_cores and not lm.seg_major and p.smem.slot_bytes == base.smem.slot_bytes
            rows = p.smem.slot_bytes // (spec.hidden_size * 2)     # 2 of int4's 16.9 KB, 4 of Q8_0's 35 KB
            assert lm.chunk_rows == rows in (2, 4) and lm.flush_chunks > 1
            assert lm.warps_per_row == p.tuning.consumer_warps // rows
            assert p.smem == base.smem     # its results fit the scratch the tensor-core ops take
        assert p.summary()["gemv"]["LMHEAD"]["kseg"] == lm.kseg


@pytest.mark.parametrize("fmt,batch,on_tensor_cores", [
    ("int4-g128", 1, False), ("int4-g128-zp", 1, False), ("int4-g32-min", 1, False), ("int8-g32", 1, False),
    ("fp8", 1, True), ("int4-g128", 2, True), ("int4-g128-zp", 2, True), ("int8-g32", 2, False), ("fp8", 2, False),
    ("int4-g128", 3, True), ("fp8", 8, True), ("int8", 8, True), ("int8", 1, False), ("bf16", 2, False),
    ("bf16", 8, True)])
def test_lmhead_rule(fmt, batch, on_tensor_cores):
    """Where the LM head goes when lmhead_mma is left to its rule: with the other ops, except in the quantised
    kernels at batch 1-2 the H200 measured faster with the head on CUDA cores (perf note 37)."""
    p = plan_for(preset("llama-3.1-8b"), batch, 4096, weights=fmt, activations="bf16")
    assert p.tuning.lmhead_mma is on_tensor_cores and p.gemv[Op.LMHEAD].on_tensor_cores is on_tensor_cores
    assert p.tuning.gemv_mma is (fmt != "bf16" and fmt != "int8" or batch > 2)


def test_quantised_loop_knobs_refused():
    """Values the loop cannot take are refused by name, before anything is generated."""
    spec = preset("llama-3.1-8b")
    for v in (0, 9, -2):
        with pytest.raises(UnsupportedModelError, match=rf"mma_code_unroll={v} must be in 1..8"):
            plan_for(spec, 1, 4096, weights="int4-g128", activations="bf16", mma_code_unroll=v)
    with pytest.raises(UnsupportedModelError, match="mma_code_unroll=True must be an integer"):
        Tuning(mma_code_unroll=True)
    with pytest.raises(UnsupportedModelError, match="mma_scale_swizzle=2 must be true or false"):
        Tuning.parse("mma_scale_swizzle=2")
    with pytest.raises(UnsupportedModelError, match="lmhead_mma=1 needs gemv_mma=1"):
        plan_for(spec, 1, 4096, gemv_mma=False, lmhead_mma=True)
    for weights, mma in (("bf16", None), ("int8", None), ("int4-g128", False)):   # no group scales on tensor cores
        with pytest.raises(UnsupportedModelError, match="mma_scale_swizzle=1 needs weights with a scale a group"):
            plan_for(spec, 1, 4096, weights=weights, activations="bf16", gemv_mma=mma,
                     mma_scale_swizzle=True)
    assert Tuning.parse("mma_code_unroll=4,mma_scale_swizzle=1,lmhead_mma=0") == Tuning(
        mma_code_unroll=4, mma_scale_swizzle=True, lmhead_mma=False)
    assert plan_for(spec, 1, 4096).tuning.lmhead_mma is False          # bf16 b1: CUDA cores, the head too
    assert plan_for(spec, 8, 4096, lmhead_mma=False).gemv[Op.LMHEAD].chunk_rows == 4   # bf16 b8's 33 KB slots
