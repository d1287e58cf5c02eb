"""A kernel that fits its register budget, or none: plans, renders and compiles, and never hands back a
kernel whose registers spill to local memory (a spill in the inner loops costs more than any knob buys).

The rules pick the consumer warps from what has been measured; should a shape still spill with 8 of them
(and the caller left the count to the rules), the kernel is built once more with 7, which lifts the cap
from 168 to 255 registers a thread (schedule/registers.py). A shape that spills even then is refused
with the numbers, before anything runs."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedModelError
from ..schedule.inputs import KernelInputs
from ..schedule.plan import KernelPlan, make_plan
from ..schedule.registers import FULL_BUDGET_CONSUMERS, register_cap
from ..schedule.tuning import Tuning
from .compile import CompiledKernel, compile_kernel
from .render import kernel_entry_name, render_source


@dataclass(frozen=True)
class FittedKernel:
    plan: KernelPlan
    source: str
    compiled: CompiledKernel

    @property
    def register_cap(self) -> int:
        return register_cap(self.plan.threads)

    @property
    def headroom(self) -> int:
        """Registers a thread could still use under the cap (0 with spills: the compiler ran out)."""
        return 0 if self.compiled.spill_bytes else self.register_cap - self.compiled.registers

    def report(self) -> dict:
        k = self.compiled
        return {"registers": k.registers, "register_cap": self.register_cap, "headroom": self.headroom,
                "spill_bytes": k.spill_bytes, "stack_bytes": k.stack_bytes, "threads": self.plan.threads,
                "cubin": str(k.path), "cached": k.cached}


def _build(inputs: KernelInputs, tuning: Tuning) -> FittedKernel:
    plan = make_plan(inputs, tuning)
    source = render_source(plan)
    return FittedKernel(plan, source, compile_kernel(source, plan.gpu.arch, name=kernel_entry_name(plan)))


def fit_kernel(inputs: KernelInputs, tuning: Tuning | None = None, *, allow_spills: bool = False) -> FittedKernel:
    """The kernel of these inputs without register spills; allow_spills hands back a spilling one too (for
    `monokernel compile`, which reports it)."""
    tuning = tuning or Tuning()
    k = _build(inputs, tuning)
    if k.compiled.spill_bytes and tuning.consumer_warps is None and k.plan.tuning.consumer_warps > FULL_BUDGET_CONSUMERS:
        k = _build(inputs, tuning.replace(consumer_warps=FULL_BUDGET_CONSUMERS))
    if k.compiled.spill_bytes and not allow_spills:
        raise UnsupportedModelError(spill_message(k))
    return k


def spill_message(k: FittedKernel) -> str:
    s, c = k.plan.spec, k.compiled
    return (f"the megakernel for {s.name} at batch {k.plan.batch} needs more than the {k.register_cap} registers a "
            f"thread of {k.plan.threads} may have ({c.spill_bytes} bytes spill to local memory, consumer_warps="
            f"{k.plan.tuning.consumer_warps}); this shape (hidden {s.hidden_size}, {s.num_heads} heads / "
            f"{s.num_kv_heads} KV heads, head_dim {s.head_dim}) is not supported by the megakernel at this batch: "
            "use another batch size or --engine reference")
