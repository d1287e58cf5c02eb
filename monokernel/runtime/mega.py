"""MegaDecoder: one launch of the generated megakernel per decode step.

Owns the kernel's buffers (activations, attention partials, counters, task table); the KV cache is
the engine's, in the reference layout, so prefill through PyTorch and decode here share it."""
from __future__ import annotations


import numpy as np
import torch

from .. import gumbel
from ..schedule.abi import (ERROR_MESSAGES, INPUT_ERRORS, KERNEL_NAME, OP_TABLE, PARAMS, PROFILE_STAMPS, TASK_WORDS,
                            alloc_buffers, params_struct)
from ..schedule.step_check import input_error_message
from ..codegen.compile import CompiledKernel
from ..codegen.fit import fit_kernel
from ..errors import InputError, KernelRuntimeError, UnsupportedModelError
from ..models.spec import rope_inv_freq
from ..models.weights import PackedWeights
from .kv_cache import KVCache
from .mma_tiles import mma_rows
from ..schedule.build import Schedule, build_schedule
from ..schedule.inputs import GpuInfo, KernelInputs
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


def _weight_part(m, role: str) -> torch.Tensor | None:
    """What the kernel reads of a PackedWeights matrix: a dense tensor itself, or a quantised one's codes
    (role "weight") and scales (role "scale"); a dense matrix has no scales. Formats without zero points only
    here (int8, symmetric int4 on CUDA cores): the tensor-core rows (mma_tiles.py) carry an int4 matrix's zero
    points themselves, and the plan refuses them elsewhere."""
    if m is None or isinstance(m, torch.Tensor):
        return m if role == "weight" else None
    from ..models.quant import QuantTensor
    if not isinstance(m, QuantTensor) or m.zeros is not None:
        raise UnsupportedModelError(f"the megakernel reads dense or int8 matrices, not {type(m).__name__} "
                                    f"({getattr(m, 'format', '')})")
    part = m.codes if role == "weight" else m.scales
    if not part.is_contiguous():
        raise UnsupportedModelError("the megakernel reads contiguous codes and scales")
    return part


def step_error(words: list[int], epoch: int, plan: KernelPlan, timeout_s: float
               ) -> tuple[InputError | KernelRuntimeError, int | None]:
    """The exception for the error words (code, epoch, sequence, value) read after the host's step `epoch`,
    and the epoch to go back to: the step before the one with a bad input (that did nothing), or None
    where the decoder must reset (a timeout: counters of an unknown step are out of step)."""
    code, failed32, seq, value = words
    if code in INPUT_ERRORS:
        failed = epoch - ((epoch - failed32) & 0xFFFFFFFF)    # the kernel sees the epoch mod 2^32
        msg = input_error_message(code, failed, seq, value, plan.spec.vocab_size, plan.max_seq)
        return InputError(f"megakernel {msg}; the decoder runs on"), failed - 1
    what = ERROR_MESSAGES.get(code, f"error code {code}")
    return KernelRuntimeError(f"megakernel step {epoch} (or one queued before it) failed: {what} (timeout "
                              f"{timeout_s:g} s); the decoder was reset and can run again"), None


