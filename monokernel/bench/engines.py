"""The engines under test, built by name: each is a Decoder (runtime/decoders.py), so the runner drives them
alike (write_kv for the context, step for the agreement steps, enqueue for the timed ones, check after)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from ..errors import MonokernelError
from ..models.spec import ModelSpec
from ..models.weights import PackedWeights
from ..runtime.decoders import Decoder
from ..runtime.kv_cache import KVCache

ENGINES = ("monokernel", "torch-compile", "hf", "hf-compile", "reference")


class EngineUnavailable(MonokernelError):
    """The engine cannot run here (not importable, no GPU, unsupported shape); its rows are skipped."""


@dataclass(frozen=True)
class BenchEngine:
    engine: str                  # the row's engine column
    variant: str
    decoder: Decoder
    # which generated kernel ran (its cache entry: model, batch, dtype and the source hash), so rows
    # appended by different runs can be told apart
    identity: dict[str, str] = field(default_factory=dict)


def monokernel_import_error() -> str | None:
    """Why the megakernel cannot be imported, or None when it can."""
    try:
        importlib.import_module("monokernel.runtime.mega")
    except Exception as e:   # a half-written module may fail in any way
        return f"monokernel.runtime.mega does not import ({type(e).__name__}: {e})"
    return None


def build_engine(name: str, weights: PackedWeights, batch: int, max_seq: int, *, compile: bool = True,
                 attention: str = "math", tokens_per_seq: int = 1) -> BenchEngine:
    """tokens_per_seq T > 1: the megakernel's verify step, T rows of each of `batch` sequences a launch."""
    if tokens_per_seq > 1 and name != "monokernel":
        raise EngineUnavailable(f"{name} has no verify step of {tokens_per_seq} tokens a sequence (monokernel only)")
    if name == "monokernel":
        reason = monokernel_import_error()
        if reason:
            raise EngineUnavailable(reason)
        if weights.device.type != "cuda":
            raise EngineUnavailable("the megakernel needs a CUDA device")
        from ..runtime.mega import MegaDecoder

        mega = MegaDecoder(weights, KVCache(weights.spec, batch, max_seq, weights.dtype, weights.device),
                           tokens_per_seq=tokens_per_seq)
        variant = "megakernel" + (f", verify T={tokens_per_seq}" if tokens_per_seq > 1 else "")
        return BenchEngine(name, variant, mega, {"kernel": mega.compiled.path.parent.name})
    if name == "reference":
        from ..reference.model import ReferenceModel
        from ..runtime.decoders import ReferenceDecoder

        cache = KVCache(weights.spec, batch, max_seq, weights.dtype, weights.device)
        packed = "weights packed, dequantised per matmul" if weights.quantised else "dense weights"
        return BenchEngine(name, f"eager, {packed}", ReferenceDecoder(ReferenceModel(weights), cache))
    if weights.quantised and name in ("hf", "hf-compile"):
        raise EngineUnavailable("transformers reads dense weights; the reference engine reads the packed ones")
    if name == "torch-compile":
        from ..baselines.torch_compile import TorchCompileDecoder

        from ..baselines.quantized import NoQuantisedPath

        try:   # quantised weights: gpt-fast's int8 / int4 weight-only paths over the same values (quantized.py)
            tc = TorchCompileDecoder(weights, batch, max_seq, compile=compile, attention=attention)
        except NoQuantisedPath as e:
            raise EngineUnavailable(f"torch-compile: {e}") from None
        return BenchEngine(name, tc.variant, tc)
    if name in ("hf", "hf-compile"):
        try:
            from ..baselines.hf import HFDecoder
        except ImportError as e:
            raise EngineUnavailable(f"transformers does not import ({e})") from None
        hf = HFDecoder(weights, batch, max_seq, compile=name == "hf-compile" and compile)
        disabled = name == "hf-compile" and not compile
        return BenchEngine("hf", hf.variant + (", compile disabled" if disabled else ""), hf)
    raise EngineUnavailable(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")


@torch.no_grad()
def fill_random_kv(decoder: Decoder, spec: ModelSpec, batch: int, context: int, dtype: torch.dtype, device,
                   seed: int) -> None:
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
        decoder.write_kv(layer, k, v)
        del k, v
