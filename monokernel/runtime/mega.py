"""MegaDecoder: one launch of the generated megakernel per decode step.

Owns the kernel's buffers (activations, attention partials, counters, task table); the KV cache is
the engine's, in the reference layout, so prefill through PyTorch and decode here share it."""
from __future__ import annotations


import torch

from ..schedule.abi import ERROR_MESSAGES, KERNEL_NAME, PARAMS, PROFILE_STAMPS, TASK_WORDS, alloc_buffers, params_struct
from ..codegen.compile import CompiledKernel, compile_kernel
from ..codegen.render import kernel_entry_name, render_source
from ..errors import KernelRuntimeError, UnsupportedModelError
from ..models.spec import rope_inv_freq
from ..models.weights import PackedWeights
from .kv_cache import KVCache
from ..schedule.build import Schedule, build_schedule
from ..schedule.inputs import GpuInfo
from ..schedule.plan import KernelPlan, plan_for
from ..schedule.tuning import Tuning
from .cuda_driver import LoadedKernel


def gpu_info(device: torch.device) -> GpuInfo:
    prop = torch.cuda.get_device_properties(device)
    arch = f"sm_{prop.major}{prop.minor}" + ("a" if prop.major == 9 else "")
    return GpuInfo(name=prop.name, sm_count=prop.multi_processor_count,
                   smem_per_block=prop.shared_memory_per_block_optin, arch=arch)


def kernel_plan(weights: PackedWeights, batch: int, max_seq: int, gpu: GpuInfo, tuning: Tuning | None = None,
                **knobs) -> KernelPlan:
    """The plan for these weights: their storage format, computed in their activation type."""
    return plan_for(weights.spec, batch, max_seq, weights.format, weights.dtype, gpu, tuning, **knobs)


