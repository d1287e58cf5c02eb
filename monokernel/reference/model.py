"""The reference forward pass: plain PyTorch, readable, the oracle every fast path is tested against.

It computes what Hugging Face transformers computes, in the same dtype and with the same rounding
points (norms in fp32 then cast, residual stream in the model dtype), over a static KV cache (runtime/kv_cache.py).

Quantised weights stay packed: each matmul reads its layer's matrix through PackedWeights.matrix, which
dequantises it (models/quant.dequantize, the formats' one oracle) into the activation dtype for that matmul only.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..models.spec import rope_inv_freq
from ..models.weights import PackedWeights

if TYPE_CHECKING:   # an annotation only: reference/ sits below runtime/ in the pipeline
    from ..runtime.kv_cache import KVCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions (B, T) int -> cos, sin (B, T, D) in `dtype` (angles in fp32, as transformers)."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)[None, None, :]  # (B, T, D/2)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, D); cos/sin (B, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention in fp32, output in the input dtype. Written out rather than through
    F.scaled_dot_product_attention: its CUDA memory-efficient path gave wrong rows for batch
    entries > 0 with a boolean mask whose length is not a multiple of 16 (seen on an H100)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])   # (B, nh, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


class ReferenceModel:
    """Forward over a batch of sequences, each at its own position, writing new K/V into the cache."""

    def __init__(self, weights: PackedWeights):
        self.w = weights
        self.spec = weights.spec
        self.inv_freq = rope_inv_freq(self.spec).to(weights.device)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens (B, T) long, start_pos (B,) long: token t of sequence b sits at position start_pos[b] + t.

        Returns logits (B, T, V) in fp32. Query (b, t) attends to cache positions <= start_pos[b] + t, so
        rows padded past a sequence's end write junk only where later steps overwrite or mask it."""
        s, w = self.spec, self.w
        B, T = tokens.shape
        D, G = s.head_dim, s.group_size
        positions = start_pos[:, None] + torch.arange(T, device=tokens.device)[None, :]  # (B, T)
        kv_len = int(positions.max()) + 1
        cos, sin = rope_cos_sin(self.inv_freq, positions, w.dtype)
        # mask (B, 1, T, kv_len): True where the key may be attended
        mask = torch.arange(kv_len, device=tokens.device)[None, None, None, :] <= positions[:, None, :, None]
        batch_idx = torch.arange(B, device=tokens.device)[:, None].expand(B, T)

        x = w.embedding(tokens)  # (B, T, H)
        for layer in range(s.num_layers):
            h = rms_norm(x, w.attn_norm[layer], s.rms_norm_eps)
            qkv = F.linear(h, w.matrix("w_qkv", layer), None if w.b_qkv is None else w.b_qkv[layer])
            q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
            q = q.view(B, T, s.num_heads, D).transpose(1, 2)       # (B, nh, T, D)
            k = k.view(B, T, s.num_kv_heads, D).transpose(1, 2)    # (B, nkv, T, D)
            v = v.view(B, T, s.num_kv_heads, D).transpose(1, 2)
            if s.qk_norm:
                q = rms_norm(q, w.q_norm[layer], s.rms_norm_eps)
                k = rms_norm(k, w.k_norm[layer], s.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            # scatter the new K/V at each sequence's own positions
            cache.k[layer][batch_idx, :, positions] = k.transpose(1, 2)
            cache.v[layer][batch_idx, :, positions] = v.transpose(1, 2)
            keys = cache.k[layer, :, :, :kv_len].repeat_interleave(G, dim=1)    # (B, nh, kv_len, D)
            values = cache.v[layer, :, :, :kv_len].repeat_interleave(G, dim=1)
            att = attention(q, keys, values, mask).transpose(1, 2).reshape(B, T, s.q_size)
            x = x + F.linear(att, w.matrix("w_o", layer))

            h = rms_norm(x, w.mlp_norm[layer], s.rms_norm_eps)
            gu = F.linear(h, w.matrix("w_gu", layer))
            x = x + F.linear(F.silu(gu[..., 0::2]) * gu[..., 1::2], w.matrix("w_down", layer))
        x = rms_norm(x, w.final_norm, s.rms_norm_eps)
        return F.linear(x, w.matrix("lm_head")).float()
