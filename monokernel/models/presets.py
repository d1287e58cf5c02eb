"""Real shapes of published models, for benchmarks with seeded random weights (`--model preset:NAME`)."""
from __future__ import annotations

from ..errors import UnsupportedModelError
from .spec import ModelSpec, RopeScaling

_LLAMA3_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=8192)
_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192)


def _llama(name, hidden, inter, layers, heads, kv, tied, scaling, head_dim=128):
    return ModelSpec(name=name, arch="LlamaForCausalLM", vocab_size=128256, hidden_size=hidden,
                     intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                     head_dim=head_dim, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                     tie_word_embeddings=tied, rope_scaling=scaling, bos_token_id=128000,
                     eos_token_ids=(128001, 128008, 128009))


PRESETS: dict[str, ModelSpec] = {
    "llama-3.2-1b": _llama("llama-3.2-1b", 2048, 8192, 16, 32, 8, True, _LLAMA3_SCALING, head_dim=64),
    "llama-3.2-3b": _llama("llama-3.2-3b", 3072, 8192, 28, 24, 8, True, _LLAMA3_SCALING),
    "llama-3.1-8b": _llama("llama-3.1-8b", 4096, 14336, 32, 32, 8, False, _LLAMA31_SCALING),
    "llama-3.1-70b": _llama("llama-3.1-70b", 8192, 28672, 80, 64, 8, False, _LLAMA31_SCALING),
}


def preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnsupportedModelError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None
