"""The register budget of one kernel thread on Hopper, as the hardware hands it out.

An SM's 65536 registers sit in four sub-partitions of 16384, one per warp scheduler, and a block's warps
are spread over the four round-robin: the busiest sub-partition holds ceil(warps / 4) of them. Registers
go to a warp in units of 256 (8 per thread), and no thread may have more than 255. So a block of 8 warps
may give each thread 255, while a 9th warp (the producer beside 8 consumers) puts three warps on one
sub-partition and caps every thread at 168: 65536 / threads (227) is not the limit ptxas works to.
"""
from __future__ import annotations

SUBPARTITIONS = 4
REGISTERS_PER_SUBPARTITION = 16384
ALLOCATION_UNIT = 8          # registers per thread a warp is granted at a time (256 per warp)
MAX_PER_THREAD = 255


def register_cap(threads: int) -> int:
    """Registers each thread of a block of `threads` threads may use when one block fills the SM."""
    warps = -(-threads // 32)
    per_warp = REGISTERS_PER_SUBPARTITION // -(-warps // SUBPARTITIONS)
    return min(MAX_PER_THREAD, per_warp // 32 // ALLOCATION_UNIT * ALLOCATION_UNIT)

# consumer warps that leave the block at 8 warps, so at the whole 255-register budget
FULL_BUDGET_CONSUMERS = 7
