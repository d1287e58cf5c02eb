"""The register cap ptxas works to, and the consumer-warp rule that keeps the tensor-core path under it."""
from __future__ import annotations

import pytest

from monokernel.models.presets import preset
from monokernel.schedule.plan import plan_for
from monokernel.schedule.registers import register_cap


@pytest.mark.parametrize("threads, cap", [(256, 255), (288, 168), (384, 168), (416, 128), (128, 255), (1024, 64)])
def test_register_cap(threads, cap):
    # 9 warps: three on one of the four sub-partitions, 16384 / 96 = 170 -> 168 in units of 8; 65536 / 288
    # (227) would let a kernel that spills pass a check
    assert register_cap(threads) == cap


def test_tensor_core_path_gets_the_whole_budget():
    spec = preset("llama-3.1-8b")
    for batch in (1, 2):
        p = plan_for(spec, batch, 4096)
        assert not p.tuning.gemv_mma and p.threads == 288 and register_cap(p.threads) == 168
    for batch in (3, 8, 16):
        p = plan_for(spec, batch, 4096)
        assert p.tuning.gemv_mma and p.threads == 256 and register_cap(p.threads) == 255
    assert plan_for(spec, 8, 4096, consumer_warps=8).threads == 288     # a knob the caller sets is kept