class MegaDecoder:
    def __init__(self, weights: PackedWeights, cache: KVCache, timeout_s: float = 10.0, tuning: Tuning | None = None,
                 tokens_per_seq: int = 1, **knobs):
        """tuning / knobs: Tuning fields (e.g. min_kv_chunk=8, gemv_mma=True) for tests and profiling.
        tokens_per_seq T > 1: a verify step (`verify`) of T consecutive positions of each of the cache's
        sequences, a batch of cache.batch x T rows."""
        dev = weights.device
        if dev.type != "cuda":
            raise UnsupportedModelError("the megakernel needs the weights on a CUDA device")
        gpu = gpu_info(dev)
        if not gpu.arch.startswith("sm_9"):
            raise UnsupportedModelError(f"the megakernel targets Hopper (sm_90); this GPU is {gpu.arch}")
        self.w, self.cache = weights, cache
        for name in ("embed", "lm_head"):     # read as T* (abi.PARAMS): a gather and the LM head stay dense
            m = getattr(weights, name)
            if not isinstance(m, torch.Tensor) or m.dtype != weights.dtype:
                raise UnsupportedModelError(f"the megakernel reads the {name} in {weights.dtype} only, not "
                                            f"{getattr(m, 'format', getattr(m, 'dtype', m))}")
        if knobs:
            tuning = (tuning or Tuning()).replace(**knobs)
        fitted = fit_kernel(KernelInputs(weights.spec, cache.batch * tokens_per_seq, cache.max_seq, weights.format,
                                         weights.dtype, gpu, tokens_per_seq), tuning)
        self.plan, self.source = fitted.plan, fitted.source
        self.compiled: CompiledKernel = fitted.compiled
        self.schedule: Schedule = build_schedule(self.plan)
        smem, threads = self.plan.smem.total, self.plan.threads
        self.kernel = LoadedKernel(self.compiled.cubin, KERNEL_NAME, smem, threads, dev)
        if self.kernel.blocks_per_sm < 1:
            raise KernelRuntimeError(f"the kernel cannot be resident ({smem} B shared memory, "
                                     f"{self.compiled.registers} registers x {threads} threads)")
        # Every launch goes to this stream: two launches of one decoder must never overlap (they share its
        # counters and buffers), which a second stream would allow.
        self.stream = torch.cuda.current_stream(dev)
        self.buffers = alloc_buffers(self.plan, self.schedule, self.w.dtype, dev)
        offsets, records = self.schedule.task_table()
        self.tables = dict(inv_freq=rope_inv_freq(self.plan.spec).to(dev),
                           task_offsets=torch.from_numpy(offsets).to(dev),
                           tasks=torch.from_numpy(records.view("int32").reshape(-1)).to(dev))
        self.epoch = 0
        self._sampling_words = np.zeros((self.plan.batch, gumbel.SAMPLE_WORDS), dtype=np.uint32)   # as on the device
        self._sampling_asked: tuple | None = None    # the last set_sampling arguments those words came from
        self._any_filtered = False                   # whether a row of those words asks for top-k or top-p
        self.last_host_draws: list[int] = []         # rows of the last step drawn on the host (set_sampling)
        self._held: dict[str, torch.Tensor | None] = {}    # what the kernel reads that the decoder built: padded
        # scale tables, tensor-core stored rows
        self.params = self._params(timeout_s)

    def __getattr__(self, name):     # the buffers and tables by their Params names: mk.logits, mk.tasks
        d = self.__dict__
        if "buffers" in d and hasattr(d["buffers"], name):
            return getattr(d["buffers"], name)
        if "tables" in d and name in d["tables"]:
            return d["tables"][name]
        raise AttributeError(name)

    def _padded_scales(self, weight: str, t: torch.Tensor | None) -> torch.Tensor | None:
        """int4 group scales as the kernel copies them after a chunk's codes: each row padded to the plan's
        whole 16-byte units (a copy only where the groups of a row fill none, as on the tiny test models)."""
        op = next(op for op, g in OP_TABLE.items() if g.weight == weight)
        srow = self.plan.gemv[op].scale_row_bytes
        if t is None or not srow or t.shape[-1] * t.element_size() == srow:
            return t
        return torch.nn.functional.pad(t, (0, srow // t.element_size() - t.shape[-1])).contiguous()

    def _tensor_core_rows(self, weight: str):
        """The GemvPlan of a quantised matrix the tensor-core path reads in its own stored layout (codes in
        lane order, each segment's scales after its codes: runtime/mma_tiles.py), or None. Those rows are a
        copy the decoder holds beside the checkpoint's (for the 8B preset in int4, 4.7 GB)."""
        op = next((op for op, g in OP_TABLE.items() if g.weight == weight), None)
        g = self.plan.gemv.get(op) if op is not None else None
        return g if g is not None and g.sblock else None

    def _params(self, timeout_s: float):
        tensors = {"k_cache": self.cache.k, "v_cache": self.cache.v, **vars(self.buffers), **self.tables}
        ptrs = {}
        for f in PARAMS:
            if f.role == "launch":
                continue
            if f.role in ("weight", "scale"):
                m = getattr(self.w, f.name.removesuffix("_scale"))
                rows = self._tensor_core_rows(f.name.removesuffix("_scale"))
                if rows is not None and f.role == "weight":
                    t = self._held[f.name] = mma_rows(m, rows)
                elif rows is not None and rows.group:    # int4 on tensor cores: its scales are in those rows
                    t = None
                else:
                    t = _weight_part(m, f.role)
                    if f.role == "scale":
                        t = self._held[f.name] = self._padded_scales(f.name.removesuffix("_scale"), t)
            else:
                t = tensors[f.name]
            ptrs[f.name] = 0 if t is None else t.data_ptr()
        self.timeout_s = timeout_s
        return params_struct()(**ptrs, profile=0, epoch=0, ids_i64=0, timeout_ns=int(timeout_s * 1e9))

    def launch(self, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Enqueues one decode step (no host synchronisation): tokens/positions (B,) on the device, checked by
        the kernel itself (an out-of-range one makes the step do nothing and raises at `check`). Called
        from another stream than the decoder's, the step is ordered after that stream's work and before
        its later work."""
        caller = torch.cuda.current_stream(self.w.device)
        if caller != self.stream:
            self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            self.params.tokens, wide_tokens = self._read_in_place(tokens, self.tokens)
            self.params.positions, wide_positions = self._read_in_place(positions, self.positions)
            self.params.ids_i64 = int(wide_tokens) | int(wide_positions) << 1
            self.epoch += 1
            self.params.epoch = self.epoch & 0xFFFFFFFF
            self.kernel.launch(self.plan.num_blocks, self.params, self.stream)
        if caller != self.stream:
            caller.wait_stream(self.stream)
            for t in (tokens, positions):   # read on the decoder's stream: not to be freed before that
                if t.device.type == "cuda":
                    t.record_stream(self.stream)

    samples_in_kernel = True     # set_sampling: temperature, top-k, top-p in the LM head (runtime/scheduler.py)

    def set_sampling(self, temperatures, seeds, top_ks=None, top_ps=None) -> None:
        """Per-sequence sampling for the following launches, until set again: temperatures (B,) (0 = greedy,
        bitwise the kernel's argmax), seeds (B,) integers (mod 2^64), and top_ks / top_ps (B,) of None or a
        positive integer / a number in (0, 1] (None for the list: none anywhere). The kernel then returns in
        out_tokens a draw from softmax(logits / T) over the top-k ranks and the top-p nucleus by the
        Gumbel-max trick, keyed by (seed, the input position, the vocabulary index): monokernel/gumbel.py,
        whose `sample_tokens` gives the same tokens from the logits the step returns (which stay the raw
        logits). top-k up to gumbel.TOP_CANDIDATES and a top-p nucleus within that many ranks are drawn in the
        kernel; any other such row is flagged by the kernel (Params::host_draw) and `step` / `verify` draw it
        here by the same rule from the logits (`last_host_draws` names them), one copy of the flags and of
        those rows a step. A bad temperature, seed, top_k or top_p raises InputError and changes nothing.
        The words are copied to the device (on the decoder's stream, so after the launches already queued
        and before the next) only when they change."""
        asked = (tuple(temperatures), tuple(seeds), None if top_ks is None else tuple(top_ks),
                 None if top_ps is None else tuple(top_ps))
        if asked == self._sampling_asked:      # the scheduler sets them every step: most steps change nothing
            return
        words = gumbel.sampling_words(temperatures, seeds, self.plan.batch, top_ks, top_ps,
                                      vocab_size=self.plan.spec.vocab_size)
        if not np.array_equal(words, self._sampling_words):
            with torch.cuda.stream(self.stream):
                self.sampling.copy_(torch.from_numpy(words.view(np.int32)), non_blocking=True)
            self._sampling_words = words
            self._any_filtered = bool(gumbel.filtered_rows(words).any())   # read by every step: once here
        self._sampling_asked = asked

    def _host_draws(self, out: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """out_tokens (B,) with the rows the kernel flagged drawn by gumbel's rule from this step's logits;
        nothing to read back unless a row asks for top-k or top-p."""
        self.last_host_draws = []
        if not self._any_filtered:
            return out
        with torch.cuda.stream(self.stream):
            flags = self.host_draw.cpu().numpy()
        rows = np.flatnonzero(flags)
        self.last_host_draws = rows.tolist()
        if not len(rows):
            return out
        with torch.cuda.stream(self.stream):
            logits = self.logits[torch.from_numpy(rows).to(self.logits.device)].cpu().numpy()
            tokens = out.cpu().numpy()
        drawn = gumbel.sample_tokens(logits, self._sampling_words[rows], positions.cpu().numpy()[rows])
        tokens[rows] = drawn
        return torch.from_numpy(tokens).to(out.device, out.dtype)

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
        """Raises the error of a failed step (a synchronisation) and leaves the decoder ready for the next:
        a step with a bad input did nothing, so the epoch goes back to the last step that ran; after any
        other failure the counters are out of step and start again from zero (the steps queued behind a
        failed one do nothing either: step_check.cuh)."""
        with torch.cuda.stream(self.stream):
            words = self.error.tolist()
        if not words[0]:
            return
        error, rollback = step_error(words, self.epoch, self.plan, self.timeout_s)
        if rollback is None:
            self.reset()
        else:
            self.error.zero_()
            self.epoch = rollback
        raise error

    def reset(self) -> None:
        """Counters, split arrivals, the error and the sampling (every sequence greedy) back to a fresh
        decoder's; the KV cache is kept."""
        with torch.cuda.stream(self.stream):
            for f in PARAMS:
                if f.role == "buffer" and f.init == "zeros":
                    getattr(self.buffers, f.name).zero_()
        self._sampling_words = np.zeros_like(self._sampling_words)
        self._sampling_asked = None
        self._any_filtered = False
        self.last_host_draws = []
        self.epoch = 0

    def step(self, tokens: torch.Tensor, positions: torch.Tensor):
        """One decode step; returns (next tokens (B,) long: greedy, or drawn where set_sampling says so;
        logits (B, V) fp32), checked for errors."""
        self.launch(tokens, positions)
        self.check()
        return self._host_draws(self.out_tokens[:self.plan.batch], positions).long(), self.logits

    @property
    def tokens_per_seq(self) -> int:
        return self.plan.inputs.tokens_per_seq

    def verify(self, tokens: torch.Tensor, start: torch.Tensor):
        """One verify step (tokens_per_seq T > 1): tokens (S, T), sequence s's last token and T - 1 draft tokens
        at positions start[s] .. start[s] + T - 1, causal among themselves. Returns (greedy (S, T) long, the
        draft tokens accepted (S,) long: how many leading drafts equal the greedy token of the row before,
        logits (S, T, V) fp32), checked for errors. K/V rows of rejected drafts lie past the accepted
        positions: the next step overwrites them before any query reads them."""
        S, T = self.cache.batch, self.tokens_per_seq
        if tuple(tokens.shape) != (S, T) or tuple(start.shape) != (S,):
            raise InputError(f"verify takes tokens ({S}, {T}) and start positions ({S},), not {tuple(tokens.shape)} "
                             f"and {tuple(start.shape)}")
        dev = self.w.device
        positions = (start.to(dev, torch.int64)[:, None] + torch.arange(T, device=dev)[None, :]).reshape(-1)
        self.launch(tokens.to(dev).reshape(-1), positions)
        self.check()
        out = self.out_tokens.long()
        B = S * T
        drawn = self._host_draws(out[:B], positions)
        if self.last_host_draws:   # the kernel counted acceptance against its own tokens of those rows
            same = drawn.view(S, T)[:, :-1] == tokens.to(dev).view(S, T)[:, 1:].long()
            out = torch.cat([drawn, same.int().cumprod(dim=1).sum(dim=1)]) if T > 1 else drawn
        return out[:B].view(S, T), (out[B:] if T > 1 else out[:0]), self.logits.view(S, T, -1)

    # ---- the rest of the Decoder protocol (runtime/decoders.py) -------------------------------------
    def enqueue(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """launch(), then the kernel's own output buffers: its next launch rewrites them. The positions are
        not checked on the host (that would drain the launch queue): the engine checked them when it
        accepted the request, and the error flag travels back with each step's tokens (`status`). Rows the
        kernel flags for the host (host_draw: top-k/top-p past its candidates) keep the kernel's stand-in token
        here; `step` and `verify` redraw them."""
        self.launch(tokens, positions)
        return self.out_tokens, self.logits

    @property
    def status(self) -> torch.Tensor:
        return self.error

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.write(layer, k, v)


__all__ = ["MegaDecoder", "gpu_info", "kernel_plan", "step_error"]
