"""Prefill of one sequence into one slot of the KV cache, a chunk of positions at a time.

Attention goes through F.scaled_dot_product_attention with a lower-right causal bias (query t of a chunk that
starts at position p0 sees keys 0..p0+t), so no (T, S) fp32 score matrix is built by us: on CUDA the bias
dispatches to the flash / memory-efficient kernels, on the CPU to the fused CPU flash kernel. Only the last
position's hidden state goes through the LM head: a prompt of T tokens costs one (V,) row of logits, not (T, V).
Quantised weights are read as the reference reads them (PackedWeights.matrix: dequantised for the matmul only).

CHUNK bounds how long prefill holds up the running decodes: the scheduler prefills at most CHUNK positions per
step (one long prompt's chunk, or several short prompts), then runs a decode step for the batch. On the CPU, 128
positions of SmolLM2-135M in fp32 took 0.27 s on the shared 2-core development machine (2026-12-02, other jobs
running), about 2.5 decode steps at batch 8 (0.10 s each); on a GPU 1024 positions of an 8B model are a few
decode steps' worth of time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..reference.model import ReferenceModel, apply_rope, rms_norm, rope_cos_sin
from .kv_cache import KVCache

CHUNK = {"cpu": 128, "cuda": 1024}   # positions per prefill chunk, by device type


def chunk_size(device: torch.device) -> int:
    return CHUNK.get(device.type, CHUNK["cuda"])


@torch.no_grad()
def prefill_chunk(model: ReferenceModel, tokens: list[int], start: int, cache: KVCache, slot: int,
                  last_logits: bool = True) -> torch.Tensor | None:
    """Runs tokens at positions start..start+T-1 of cache slot `slot`, writing their K/V there.

    Returns the fp32 logits (V,) of the last token when `last_logits`, else None (an intermediate chunk)."""
    s, w = model.spec, model.w
    T, D, G = len(tokens), s.head_dim, s.group_size
    end = start + T
    ids = torch.tensor(tokens, dtype=torch.long, device=w.device)[None]          # (1, T)
    positions = torch.arange(start, end, device=w.device)[None]                  # (1, T)
    cos, sin = rope_cos_sin(model.inv_freq, positions, w.dtype)
    bias = causal_lower_right(T, end)
    x = w.embedding(ids)        # packed weights (models/quant) are read through PackedWeights, as the reference does
    for layer in range(s.num_layers):
        h = rms_norm(x, w.attn_norm[layer], s.rms_norm_eps)
        qkv = F.linear(h, w.matrix("w_qkv", layer), None if w.b_qkv is None else w.b_qkv[layer])
        q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q = q.view(1, T, s.num_heads, D).transpose(1, 2)
        k = k.view(1, T, s.num_kv_heads, D).transpose(1, 2)
        v = v.view(1, T, s.num_kv_heads, D).transpose(1, 2)
        if s.qk_norm:
            q = rms_norm(q, w.q_norm[layer], s.rms_norm_eps)
            k = rms_norm(k, w.k_norm[layer], s.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[layer, slot, :, start:end] = k[0]
        cache.v[layer, slot, :, start:end] = v[0]
        keys = cache.k[layer, slot:slot + 1, :, :end].repeat_interleave(G, dim=1)     # (1, nh, end, D)
        values = cache.v[layer, slot:slot + 1, :, :end].repeat_interleave(G, dim=1)
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
        x = x + F.linear(att.transpose(1, 2).reshape(1, T, s.q_size), w.matrix("w_o", layer))
        h = rms_norm(x, w.mlp_norm[layer], s.rms_norm_eps)
        gu = F.linear(h, w.matrix("w_gu", layer))
        x = x + F.linear(F.silu(gu[..., 0::2]) * gu[..., 1::2], w.matrix("w_down", layer))
    if not last_logits:
        return None
    x = rms_norm(x[0, -1], w.final_norm, s.rms_norm_eps)
    return F.linear(x, w.matrix("lm_head")).float()
