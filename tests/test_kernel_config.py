"""KernelConfig invariants the generated kernel relies on, for every preset and batch size."""
from __future__ import annotations

import pytest

from monokernel.errors import UnsupportedModelError
from monokernel.models.presets import preset
from monokernel.schedule.build import build_schedule
from monokernel.schedule.config import GpuInfo, KernelConfig
from monokernel.schedule.tasks import GEMV_OPS, Op

from megakernel_cases import TINY_SPECS

PRESETS = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"]


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 16])
def test_layout_fits_and_attention_tasks_fit_the_grid(name, batch):
    cfg = KernelConfig(preset(name), batch, 8192)
    assert cfg.smem_bytes <= cfg.gpu.smem_per_block and cfg.ring_stages >= 2
    # one block running two attention tasks would hold up the whole phase
    assert batch * cfg.spec.num_kv_heads * cfg.kv_splits <= cfg.num_blocks or cfg.kv_splits == 1
    assert cfg.attn_keys >= 8
    assert bool(cfg.gemv_mma) == (batch > 2)
    if cfg.gemv_mma:
        assert cfg.mma_row_stride % 128 == 64 and cfg.slot_bytes == 8 * cfg.mma_row_stride
        assert all(cfg.gemv(op).tile_rows % 2 == 0 for op in GEMV_OPS)
    for op in GEMV_OPS:
        if cfg.op_input_in_smem(op):
            assert cfg.gemv(op).cols <= cfg.input_len
    # RMSNorm inputs that do not fit go to the global scratch; the others are read in place
    assert (cfg.scratch_len > 0) == (not cfg.op_input_in_smem(Op.QKV))


def test_large_batch_stages_the_down_projection_input_segment_by_segment():
    cfg = KernelConfig(preset("llama-3.1-8b"), 8, 4096)
    assert cfg.op_input_in_smem(Op.QKV) and not cfg.op_input_in_smem(Op.DOWN)
    assert cfg.input_len == cfg.spec.hidden_size and cfg.scratch_len == 0
    # one staged K segment of every sequence fits the input area the down projection does not use
    assert cfg.seg_staged(Op.DOWN) and cfg.mma_kseg <= cfg.input_len and cfg.mma_kseg % 64 == 0
    assert [op for op in GEMV_OPS if cfg.seg_staged(op)] == [Op.DOWN]
    assert cfg.flush_chunks(Op.DOWN) * 8 >= cfg.gemv(Op.DOWN).tile_rows   # the input crosses L2 once a task
    assert not KernelConfig(preset("llama-3.1-8b"), 8, 4096, seg_staging=0).seg_staged(Op.DOWN)


def test_without_an_input_in_shared_memory_every_tensor_core_op_stages_segments_in_an_area_of_its_own():
    cfg = KernelConfig(preset("llama-3.1-8b"), 16, 4096)   # every input is over the 96 KiB budget
    assert not any(cfg.op_input_in_smem(op) for op in GEMV_OPS)
    assert all(cfg.seg_staged(op) for op in GEMV_OPS)
    assert cfg.input_len == cfg.mma_kseg == 2048 and cfg.scratch_len == cfg.spec.hidden_size
    off = KernelConfig(preset("llama-3.1-8b"), 16, 4096, seg_staging=0)
    assert off.input_len == 0 and not any(off.seg_staged(op) for op in GEMV_OPS)
    assert off.ring_stages > cfg.ring_stages   # the area costs ring slots; measured worth it (perf note 17)
    # K segments that are not a multiple of 64 elements still take whole 128-byte rows
    odd = KernelConfig(preset("llama-3.1-8b"), 16, 4096, mma_kseg_max=160)
    assert odd.mma_kseg == 160 and odd.input_len == 192


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("batch", [1, 2, 3, 8, 16])
def test_attention_slots_hold_whole_passes_of_the_key_walk(name, batch):
    cfg = KernelConfig(preset(name), batch, 4096)
    assert cfg.attn_keys % cfg.attn_keys_per_pass == 0
    assert 2 * cfg.attn_keys * cfg.spec.head_dim * cfg.elt <= cfg.slot_bytes


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("batch", [1, 3, 8, 16])
def test_segment_staged_accumulators_fit_the_scratch(name, batch):
    """A segment-staged task keeps one per-warp accumulator tile per row group of a flush, plus its
    results, in the scratch area; the other tensor-core ops keep two tiles."""
    cfg = KernelConfig(preset(name), batch, 4096)
    scratch = cfg.smem_bytes_fixed - 1024 - cfg.batch * cfg.input_len * cfg.elt
    for op in GEMV_OPS:
        if cfg.seg_staged(op):
            tiles = cfg.flush_chunks(op) * cfg._mma_tile_floats
            assert (tiles + cfg.flush_chunks(op) * 8 * batch) * 4 <= scratch
            assert cfg.mma_part_floats >= tiles


