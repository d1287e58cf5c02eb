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


def test_consumer_warps():
    """8 consumer warps and the producer by the rules (168 registers a thread); 7 (as fit_kernel rebuilds a
    kernel that spills) leave 8 warps and the whole 255."""
    spec = preset("llama-3.1-8b")
    for batch in (1, 3, 16):
        p = plan_for(spec, batch, 4096)
        assert p.tuning.consumer_warps == 8 and p.threads == 288 and register_cap(p.threads) == 168
        assert register_cap(plan_for(spec, batch, 4096, consumer_warps=7).threads) == 255
