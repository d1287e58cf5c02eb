"""MegaDecoder: one launch of the generated megakernel per decode step.

Owns the kernel's buffers (activations, attention partials, counters, task table); the KV cache is
the engine's, in the reference layout, so prefill through PyTorch and decode here share it."""
from __future__ import annotations


import torch

from ..codegen.compile import CompiledKernel, compile_kernel
from ..codegen.params import params_struct
from ..codegen.render import KERNEL_NAME, kernel_entry_name, render_source
from ..errors import KernelRuntimeError, UnsupportedModelError
from ..models.spec import rope_inv_freq
from ..models.weights import PackedWeights
from .kv_cache import KVCache
from ..schedule.build import Schedule, build_schedule
from ..schedule.config import GpuInfo, KernelConfig
from .cuda_driver import LoadedKernel

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_ERRORS = {1: "a block waited too long on a dependency counter", 2: "a block waited too long on its weight ring"}


def gpu_info(device: torch.device) -> GpuInfo:
    prop = torch.cuda.get_device_properties(device)
    arch = f"sm_{prop.major}{prop.minor}" + ("a" if prop.major == 9 else "")
    return GpuInfo(name=prop.name, sm_count=prop.multi_processor_count,
                   smem_per_block=prop.shared_memory_per_block_optin, arch=arch)


def kernel_config(weights: PackedWeights, batch: int, max_seq: int, gpu: GpuInfo, **overrides) -> KernelConfig:
    if weights.dtype not in _DTYPES:
        raise UnsupportedModelError(f"the megakernel runs bf16 or fp16 weights, not {weights.dtype}; use --dtype bf16")
    return KernelConfig(weights.spec, batch, max_seq, _DTYPES[weights.dtype], gpu, **overrides)


