"""KernelConfig invariants the generated kernel relies on, for every preset and batch size."""
from __future__ import annotations

import pytest

from monokernel.errors import UnsupportedModelError
from monokernel.models.presets import preset
from monokernel.schedule.build import build_schedule
from monokernel.schedule.config import KernelConfig
from monokernel.schedule.tasks import GEMV_OPS, Op

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


def test_large_batch_reads_the_down_projection_input_in_place():
    cfg = KernelConfig(preset("llama-3.1-8b"), 8, 4096)
    assert cfg.op_input_in_smem(Op.QKV) and not cfg.op_input_in_smem(Op.DOWN)
    assert cfg.input_len == cfg.spec.hidden_size and cfg.scratch_len == 0


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
    # 8 consumer warps x 4 key groups (8 lanes each at head_dim 128) x key batch: a shorter split idles warps
    spec = preset("llama-3.1-8b")
    assert KernelConfig(spec, 1, 4096).min_kv_chunk == 8 * 4 * 2
    assert KernelConfig(spec, 8, 4096).min_kv_chunk == 8 * 4 * 1
    assert KernelConfig(spec, 1, 4096, min_kv_chunk=16).kv_chunk(100) == 16
    assert KernelConfig(spec, 1, 4096).kv_chunk(8192) == 8192 // KernelConfig(spec, 1, 4096).kv_splits
    with pytest.raises(UnsupportedModelError, match="min_kv_chunk=0 must be at least 1"):
        KernelConfig(spec, 1, 4096, min_kv_chunk=0)