def test_ring_and_segment_knobs_are_checked():
    spec = preset("llama-3.1-8b")
    with pytest.raises(UnsupportedModelError, match="ring_stages_max=1 must be in 2..32"):
        KernelConfig(spec, 8, 4096, ring_stages_max=1)
    with pytest.raises(UnsupportedModelError, match="mma_kseg_max=100 must be a positive multiple of 32"):
        KernelConfig(spec, 8, 4096, mma_kseg_max=100)
    assert KernelConfig(spec, 8, 4096, mma_kseg_max=1024, ring_stages_max=16).slot_bytes == 8 * (2048 + 64)


@pytest.mark.parametrize("batch", [1, 8])
def test_bytes_stay_balanced_across_blocks(batch):
    sched = build_schedule(KernelConfig(preset("llama-3.1-8b"), batch, 4096))
    per = sched.bytes_per_block()
    busy = per[:, per.sum(axis=0) > 0]
    assert (busy.max(axis=0) <= 1.15 * busy.mean(axis=0)).all()


def test_head_dim_not_a_multiple_of_32_is_refused():
    spec = preset("llama-3.2-1b").with_(head_dim=48)
    with pytest.raises(UnsupportedModelError, match="head_dim=48 must be a multiple of 32"):
        KernelConfig(spec, 1, 4096)


def test_attention_key_batch_is_derived_from_the_batch_and_checked():
    spec = preset("llama-3.1-8b")
    assert KernelConfig(spec, 1, 4096).attn_key_batch == 2
    assert KernelConfig(spec, 8, 4096).attn_key_batch == 1
    assert KernelConfig(spec, 8, 4096, attn_key_batch=3).summary()["attn_key_batch"] == 3
    with pytest.raises(UnsupportedModelError, match="attn_pv_unroll=0 and min_kv_chunk=64 must be at least 1"):
        KernelConfig(spec, 1, 4096, attn_pv_unroll=0)


def test_min_kv_chunk_is_one_pass_of_the_key_walk():
    # 8 consumer warps x 4 key groups (8 lanes each at head_dim 128) x key batch, or on tensor cores 8 warps
    # x 8 keys: a shorter split idles warps
    spec = preset("llama-3.1-8b")
    assert KernelConfig(spec, 1, 4096, attn_mma=0).min_kv_chunk == 8 * 4 * 2
    assert KernelConfig(spec, 8, 4096, attn_mma=0).min_kv_chunk == 8 * 4 * 1
    assert KernelConfig(spec, 8, 4096).min_kv_chunk == KernelConfig(spec, 1, 4096).min_kv_chunk == 8 * 8
    assert KernelConfig(spec, 1, 4096, min_kv_chunk=16).kv_chunk(100) == 16
    assert KernelConfig(spec, 1, 4096).kv_chunk(8192) == 8192 // KernelConfig(spec, 1, 4096).kv_splits
    with pytest.raises(UnsupportedModelError, match="min_kv_chunk=0 must be at least 1"):
        KernelConfig(spec, 1, 4096, min_kv_chunk=0)


def test_overrides_parse_as_the_profiling_and_sanitizer_scripts_write_them():
    from monokernel.schedule.config import parse_overrides
    assert parse_overrides("") == {}
    assert parse_overrides("input_smem_budget=0,mma_kseg_max=160") == {"input_smem_budget": 0, "mma_kseg_max": 160}
    cfg = KernelConfig(preset("llama-3.1-8b"), 16, 4096, **parse_overrides("mma_kseg_max=160"))
    assert cfg.mma_kseg == 160


def test_tensor_core_attention_is_derived_from_the_group_size():
    spec = preset("llama-3.1-8b")
    assert KernelConfig(spec, 1, 4096).attn_mma and KernelConfig(spec, 16, 4096).attn_mma
    assert KernelConfig(spec, 1, 4096, attn_mma=0).summary()["attn_mma"] is False
    cfg = KernelConfig(spec, 8, 4096)
    assert cfg.attn_keys % cfg.attn_keys_per_pass == 0 and cfg.attn_keys_per_pass == 64
    wide = spec.with_(num_kv_heads=2)          # 16 query heads per kv head: more than the mma's N of 8
    assert not KernelConfig(wide, 8, 4096).attn_mma
    with pytest.raises(UnsupportedModelError, match="attn_mma=1 needs at most 8 query heads per kv head"):
        KernelConfig(wide, 8, 4096, attn_mma=1)


