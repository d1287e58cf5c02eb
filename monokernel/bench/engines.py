"""The engines under test behind one small interface, so the runner treats them alike.

  write_kv(layer, k, v)              K/V (B, KVH, T, D) into cache positions 0..T-1
  step(tokens, positions, position)  one checked step -> (greedy (B,), logits (B, V) fp32); `positions` (B,)
                                     on the device, `position` the same value as a host int (every sequence
                                     of a benchmark run sits at the same position)
  launch(tokens, positions, position) one step for timing: enqueued, no host synchronisation where the
                                     engine allows it
  finish()                           after timing: surfaces errors of the launched steps
"""
from __future__ import annotations

import importlib

import torch

from ..errors import MonokernelError
from ..models.weights import PackedWeights
from ..runtime.kv_cache import KVCache

ENGINES = ("monokernel", "torch-compile", "hf", "hf-compile")


class EngineUnavailable(MonokernelError):
    """The engine cannot run here (not importable, no GPU, unsupported shape); its rows are skipped."""


def monokernel_import_error() -> str | None:
    """Why the megakernel cannot be imported, or None when it can."""
    try:
        importlib.import_module("monokernel.runtime.mega")
    except Exception as e:   # a half-written module may fail in any way
        return f"monokernel.runtime.mega does not import ({type(e).__name__}: {e})"
    return None


class MonokernelEngine:
    engine, variant = "monokernel", "megakernel"

    def __init__(self, weights: PackedWeights, batch: int, max_seq: int, **_):
        reason = monokernel_import_error()
        if reason:
            raise EngineUnavailable(reason)
        if weights.device.type != "cuda":
            raise EngineUnavailable("the megakernel needs a CUDA device")
        from ..runtime.mega import MegaDecoder

        self.cache = KVCache(weights.spec, batch, max_seq, weights.dtype, weights.device)
        self.decoder = MegaDecoder(weights, self.cache)
        # which generated kernel ran (its cache entry: model, batch, dtype and the source hash), so rows
        # appended by different runs can be told apart
        self.identity = {"kernel": self.decoder.compiled.path.parent.name}

    def write_kv(self, layer, k, v):
        T = k.shape[2]
        self.cache.k[layer, :, :, :T].copy_(k)
        self.cache.v[layer, :, :, :T].copy_(v)

    def step(self, tokens, positions, position):
        return self.decoder.step(tokens, positions)

    def launch(self, tokens, positions, position):
        # MegaDecoder.step reads the positions and the error flag on the host; launch() does neither.
        launch = getattr(self.decoder, "launch", None)
        if launch is None:
            self.decoder.step(tokens, positions)
        else:
            launch(tokens, positions)

    def finish(self):
        check = getattr(self.decoder, "check", None)
        if check is not None:
            check()


class TorchCompileEngine:
    engine = "torch-compile"

    def __init__(self, weights: PackedWeights, batch: int, max_seq: int, *, compile: bool = True,
                 attention: str = "math", **_):
        from ..baselines.torch_compile import TorchCompileDecoder

        self.decoder = TorchCompileDecoder(weights, batch, max_seq, compile=compile, attention=attention)
        self.variant = f"{'reduce-overhead' if compile else 'eager (not compiled)'}, {attention} attention"

    def write_kv(self, layer, k, v):
        self.decoder.write_kv(layer, k, v)

    def step(self, tokens, positions, position):
        return self.decoder.step(tokens, positions)

    def launch(self, tokens, positions, position):
        self.decoder.step(tokens, positions)

    def finish(self):
        pass


class HFEngine:
    engine = "hf"

    def __init__(self, weights: PackedWeights, batch: int, max_seq: int, *, hf_compile: bool = False,
                 requested_compile: bool = False, **_):
        try:
            from ..baselines.hf import HFDecoder
        except ImportError as e:
            raise EngineUnavailable(f"transformers does not import ({e})") from None
        self.decoder = HFDecoder(weights, batch, max_seq, compile=hf_compile)
        self.variant = self.decoder.variant
        if requested_compile and not hf_compile:
            self.variant += ", compile disabled"

    def write_kv(self, layer, k, v):
        self.decoder.write_kv(layer, k, v)

    def step(self, tokens, positions, position):
        return self.decoder.step_at(tokens, position)

    def launch(self, tokens, positions, position):
        self.decoder.step_at(tokens, position)

    def finish(self):
        pass


def build_engine(name: str, weights: PackedWeights, batch: int, max_seq: int, *, compile: bool = True,
                 attention: str = "math"):
    if name == "monokernel":
        return MonokernelEngine(weights, batch, max_seq)
    if name == "torch-compile":
        return TorchCompileEngine(weights, batch, max_seq, compile=compile, attention=attention)
    if name in ("hf", "hf-compile"):
        return HFEngine(weights, batch, max_seq, hf_compile=(name == "hf-compile" and compile),
                        requested_compile=name == "hf-compile")
    raise EngineUnavailable(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


@torch.no_grad()
def fill_random_kv(engine, spec, batch: int, context: int, dtype: torch.dtype, device, seed: int) -> None:
    """Positions 0..context-1 of every layer get seeded N(0, 1) K and V (the scale of real keys after an
    RMSNorm-ed projection): the same values for every engine, never zeros. A real prefill of 32k positions
    would cost more than the whole benchmark and changes nothing in a decode step's cost."""
    if context == 0:
        return
    shape = (batch, spec.num_kv_heads, context, spec.head_dim)
    gen = torch.Generator(device=device)
    for layer in range(spec.num_layers):
        gen.manual_seed(seed * 1_000_003 + layer)
        k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        v = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        engine.write_kv(layer, k, v)
        del k, v
