"""A tiny transformers model with seeded, well-scaled random weights (norms near 1, matrices ~1/sqrt(K)), for the
loader tests that write it out in a checkpoint format and read it back."""
from __future__ import annotations

import torch
import transformers


def tiny_hf_model(vocab: int, hidden: int, inter: int, arch: str = "llama") -> transformers.PreTrainedModel:
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
    cfg = transformers.Qwen2Config(**common) if arch == "qwen2" else transformers.LlamaConfig(**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model
