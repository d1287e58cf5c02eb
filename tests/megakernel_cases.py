"""Shared by the simulator and GPU megakernel tests: tiny specs covering every supported feature."""
from __future__ import annotations

import torch

from monokernel.models.spec import ModelSpec, RopeScaling
from monokernel.reference.model import ReferenceModel
from monokernel.runtime.kv_cache import KVCache

TINY_SPECS = {
    # llama3 rope scaling, GQA 4:1, tied embeddings
    "llama": ModelSpec(name="tiny-llama", arch="LlamaForCausalLM", vocab_size=1000, hidden_size=256,
                       intermediate_size=688, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=32,
                       rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=512, tie_word_embeddings=True,
                       rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)),
    # q/k/v bias, head_dim 64, GQA 3:1
    "qwen2": ModelSpec(name="tiny-qwen2", arch="Qwen2ForCausalLM", vocab_size=777, hidden_size=384,
                       intermediate_size=512, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=64,
                       rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512, qkv_bias=True),
    # q/k RMSNorm, head_dim 128 with hidden 256 (q_size != hidden), MHA
    "qwen3": ModelSpec(name="tiny-qwen3", arch="Qwen3ForCausalLM", vocab_size=515, hidden_size=256,
                       intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=128,
                       rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=512, qk_norm=True),
    "mistral": ModelSpec(name="tiny-mistral", arch="MistralForCausalLM", vocab_size=640, hidden_size=320,
                         intermediate_size=640, num_layers=2, num_heads=5, num_kv_heads=1, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=512),
}

JUNK = 3.0e4   # unused KV slots: an out-of-bounds read changes the answer instead of hiding


def prefilled(model: ReferenceModel, batch: int, max_seq: int, lengths: list[int], gen: torch.Generator,
              prompt: torch.Tensor | None = None):
    """Two identical caches prefilled with the prompt (default: random tokens) up to the given lengths,
    junk beyond."""
    spec, w = model.spec, model.w
    caches = []
    if prompt is None:
        prompt = torch.randint(0, spec.vocab_size, (batch, max(lengths)), generator=gen)
    prompt = prompt.to(w.device)
    for _ in range(2):
        c = KVCache(spec, batch, max_seq, w.dtype, w.device)
        c.k.fill_(JUNK)
        c.v.fill_(-JUNK)
        model.forward(prompt, torch.zeros(batch, dtype=torch.long, device=w.device), c)
        for b, n in enumerate(lengths):    # slots at and past each sequence's length hold junk again
            c.k[:, b, :, n:] = JUNK
            c.v[:, b, :, n:] = -JUNK
        caches.append(c)
    return caches