class MegaDecoder:
    def __init__(self, weights: PackedWeights, cache: KVCache, timeout_s: float = 10.0, **config_overrides):
        """config_overrides: KernelConfig fields (e.g. min_kv_chunk, kv_splits) for tests and tuning."""
        dev = weights.device
        if dev.type != "cuda":
            raise UnsupportedModelError("the megakernel needs the weights on a CUDA device")
        gpu = gpu_info(dev)
        if not gpu.arch.startswith("sm_9"):
            raise UnsupportedModelError(f"the megakernel targets Hopper (sm_90); this GPU is {gpu.arch}")
        self.w, self.cache = weights, cache
        self.config = kernel_config(weights, cache.batch, cache.max_seq, gpu, **config_overrides)
        self.schedule: Schedule = build_schedule(self.config)
        self.source = render_source(self.config)
        self.compiled: CompiledKernel = compile_kernel(self.source, gpu.arch, name=kernel_entry_name(self.config))
        self.kernel = LoadedKernel(self.compiled.cubin, KERNEL_NAME, self.config.smem_bytes, self.config.threads, dev)
        if self.kernel.blocks_per_sm < 1:
            raise KernelRuntimeError(
                f"the kernel cannot be resident ({self.config.smem_bytes} B shared memory, "
                f"{self.compiled.registers} registers x {self.config.threads} threads)")
        self._alloc(dev)
        self.epoch = 0
        self._broken = False      # set once a step fails: counters are then out of step with the epoch
        self.params = self._params(timeout_s)

    def _alloc(self, dev):
        c, s, sched = self.config, self.config.spec, self.schedule
        dt = self.w.dtype
        L, B = s.num_layers, c.batch
        e = lambda *shape, dtype=dt: torch.empty(shape, dtype=dtype, device=dev)
        self.x, self.x_mid = e(L + 1, B, s.hidden_size), e(L, B, s.hidden_size)
        self.qkv, self.act = e(L, B, s.qkv_size), e(L, B, s.intermediate_size)
        self.scratch = e(max(1, c.num_blocks * B * c.scratch_len))
        part = (L, B, s.num_kv_heads, c.kv_splits, s.group_size)
        self.attn_o = e(*part, s.head_dim, dtype=torch.float32)
        self.attn_m, self.attn_l = e(*part, dtype=torch.float32), e(*part, dtype=torch.float32)
        self.attn_out = e(L, B, s.q_size)
        self.attn_done = torch.zeros(L, B, s.num_kv_heads, dtype=torch.int32, device=dev)
        self.logits = e(B, s.vocab_size, dtype=torch.float32)
        self.lm_max = e(sched.lm_tiles, B, dtype=torch.float32)
        self.lm_idx = e(sched.lm_tiles, B, dtype=torch.int32)
        self.inv_freq = rope_inv_freq(s).to(dev)
        self.tokens, self.positions = e(B, dtype=torch.int32), e(B, dtype=torch.int32)
        self.out_tokens = e(B, dtype=torch.int32)
        self.counters = torch.zeros(sched.num_counters, dtype=torch.int32, device=dev)
        self.error = torch.zeros(1, dtype=torch.int32, device=dev)
        offsets, records = sched.task_table()
        self.task_offsets = torch.from_numpy(offsets).to(dev)
        self.tasks = torch.from_numpy(records.view("int32").reshape(-1)).to(dev)

    def _params(self, timeout_s: float):
        w, P = self.w, params_struct()
        ptr = lambda t: 0 if t is None else t.data_ptr()
        return P(embed=ptr(w.embed), lm_head=ptr(w.lm_head), final_norm=ptr(w.final_norm),
                 attn_norm=ptr(w.attn_norm), mlp_norm=ptr(w.mlp_norm), w_qkv=ptr(w.w_qkv), b_qkv=ptr(w.b_qkv),
                 q_norm=ptr(w.q_norm), k_norm=ptr(w.k_norm), w_o=ptr(w.w_o), w_gu=ptr(w.w_gu),
                 w_down=ptr(w.w_down), k_cache=ptr(self.cache.k), v_cache=ptr(self.cache.v), x=ptr(self.x),
                 x_mid=ptr(self.x_mid), qkv=ptr(self.qkv), act=ptr(self.act), scratch=ptr(self.scratch),
                 attn_o=ptr(self.attn_o), attn_m=ptr(self.attn_m), attn_l=ptr(self.attn_l),
                 attn_out=ptr(self.attn_out), attn_done=ptr(self.attn_done),
                 logits=ptr(self.logits), lm_max=ptr(self.lm_max), lm_idx=ptr(self.lm_idx),
                 inv_freq=ptr(self.inv_freq), tokens=ptr(self.tokens), positions=ptr(self.positions),
                 out_tokens=ptr(self.out_tokens), counters=ptr(self.counters), error=ptr(self.error),
                 tasks=ptr(self.tasks), task_offsets=ptr(self.task_offsets), profile=0, epoch=0, ids_i64=0,
                 timeout_ns=int(timeout_s * 1e9))

    def launch(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Enqueues one decode step (no host synchronisation): tokens/positions (B,) on the device."""
        if self._broken:
            raise KernelRuntimeError("this decoder failed earlier; create a new one")
        self.params.tokens, wide_tokens = self._read_in_place(tokens, self.tokens)
        self.params.positions, wide_positions = self._read_in_place(positions, self.positions)
        self.params.ids_i64 = int(wide_tokens) | int(wide_positions) << 1
        self.epoch += 1
        self.params.epoch = self.epoch & 0xFFFFFFFF
        self.kernel.launch(self.config.num_blocks, self.params, torch.cuda.current_stream(self.w.device))

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
            n = self.tasks.numel() // 8 * 3 + self.config.num_blocks
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
        buf, n = self.profile_buf.cpu().numpy(), self.tasks.numel() // 8
        return dict(stamps=buf[:3 * n].reshape(n, 3), records=self.tasks.view(-1, 8).cpu().numpy(),
                    offsets=self.task_offsets.cpu().numpy(), sm_ids=buf[3 * n:])

    def check(self) -> None:
        code = int(self.error.item())
        if code:
            self._broken = True
            raise KernelRuntimeError(f"megakernel step {self.epoch} failed: {_ERRORS.get(code, code)}")

    def step(self, tokens: torch.Tensor, positions: torch.Tensor):
        """One decode step; returns (greedy next tokens (B,) long, logits (B, V) fp32), checked for errors."""
        pos = positions.to("cpu") if positions.device.type != "cpu" else positions
        if int(pos.max()) >= self.config.max_seq or int(pos.min()) < 0:
            raise KernelRuntimeError(f"positions {pos.tolist()} outside the KV cache (0..{self.config.max_seq - 1})")
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


__all__ = ["MegaDecoder", "gpu_info", "kernel_config"]