def test_kv_splits_fill_the_blocks_unless_one_task_per_kv_head_fills_a_third():
    spec = preset("llama-3.1-8b")                  # 8 kv heads, 132 blocks
    assert [KernelConfig(spec, b, 4096).kv_splits for b in (1, 2, 4, 5, 6, 8, 16)] == [16, 8, 4, 3, 1, 1, 1]
    assert KernelConfig(spec, 8, 4096, kv_splits=2).kv_splits == 2


def test_l2_lookahead_is_derived_where_the_chain_tiles_fit_the_ring_and_checked():
    one_b, eight_b = preset("llama-3.2-1b"), preset("llama-3.1-8b")
    c = KernelConfig(one_b, 1, 4096)
    assert (c.l2_lookahead_kb, c.chain_blocks, c.next_step_lookahead) == (128, 128, 0)
    assert c.lookahead_skip_rows * one_b.hidden_size * 2 == c.ring_stages * c.slot_bytes - 16 * 2048 * 2   # ring less the O tile
    assert KernelConfig(one_b, 8, 4096).next_step_lookahead == 1
    for b in (1, 8):   # 8B's QKV and O tiles outgrow the ring: its HBM is not idle through the chain
        assert KernelConfig(eight_b, b, 4096).l2_lookahead_kb == 0
        assert KernelConfig(eight_b, b, 4096).chain_blocks == 132
    assert KernelConfig(one_b, 1, 4096, gpu=GpuInfo(sm_count=12)).l2_lookahead_kb == 0   # 4 helpers: over a quarter
    for spec in TINY_SPECS.values():   # each ring holds a whole gate/up tile: nothing to prefetch, no helpers
        c = KernelConfig(spec, 1, 320)
        assert c.lookahead_skip_rows >= c.gemv(Op.GATEUP).tile_rows and c.l2_lookahead_kb == 0
        assert c.chain_blocks == c.num_blocks
    assert KernelConfig(one_b, 1, 4096, lookahead_blocks=40, l2_lookahead_kb=0).chain_blocks == 132
    for n in (0, 40):   # derived off, not refused
        assert KernelConfig(one_b, 1, 4096, lookahead_blocks=n).l2_lookahead_kb == 0
    with pytest.raises(UnsupportedModelError, match="lookahead_blocks=40 must be in 1..33"):
        KernelConfig(one_b, 1, 4096, lookahead_blocks=40, l2_lookahead_kb=64)
    with pytest.raises(UnsupportedModelError, match="lookahead_blocks=0 must be in 1..33"):
        KernelConfig(one_b, 1, 4096, lookahead_blocks=0, l2_lookahead_kb=64)


@pytest.mark.parametrize("skip", [3, 2, 1, 0])
def test_lookahead_helpers_leave_the_chain_and_prefetch_every_chain_tile_once_a_layer(skip):
    cfg = KernelConfig(preset("llama-3.2-1b"), 1, 4096, helpers_skip_mlp=skip)
    assert KernelConfig(preset("llama-3.2-1b"), 1, 4096).helpers_skip_mlp == 3   # the default: no MLP tiles
    sched = build_schedule(cfg)
    helpers = range(cfg.chain_blocks, cfg.num_blocks)
    gu = cfg.gemv(Op.GATEUP)
    allowed = {Op.PREFETCH, Op.LMHEAD} | ({Op.GATEUP} if not skip & 1 else set()) | ({Op.DOWN} if not skip & 2 else set())
    for b in helpers:
        assert {t.op for t in sched.blocks[b]} <= allowed
    for layer in (0, 7):
        pre = sorted((t.arg0, t.arg1) for b in helpers for t in sched.blocks[b] if t.op == Op.PREFETCH and t.layer == layer)
        assert [i for a, n in pre for i in range(a, a + n)] == list(range(min(cfg.chain_blocks, gu.tiles)))
        for op in (Op.GATEUP, Op.DOWN):   # every row once
            rows = sorted((t.arg0, t.arg1) for t in sched.tasks if t.op == op and t.layer == layer)
            assert [r for a, n in rows for r in range(a, a + n)] == list(range(cfg.gemv(op).rows))
        helper_rows = [t.arg1 for b in helpers for t in sched.blocks[b] if t.op == Op.GATEUP and t.layer == layer]
        if skip & 1:
            assert helper_rows == [] and gu.tiles <= cfg.chain_blocks
        else:   # the helpers' prefetching may outlast the chain, so their own gate/up rows are fewer
            assert len(helper_rows) == len(helpers) and max(helper_rows) < gu.tile_rows
