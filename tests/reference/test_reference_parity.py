"""The reference forward against Hugging Face transformers on tiny random models built here (no hub).

A batch of three prompts of different lengths is prefilled right-padded, then decoded for 16 steps, each
sequence at its own position, teacher-forced with random tokens so both sides see identical inputs; each
sequence is compared with transformers run on that sequence alone. fp32 throughout: the two sides differ
only in summation order, ~1e-6 relative, so 1e-4 catches any real mistake (a wrong RoPE frequency or mask
shows up at 1e-2 or more)."""
from __future__ import annotations

import inspect

import pytest
import torch
import transformers

from monokernel.models.spec import ModelSpec
from monokernel.models.weights import pack_from_hf
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.decoders import ReferenceDecoder
from monokernel.runtime.kv_cache import KVCache

from conftest import FP32_TOL, rel_max

DECODE_STEPS = 16
LENGTHS = (7, 1, 12)

_COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}   # 64: all three wavelength bands occur

CASES = {
    "llama": ("LlamaForCausalLM", transformers.LlamaConfig, {}),
    "llama3-rope-tied": ("LlamaForCausalLM", transformers.LlamaConfig,
                         dict(rope_parameters=_LLAMA3_ROPE, tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen2": ("Qwen2ForCausalLM", transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3ForCausalLM", transformers.Qwen3Config, dict(head_dim=24, tie_word_embeddings=True)),
    "mistral": ("MistralForCausalLM", transformers.MistralConfig, dict(num_key_value_heads=4, sliding_window=None)),
}


def _hf_model(arch: str, config_cls, overrides: dict, seed: int):
    cfg = config_cls(**{**_COMMON, **overrides})
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    # transformers initialises with std 0.02 and unit norms: logits would be nearly flat. Use trained-like
    # statistics instead so that every term (norm weights, biases, RoPE) moves the logits visibly.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return cfg, model


# transformers 5.x renamed past_key_values to cache (argument and output field); accept both
_CACHE_ARG = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"


def _cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    arch, config_cls, overrides = CASES[case]
    cfg, hf = _hf_model(arch, config_cls, overrides, seed=len(case))
    spec = ModelSpec.from_hf_config(cfg.to_dict(), name=case)
    state = hf.state_dict()
    weights = pack_from_hf(spec, state.__getitem__, torch.float32, "cpu")
    if spec.tie_word_embeddings:
        assert "lm_head.weight" not in state or torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])

    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, spec.vocab_size, (n,), generator=gen) for n in LENGTHS]
    forced = torch.randint(0, spec.vocab_size, (len(LENGTHS), DECODE_STEPS), generator=gen)

    # ours: one batch, right-padded prefill, then per-sequence positions
    model = ReferenceModel(weights)
    cache = KVCache(spec, len(LENGTHS), max(LENGTHS) + DECODE_STEPS, torch.float32, "cpu")
    padded = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    for b, p in enumerate(prompts):
        padded[b, :len(p)] = p
    prefill = model.forward(padded, torch.zeros(len(LENGTHS), dtype=torch.long), cache)
    decoder = ReferenceDecoder(model, cache)
    positions = torch.tensor(LENGTHS)
    steps = []
    for t in range(DECODE_STEPS):
        greedy, logits = decoder.step(forced[:, t], positions + t)
        assert torch.equal(greedy, logits.argmax(-1))
        steps.append(logits)

    # transformers: each sequence alone, with its own KV cache
    with torch.no_grad():
        for b, p in enumerate(prompts):
            out = hf(input_ids=p[None], use_cache=True)
            err = rel_max(prefill[b, :len(p)], out.logits[0])
            assert err <= FP32_TOL, f"{case}: prefill of sequence {b} differs by {err:.2e}"
            for t in range(DECODE_STEPS):
                out = hf(input_ids=forced[b, t].view(1, 1), use_cache=True, **{_CACHE_ARG: _cache_of(out)})
                err = rel_max(steps[t][b], out.logits[0, -1])
                assert err <= FP32_TOL, f"{case}: decode step {t} of sequence {b} differs by {err:.2e}"


def test_llama3_scaling():
    """Llama-3 scaling changes the frequencies. Guards the parity test above against passing vacuously: the scaling
    must alter some frequencies."""
    from monokernel.models.spec import rope_inv_freq

    arch, config_cls, overrides = CASES["llama3-rope-tied"]
    cfg, _ = _hf_model(arch, config_cls, overrides, seed=0)
    spec = ModelSpec.from_hf_config(cfg.to_dict())
    assert spec.rope_scaling is not None and spec.tie_word_embeddings
    plain = rope_inv_freq(spec.with_(rope_scaling=None))
    scaled = rope_inv_freq(spec)
    changed = ~torch.isclose(plain, scaled)
    assert changed.any() and not changed.all()