class MegaDecoder:
    def __init__(self, weights: PackedWeights, cache: KVCache, timeout_s: float = 10.0, tuning: Tuning | None = None,
                 **knobs):
        """tuning / knobs: Tuning fields (e.g. min_kv_chunk=8, gemv_mma=True) for tests and profiling."""
        dev = weights.device
        if dev.type != "cuda":
            raise UnsupportedModelError("the megakernel needs the weights on a CUDA device")
        gpu = gpu_info(dev)
        if not gpu.arch.startswith("sm_9"):
            raise UnsupportedModelError(f"the megakernel targets Hopper (sm_90); this GPU is {gpu.arch}")
        self.w, self.cache = weights, cache
        self.plan = kernel_plan(weights, cache.batch, cache.max_seq, gpu, tuning, **knobs)
        self.schedule: Schedule = build_schedule(self.plan)
        self.source = render_source(self.plan)
        self.compiled: CompiledKernel = compile_kernel(self.source, gpu.arch, name=kernel_entry_name(self.plan))
        smem, threads = self.plan.smem.total, self.plan.threads
        self.kernel = LoadedKernel(self.compiled.cubin, KERNEL_NAME, smem, threads, dev)
        if self.kernel.blocks_per_sm < 1:
            raise KernelRuntimeError(f"the kernel cannot be resident ({smem} B shared memory, "
                                     f"{self.compiled.registers} registers x {threads} threads)")
        self.buffers = alloc_buffers(self.plan, self.schedule, self.w.dtype, dev)
        offsets, records = self.schedule.task_table()
        self.tables = dict(inv_freq=rope_inv_freq(self.plan.spec).to(dev),
                           task_offsets=torch.from_numpy(offsets).to(dev),
                           tasks=torch.from_numpy(records.view("int32").reshape(-1)).to(dev))
        self.epoch = 0
        self._broken = False      # set once a step fails: counters are then out of step with the epoch
        self.params = self._params(timeout_s)

    def __getattr__(self, name):     # the buffers and tables by their Params names: mk.logits, mk.tasks
        d = self.__dict__
        if "buffers" in d and hasattr(d["buffers"], name):
            return getattr(d["buffers"], name)
        if "tables" in d and name in d["tables"]:
            return d["tables"][name]
        raise AttributeError(name)

    def _params(self, timeout_s: float):
        tensors = {"k_cache": self.cache.k, "v_cache": self.cache.v, **vars(self.buffers), **self.tables}
        ptrs = {}
        for f in PARAMS:
            if f.role == "launch":
                continue
            t = getattr(self.w, f.name) if f.role == "weight" else tensors[f.name]
            ptrs[f.name] = 0 if t is None else t.data_ptr()
        return params_struct()(**ptrs, profile=0, epoch=0, ids_i64=0, timeout_ns=int(timeout_s * 1e9))

    def launch(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Enqueues one decode step (no host synchronisation): tokens/positions (B,) on the device."""
        if self._broken:
            raise KernelRuntimeError("this decoder failed earlier; create a new one")
        self.params.tokens, wide_tokens = self._read_in_place(tokens, self.tokens)
        self.params.positions, wide_positions = self._read_in_place(positions, self.positions)
        self.params.ids_i64 = int(wide_tokens) | int(wide_positions) << 1
        self.epoch += 1
        self.params.epoch = self.epoch & 0xFFFFFFFF
        self.kernel.launch(self.plan.num_blocks, self.params, torch.cuda.current_stream(self.w.device))

    @staticmethod
    def _read_in_place(ids: torch.Tensor, own: torch.Tensor) -> tuple[int, bool]:
        """The kernel reads a contiguous (B,) int32/int64 tensor on its device where it lies (the caller's
        tensor; stream order keeps a later write to it, or to its memory once freed, after this step); any
        other tensor is copied into the decoder's own int32 buffer first."""
        if (ids.device == own.device and ids.dtype in (torch.int32, torch.int64) and ids.shape == own.shape
                and ids.is_contiguous()):
            return ids.data_ptr(), ids.dtype == torch.int64
        own.copy_(ids, non_blocking=True)
        return own.data_ptr(), False

    def enable_profile(self, on: bool = True) -> None:
        """Per-task timestamps (globaltimer ns) of the following launches: see `profile_summary`."""
        if on and getattr(self, "profile_buf", None) is None:
            # (start, wait done, end) per task, then the SM of each block
            n = self.tasks.numel() // TASK_WORDS * PROFILE_STAMPS + self.plan.num_blocks
            self.profile_buf = torch.zeros(n, dtype=torch.int64, device=self.w.device)
        self.params.profile = self.profile_buf.data_ptr() if on else 0

    def profile_summary(self) -> dict:
        """Of the last profiled launch: per op, the summed time blocks spent waiting on counters and working,
        and how late each phase's last task ended (µs); see `step_profile.summarize_step`."""
        from .step_profile import summarize_step
        return summarize_step(**self.profile_raw())

    def profile_raw(self) -> dict:
        """Of the last profiled launch, as numpy arrays: stamps (tasks, 3) ns, the task records, the per-block
        task offsets and the SM each block ran on."""
        buf, n = self.profile_buf.cpu().numpy(), self.tasks.numel() // TASK_WORDS
        return dict(stamps=buf[:PROFILE_STAMPS * n].reshape(n, PROFILE_STAMPS),
                    records=self.tasks.view(-1, TASK_WORDS).cpu().numpy(),
                    offsets=self.task_offsets.cpu().numpy(), sm_ids=buf[PROFILE_STAMPS * n:])

    def check(self) -> None:
        code = int(self.error.item())
        if code:
            self._broken = True
            raise KernelRuntimeError(f"megakernel step {self.epoch} failed: {ERROR_MESSAGES.get(code, code)}")

    def step(self, tokens: torch.Tensor, positions: torch.Tensor):
        """One decode step; returns (greedy next tokens (B,) long, logits (B, V) fp32), checked for errors."""
        pos = positions.to("cpu") if positions.device.type != "cpu" else positions
        if int(pos.max()) >= self.plan.max_seq or int(pos.min()) < 0:
            raise KernelRuntimeError(f"positions {pos.tolist()} outside the KV cache (0..{self.plan.max_seq - 1})")
        self.launch(tokens, positions)
        self.check()
        return self.out_tokens.long(), self.logits

    # ---- the rest of the Decoder protocol (runtime/decoders.py) -------------------------------------
    def enqueue(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """launch(), then the kernel's own output buffers: its next launch rewrites them. The positions are
        not checked on the host (that would drain the launch queue): the engine checked them when it
        accepted the request, and the error flag travels back with each step's tokens (`status`)."""
        self.launch(tokens, positions)
        return self.out_tokens, self.logits

    @property
    def status(self) -> torch.Tensor:
        return self.error

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.write(layer, k, v)


__all__ = ["MegaDecoder", "gpu_info", "kernel_plan"]
