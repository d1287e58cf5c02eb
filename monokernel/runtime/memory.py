"""Memory a model needs, estimated before anything is allocated: weights + KV cache + workspace, against what the
device has free. A model that cannot fit is refused with the numbers and the fix instead of ending in the
allocator's error or, on the CPU, in the kernel's OOM killer (which leaves no message at all)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InsufficientMemory
from ..models.formats import get_format
from ..models.spec import ModelSpec

GB = 1e9
# The CUDA context, cuBLAS workspaces and the megakernel's own buffers; on the CPU the torch runtime and Python.
RESERVE = {"cuda": 1 << 30, "cpu": 1 << 29}
PREFILL_LOGITS_BYTES = 1 << 29   # the reference forward's fp32 logits of one prefill chunk are capped at this


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int          # bytes
    kv_cache: int
    workspace: int        # the largest transient: a prefill chunk's activations or a tensor being loaded
    dtype: str
    batch: int
    max_seq: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace

    def describe(self) -> str:
        return (f"{self.total / GB:.1f} GB (weights {self.weights / GB:.1f} GB in {self.dtype}, KV cache "
                f"{self.kv_cache / GB:.1f} GB for {self.batch} x {self.max_seq} positions, workspace "
                f"{self.workspace / GB:.1f} GB)")


def kv_cache_bytes(spec: ModelSpec, batch: int, max_seq: int, dtype) -> int:
    return spec.kv_bytes_per_position(dtype) * batch * max_seq


def prefill_chunk(batch: int, vocab: int, device_type: str) -> int:
    """Positions per reference prefill chunk: the chunk's fp32 logits stay within PREFILL_LOGITS_BYTES, and on the
    CPU chunks stay short enough that a long prompt reports progress every few seconds."""
    chunk = max(16, PREFILL_LOGITS_BYTES // (batch * vocab * 4))
    return min(chunk, 512) if device_type == "cpu" else chunk


def workspace_bytes(spec: ModelSpec, batch: int, max_seq: int, device_type: str, *, step_positions: int | None = None,
                    loading: bool = True) -> int:
    """The reference forward over `step_positions` positions (default: one prefill chunk): fp32 attention scores
    and probabilities, fp32 copies of the expanded keys and values, the layer's activations, the logits; or, when
    `loading`, one checkpoint tensor in fp32 with its converted copy, whichever is larger; plus the fixed reserve."""
    s, f32 = spec, 4
    T = min(prefill_chunk(batch, spec.vocab_size, device_type) if step_positions is None else step_positions, max_seq)
    # scores, their masked copy and the probabilities; keys and values expanded to every head, then in fp32
    attention = 3 * batch * s.num_heads * T * max_seq * f32 + 4 * batch * s.num_heads * max_seq * s.head_dim * f32
    activations = batch * T * (3 * s.hidden_size + s.qkv_size + 3 * s.intermediate_size) * f32
    logits = batch * T * s.vocab_size * f32
    biggest = max(s.vocab_size * s.hidden_size, 2 * s.intermediate_size * s.hidden_size)
    loaded = 2 * biggest * f32 if loading else 0   # a checkpoint tensor as stored (at most fp32) and its copy
    return max(attention + activations + logits, loaded) + RESERVE.get(device_type, RESERVE["cuda"])


def estimate_memory(spec: ModelSpec, dtype, batch: int, max_seq: int, device: torch.device | str, *,
                    step_positions: int | None = None, weights=None) -> MemoryEstimate:
    """Bytes to load `spec` in `dtype` and serve `batch` sequences of `max_seq` positions on `device`, with
    prefills (default) or decode steps of `step_positions` positions only (the bench). `weights`: a quantised
    format the layer matrices are stored in (the embedding and LM head then stay in `dtype`)."""
    device_type = torch.device(device).type
    fmt = get_format(dtype)
    wf = None if weights is None else get_format(weights)
    if wf is not None and wf.quantised:
        embed = spec.vocab_size * spec.hidden_size * fmt.element_bytes
        head = 0 if spec.tie_word_embeddings else embed
        weight_bytes = spec.weight_bytes_per_step(wf, fmt, fmt) - head + embed
    else:
        weight_bytes = spec.num_params() * fmt.element_bytes
    return MemoryEstimate(weights=weight_bytes,
                          kv_cache=kv_cache_bytes(spec, batch, max_seq, dtype),
                          workspace=workspace_bytes(spec, batch, max_seq, device_type, step_positions=step_positions),
                          dtype=fmt.name, batch=batch, max_seq=max_seq)


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory on the device: CUDA's free bytes, or the CPU's available RAM (MemAvailable: free plus what
    the kernel can reclaim); None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks torch's caching allocator holds but no tensor uses are free to this process too
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:   # psutil missing or unsupported here: no check rather than a wrong one
        return None


def device_label(device: torch.device | str) -> str:
    device = torch.device(device)
    return "the CPU" if device.type == "cpu" else f"{device}"


def check_fits(estimate: MemoryEstimate, device: torch.device | str, what: str, *, max_seq_limit: int,
               available: int | None = None) -> None:
    """Raises InsufficientMemory naming the numbers and the Python arguments that shrink them."""
    free = available_bytes(device) if available is None else available
    if free is None or estimate.total <= free:
        return
    fixes = []
    if estimate.dtype == "fp32":
        fixes.append("dtype='bf16' (halves the weights)")
    if estimate.max_seq > 256:
        fixes.append(f"a smaller max_seq (now {estimate.max_seq}, up to {max_seq_limit})")
    fixes.append("a smaller model")
    raise InsufficientMemory(f"{what} needs {estimate.describe()} but {device_label(device)} has "
                             f"{free / GB:.1f} GB free; use {', '.join(fixes[:-1]) + ' or ' if len(fixes) > 1 else ''}"
                             f"{fixes[-1]}")
