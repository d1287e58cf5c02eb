"""The Decoder protocol (runtime/decoders.py) on CPU: every back end implements it, and driven through it
alone the reference and the baselines compute the same step (fp32: summation order only, 1e-4)."""
from __future__ import annotations

import pytest
import torch

from monokernel.baselines.hf import HFDecoder
from monokernel.baselines.torch_compile import TorchCompileDecoder
from monokernel.bench.engines import build_engine, fill_random_kv
from monokernel.errors import InputError
from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.decoders import Decoder, ReferenceDecoder
from monokernel.runtime.kv_cache import KVCache
from monokernel.runtime.mega import MegaDecoder

from conftest import FP32_TOL, TINY_SPECS, rel_max

B, S, CONTEXT = 3, 40, 17


def _decoders(spec) -> dict[str, Decoder]:
    """Every CPU back end over the same fp32 weights, each cache holding the same seeded random context."""
    w = random_weights(spec, torch.float32, "cpu", seed=5)
    out = {"reference": ReferenceDecoder(ReferenceModel(w), KVCache(spec, B, S, w.dtype, w.device)),
           "torch-compile": TorchCompileDecoder(w, B, S, compile=False),
           "hf": HFDecoder(w, B, S)}
    for d in out.values():
        fill_random_kv(d, spec, B, CONTEXT, w.dtype, w.device, seed=1)
    return out


def test_protocol():
    """isinstance through runtime_checkable for the CPU back ends; the megakernel (no GPU here) by its class."""
    for name, d in _decoders(TINY_SPECS["llama"]).items():
        assert isinstance(d, Decoder), name
    members = ("step", "enqueue", "check", "write_kv", "status")
    assert all(hasattr(MegaDecoder, m) for m in members)
    assert not isinstance(object(), Decoder)


@pytest.mark.parametrize("name", list(TINY_SPECS))
def test_one_step_agrees(name):
    """One step of each back end through step() and, on a fresh copy, enqueue() + check(): the same greedy
    tokens and logits as the reference's step."""
    spec = TINY_SPECS[name]
    tokens = torch.randint(0, spec.vocab_size, (B,), generator=torch.Generator().manual_seed(2))
    positions = torch.full((B,), CONTEXT)      # one position for all: transformers' static cache needs it
    outs = {k: d.step(tokens, positions) for k, d in _decoders(spec).items()}
    queued = {}
    for k, d in _decoders(spec).items():
        queued[k] = d.enqueue(tokens, positions)
        assert d.status is None
        d.check()
    want_greedy, want = outs["reference"]
    assert torch.equal(want_greedy, want.argmax(-1))
    for k, (greedy, logits) in [*outs.items(), *queued.items()]:
        assert rel_max(logits, want) <= FP32_TOL, f"{name}/{k}: {rel_max(logits, want):.2e}"
        assert torch.equal(greedy, want_greedy), k


def test_step_checks_positions():
    """step() refuses positions outside the cache; a negative one would otherwise index from its end."""
    for name, d in _decoders(TINY_SPECS["qwen2"]).items():
        tokens = torch.zeros(B, dtype=torch.long)
        for bad in (S, -1):
            with pytest.raises(InputError, match="outside the"):
                d.step(tokens, torch.full((B,), bad))


def test_bench_engines_are_decoders():
    """build_engine only constructs: what the runner drives is the back end's own decoder."""
    w = random_weights(TINY_SPECS["mistral"], torch.float32, "cpu", seed=1)
    tc = build_engine("torch-compile", w, 1, 16, compile=False)
    assert type(tc.decoder) is TorchCompileDecoder and tc.variant == "eager (not compiled), math attention"
    hf = build_engine("hf-compile", w, 1, 16, compile=False)
    assert type(hf.decoder) is HFDecoder
    assert hf.engine == "hf" and hf.variant.startswith("eager (") and hf.variant.endswith(", compile disabled")
