"""gpt-fast-style decoding with torch.compile: the baseline a user would pick instead of the megakernel.

The strongest honest version we know how to write, over the very tensors the megakernel reads:
  - a small module of its own whose parameters are the PackedWeights tensors themselves (no copies): the
    fused qkv projection, the fused gate/up projection with its interleaved rows, stacked per-layer
    matrices indexed inside the graph (views, free);
  - a static KV cache of its own, one (B, KVH, S, D) buffer pair per layer (gpt-fast's layout; one
    buffer per layer keeps each index_put_ a plain in-place scatter into a graph input, which inductor
    re-inplaces, where views of one shared buffer would need aliasing fix-ups);
  - one-token decode with a position per sequence, all as tensors, so one graph serves every step and
    every position (no recompiles): the new K/V are scattered with index_put_, attention runs over the
    whole static cache under a per-sequence mask, exactly as gpt-fast does;
  - GQA without repeating K/V: the G query heads of a KV head become G query rows of one attention
    problem (B, KVH, G, D) x (B, KVH, S, D), so the cache is read once, not G times;
  - torch.compile(mode="reduce-overhead", fullgraph=True) (CUDA graphs) with gpt-fast's inductor settings.

Attention is written out (matmul, fp32 softmax, matmul) so inductor sees it, as gpt-fast does by
forcing SDPA's math backend ("better for Inductor to codegen attention here"); `attention="sdpa"` uses
F.scaled_dot_product_attention instead and lets PyTorch pick its kernel. The math form computes q·k in
the model dtype (fp32 accumulation, rounded to the dtype), as Hugging Face's eager attention does; the
softmax is fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from ..models.spec import rope_inv_freq
from ..models.weights import PackedWeights
from ..reference.model import rms_norm
from ..runtime.decoders import check_positions

ATTENTION_KINDS = ("math", "sdpa")

# gpt-fast's settings (generate.py), applied process-wide when a compiled decoder is built.
INDUCTOR_SETTINGS = {"coordinate_descent_tuning": True, "triton.unique_kernel_names": True, "fx_graph_cache": True}


def configure_inductor() -> dict[str, bool]:
    """Applies INDUCTOR_SETTINGS; returns those this torch has (a renamed option is skipped, not fatal)."""
    import torch._inductor.config as cfg

    applied = {}
    for name, value in INDUCTOR_SETTINGS.items():
        *path, leaf = name.split(".")
        obj = cfg
        for p in path:
            obj = getattr(obj, p, None)
        if obj is not None and hasattr(obj, leaf):
            setattr(obj, leaf, value)
            applied[name] = value
    return applied


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, nh, D); cos/sin (B, T, 1, D) in the model dtype (the reference's rounding points)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class LayerCache(nn.Module):
    """One layer's static K/V, (B, KVH, S, D) each, registered as buffers so the compiled graph treats
    them as static-address inputs that it mutates in place."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class DecodeModel(nn.Module):
    """Forward over (B, T) tokens at (B, T) positions through the static cache; T = 1 is the decode step."""

    def __init__(self, weights: PackedWeights, batch: int, max_seq: int, attention: str = "math"):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise InputError(f"attention={attention!r}: expected one of {', '.join(ATTENTION_KINDS)}")
        s, dev, dt = weights.spec, weights.device, weights.dtype
        self.spec, self.attention, self.max_seq = s, attention, max_seq

        def param(t):
            return None if t is None else nn.Parameter(t, requires_grad=False)   # shares t's storage

        self.embed = param(weights.embed)
        self.tied = weights.lm_head is weights.embed
        self.lm_head = None if self.tied else param(weights.lm_head)
        self.final_norm = param(weights.final_norm)
        self.attn_norm, self.mlp_norm = param(weights.attn_norm), param(weights.mlp_norm)
        self._matrices(weights, param)
        self.b_qkv = param(weights.b_qkv)
        self.q_norm, self.k_norm = param(weights.q_norm), param(weights.k_norm)

        # RoPE tables (S, D): angles in fp32, cos/sin rounded to the model dtype, as the reference does.
        angles = torch.arange(max_seq, device=dev, dtype=torch.float32)[:, None] * rope_inv_freq(s).to(dev)[None]
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos().to(dt), persistent=False)
        self.register_buffer("sin", angles.sin().to(dt), persistent=False)
        self.register_buffer("key_pos", torch.arange(max_seq, device=dev), persistent=False)
        self.register_buffer("batch_idx", torch.arange(batch, device=dev), persistent=False)
        shape = (batch, s.num_kv_heads, max_seq, s.head_dim)
        self.caches = nn.ModuleList(LayerCache(shape, dt, dev) for _ in range(s.num_layers))

    def _matrices(self, weights: PackedWeights, param) -> None:
        """The per-layer matrices as parameters (quantized.py overrides this and `_linear` for packed weights)."""
        for name in ("w_qkv", "w_o", "w_gu", "w_down"):
            setattr(self, name, param(getattr(weights, name)))

    def _linear(self, name: str, i: int, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, getattr(self, name)[i], bias)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions (B, T) long -> logits (B, T, V) fp32."""
        s = self.spec
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]   # (B, T, 1, D)
        mask = self.key_pos <= positions[..., None]                                     # (B, T, S)
        x = F.embedding(tokens, self.embed)                                             # (B, T, H)
        for i in range(s.num_layers):
            x = self._layer(i, x, positions, cos, sin, mask)
        x = rms_norm(x, self.final_norm, s.rms_norm_eps)
        return F.linear(x, self.embed if self.tied else self.lm_head).float()

    def _layer(self, i, x, positions, cos, sin, mask):
        s = self.spec
        B, T, _ = x.shape
        h = rms_norm(x, self.attn_norm[i], s.rms_norm_eps)
        qkv = self._linear("w_qkv", i, h, None if self.b_qkv is None else self.b_qkv[i])
        q, k, v = qkv.split([s.q_size, s.kv_size, s.kv_size], dim=-1)
        q = q.view(B, T, s.num_heads, s.head_dim)
        k = k.view(B, T, s.num_kv_heads, s.head_dim)
        v = v.view(B, T, s.num_kv_heads, s.head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm[i], s.rms_norm_eps)
            k = rms_norm(k, self.k_norm[i], s.rms_norm_eps)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        cache = self.caches[i]
        # Advanced indices on dims 0 and 2 (split by a slice) put their (B, T) shape first: (B, T, KVH, D).
        rows = self.batch_idx[:, None]
        cache.k[rows, :, positions] = k
        cache.v[rows, :, positions] = v
        att = self._attend(q, cache.k, cache.v, mask)                               # (B, T, nh * D)
        x = x + self._linear("w_o", i, att)
        h = rms_norm(x, self.mlp_norm[i], s.rms_norm_eps)
        gu = self._linear("w_gu", i, h).unflatten(-1, (s.intermediate_size, 2))    # rows interleaved
        return x + self._linear("w_down", i, F.silu(gu[..., 0]) * gu[..., 1])

    def _attend(self, q, keys, values, mask):
        """q (B, T, nh, D), keys/values (B, KVH, S, D), mask (B, T, S) -> (B, T, nh * D)."""
        s = self.spec
        B, T = q.shape[:2]
        KVH, G, D = s.num_kv_heads, s.group_size, s.head_dim
        # Query head h = kvh * G + g reads KV head kvh (as repeat_interleave would): rows (g, t) per KV head.
        q = q.view(B, T, KVH, G, D).permute(0, 2, 3, 1, 4).reshape(B, KVH, G * T, D)
        m = mask[:, None].expand(B, G, T, mask.shape[-1]).reshape(B, 1, G * T, mask.shape[-1])
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=m)
        else:
            scores = torch.matmul(q, keys.transpose(-1, -2)).float() * (1.0 / math.sqrt(D))   # (B, KVH, G*T, S)
            probs = scores.masked_fill(~m, float("-inf")).softmax(dim=-1)
            out = torch.matmul(probs.to(q.dtype), values)                                    # (B, KVH, G*T, D)
        return out.view(B, KVH, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, s.q_size)


def decode_one_token(model: DecodeModel, tokens: torch.Tensor, positions: torch.Tensor):
    """tokens, positions (B,) -> (greedy next tokens (B,), logits (B, V) fp32). The function that is compiled."""
    logits = model(tokens[:, None], positions[:, None])[:, 0]
    return logits.argmax(dim=-1), logits


class TorchCompileDecoder:
    """A Decoder (runtime/decoders.py) over its own static cache, computing what MegaDecoder computes.

    compile=False runs the same module eagerly (CPU tests); compile=True compiles `decode_one_token`
    with mode="reduce-overhead" (CUDA graphs) and fullgraph=True. Compiling happens on the first step
    and takes a while (minutes for an 8B model with coordinate-descent tuning); the first two or three
    steps after that record the CUDA graph. `step` checks the positions on the host, `enqueue` does not
    (a synchronisation per step): out of range there, the graph's index kernels fail on the device."""

    status = None

    def __init__(self, weights: PackedWeights, batch: int, max_seq: int, *, compile: bool = True,
                 attention: str = "math"):
        if max_seq > weights.spec.max_position_embeddings:
            raise InputError(f"max_seq={max_seq} exceeds the model's {weights.spec.max_position_embeddings} positions")
        self.spec, self.batch, self.max_seq = weights.spec, batch, max_seq
        self.device = weights.device
        if weights.quantised:
            from .quantized import QuantDecodeModel   # gpt-fast's int8 / int4 weight-only paths

            self.model = QuantDecodeModel(weights, batch, max_seq, attention).eval()
        else:
            self.model = DecodeModel(weights, batch, max_seq, attention).eval()
        self.compiled = compile
        self.inductor_settings = configure_inductor() if compile else {}
        self._decode = (torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
                        if compile else decode_one_token)

    @property
    def variant(self) -> str:
        quant = getattr(self.model, "quant_variant", "")
        return (f"{'reduce-overhead' if self.compiled else 'eager (not compiled)'}, {self.model.attention} attention"
                + (f", {quant}" if quant else ""))

    @property
    def caches(self) -> list[LayerCache]:
        return list(self.model.caches)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_positions(positions, self.max_seq)
        return self.enqueue(tokens, positions)

    @torch.no_grad()
    def enqueue(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokens.to(self.device, torch.long, non_blocking=True)
        positions = positions.to(self.device, torch.long, non_blocking=True)
        if not self.compiled:
            return self._decode(self.model, tokens, positions)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        next_tokens, logits = self._decode(self.model, tokens, positions)
        # CUDA-graph outputs live in the graph's pool and are overwritten by the next replay (gpt-fast clones
        # too, so the baseline's timed step keeps paying for it although the Decoder contract would not ask)
        return next_tokens.clone(), logits.clone()

    def check(self) -> None:
        pass

    @torch.no_grad()
    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes K/V (B, KVH, T, D) of one layer into cache positions 0..T-1."""
        T = k.shape[2]
        if T > self.max_seq:
            raise InputError(f"{T} cached positions do not fit max_seq={self.max_seq}")
        c = self.model.caches[layer]
        c.k[:, :, :T].copy_(k)
        c.v[:, :, :T].copy_(v)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Uncompiled forward over prompts (B, T) at positions 0..T-1, in chunks of `chunk` tokens (the
        attention scores are (B, nh, chunk, S) in fp32). Returns the last position's logits (B, V) fp32."""
        tokens = tokens.to(self.device, torch.long)
        B, T = tokens.shape
        if B != self.batch or T > self.max_seq:
            raise InputError(f"prefill of {tuple(tokens.shape)} tokens into a cache of batch {self.batch}, "
                             f"max_seq {self.max_seq}")
        logits = None
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            pos = torch.arange(t0, t1, device=self.device)[None].expand(B, -1)
            logits = self.model(tokens[:, t0:t1], pos)
        return logits[:, -1]


__all__ = ["TorchCompileDecoder", "DecodeModel", "decode_one_token", "configure_inductor", "INDUCTOR_SETTINGS"]
