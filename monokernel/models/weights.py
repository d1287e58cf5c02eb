"""PackedWeights: every tensor of a model, packed once in the layout the kernels read.

Per-layer matrices are stacked over layers (one tensor per kind, layer-major), so a kernel needs one
base pointer per kind and the reference engine reads plain views of the same memory:
  w_qkv  (L, q+2kv, H)   rows: q heads, then k heads, then v heads
  w_o    (L, H, q)
  w_gu   (L, 2I, H)      rows interleaved: 2i = gate_i, 2i+1 = up_i, so any even row range holds whole pairs
  w_down (L, H, I)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Iterable

import torch

from ..errors import CheckpointError
from .formats import Format, get_format
from .spec import ModelSpec


@dataclass
class PackedWeights:
    spec: ModelSpec
    embed: torch.Tensor            # (V, H)
    lm_head: torch.Tensor          # (V, H); the same storage as embed when tied
    final_norm: torch.Tensor       # (H,)
    attn_norm: torch.Tensor        # (L, H)
    mlp_norm: torch.Tensor         # (L, H)
    w_qkv: torch.Tensor            # (L, q+2kv, H)
    w_o: torch.Tensor              # (L, H, q)
    w_gu: torch.Tensor             # (L, 2I, H)
    w_down: torch.Tensor           # (L, H, I)
    b_qkv: torch.Tensor | None = None   # (L, q+2kv)
    q_norm: torch.Tensor | None = None  # (L, D)
    k_norm: torch.Tensor | None = None  # (L, D)

    @property
    def dtype(self) -> torch.dtype:
        """The activation type these weights are computed in (the norms' type)."""
        return self.attn_norm.dtype

    @property
    def format(self) -> Format:
        """How the matrices are stored (models/formats.py)."""
        return get_format(self.w_qkv.dtype)

    @property
    def device(self) -> torch.device:
        return self.w_qkv.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "spec" and getattr(self, f.name) is not None}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        s = self.spec
        L, H, I, D = s.num_layers, s.hidden_size, s.intermediate_size, s.head_dim
        shapes = {"embed": (s.vocab_size, H), "lm_head": (s.vocab_size, H), "final_norm": (H,),
                  "attn_norm": (L, H), "mlp_norm": (L, H), "w_qkv": (L, s.qkv_size, H),
                  "w_o": (L, H, s.q_size), "w_gu": (L, 2 * I, H), "w_down": (L, H, I)}
        if s.qkv_bias:
            shapes["b_qkv"] = (L, s.qkv_size)
        if s.qk_norm:
            shapes["q_norm"] = (L, D)
            shapes["k_norm"] = (L, D)
        return shapes

    def validate(self) -> None:
        got = self.tensors()
        for name, shape in self.expected_shapes().items():
            if name not in got:
                raise CheckpointError(f"packed weights lack {name!r}")
            if tuple(got[name].shape) != shape:
                raise CheckpointError(f"packed tensor {name!r} has shape {tuple(got[name].shape)}, expected {shape}")


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(I, H), (I, H) -> (2I, H) with rows gate_0, up_0, gate_1, up_1, ..."""
    return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], gate.shape[1])


def pack_from_hf(spec: ModelSpec, get: Callable[[str], torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str, progress: Iterable[int] | None = None) -> PackedWeights:
    """Packs tensors named as in a Hugging Face Llama-family state dict.

    `get(name)` returns one tensor (any dtype/device) or raises CheckpointError; shapes are checked here
    so that a mismatching checkpoint is reported with the tensor's name."""
    L, H, I = spec.num_layers, spec.hidden_size, spec.intermediate_size

    def fetch(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = get(name)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, config.json implies {shape}")
        return t.to(device=device, dtype=dtype)

    def stacked(*shape):
        return torch.empty((L, *shape), dtype=dtype, device=device)

    w_qkv, w_o = stacked(spec.qkv_size, H), stacked(H, spec.q_size)
    w_gu, w_down = stacked(2 * I, H), stacked(H, I)
    attn_norm, mlp_norm = stacked(H), stacked(H)
    b_qkv = stacked(spec.qkv_size) if spec.qkv_bias else None
    q_norm = stacked(spec.head_dim) if spec.qk_norm else None
    k_norm = stacked(spec.head_dim) if spec.qk_norm else None
    for i in (progress if progress is not None else range(L)):
        p = f"model.layers.{i}."
        q = fetch(p + "self_attn.q_proj.weight", (spec.q_size, H))
        k = fetch(p + "self_attn.k_proj.weight", (spec.kv_size, H))
        v = fetch(p + "self_attn.v_proj.weight", (spec.kv_size, H))
        w_qkv[i] = torch.cat([q, k, v])
        if b_qkv is not None:
            b_qkv[i] = torch.cat([fetch(p + f"self_attn.{n}_proj.bias", (sz,))
                                  for n, sz in (("q", spec.q_size), ("k", spec.kv_size), ("v", spec.kv_size))])
        if q_norm is not None:
            q_norm[i] = fetch(p + "self_attn.q_norm.weight", (spec.head_dim,))
            k_norm[i] = fetch(p + "self_attn.k_norm.weight", (spec.head_dim,))
        w_o[i] = fetch(p + "self_attn.o_proj.weight", (H, spec.q_size))
        w_gu[i] = interleave_gate_up(fetch(p + "mlp.gate_proj.weight", (I, H)), fetch(p + "mlp.up_proj.weight", (I, H)))
        w_down[i] = fetch(p + "mlp.down_proj.weight", (H, I))
        attn_norm[i] = fetch(p + "input_layernorm.weight", (H,))
        mlp_norm[i] = fetch(p + "post_attention_layernorm.weight", (H,))
    embed = fetch("model.embed_tokens.weight", (spec.vocab_size, H))
    lm_head = embed if spec.tie_word_embeddings else fetch("lm_head.weight", (spec.vocab_size, H))
    w = PackedWeights(spec=spec, embed=embed, lm_head=lm_head, final_norm=fetch("model.norm.weight", (H,)),
                      attn_norm=attn_norm, mlp_norm=mlp_norm, w_qkv=w_qkv, w_o=w_o, w_gu=w_gu, w_down=w_down,
                      b_qkv=b_qkv, q_norm=q_norm, k_norm=k_norm)
    w.validate()
    return w


RANDOM_CHUNK = 1 << 24   # elements (64 MiB of fp32)


def random_weights(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                   seed: int = 0) -> PackedWeights:
    """Seeded random weights with the statistics of a trained model (never zero): matrices ~ N(0, 1/fan_in)
    so activations keep unit scale through the layers, norms ~ 1 ± 0.1."""
    L, H, I, D = spec.num_layers, spec.hidden_size, spec.intermediate_size, spec.head_dim
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(shape, mean: float, std: float) -> torch.Tensor:
        # Drawn in fp32 pieces of RANDOM_CHUNK elements straight into the target dtype: one fp32 draw of a whole
        # stacked matrix was a transient as large as the model in bf16 (15 GB for 8B's w_gu). On the CPU the
        # pieces give the values one draw gives (the normal fill works in blocks of 16; only the last piece may
        # be shorter, and it is never shorter than 16).
        out = torch.empty(shape, dtype=dtype, device=device)
        flat, i = out.view(-1), 0
        while i < flat.numel():
            n = RANDOM_CHUNK if flat.numel() - i - RANDOM_CHUNK >= 16 else flat.numel() - i
            flat[i:i + n] = torch.randn(n, generator=gen, device=device, dtype=torch.float32) * std + mean
            i += n
        return out

    def mat(*shape, fan_in):
        return normal(shape, 0.0, fan_in ** -0.5)

    def norm(*shape):
        return normal(shape, 1.0, 0.1)

    embed = mat(spec.vocab_size, H, fan_in=1)
    w = PackedWeights(
        spec=spec, embed=embed,
        lm_head=embed if spec.tie_word_embeddings else mat(spec.vocab_size, H, fan_in=H),
        final_norm=norm(H), attn_norm=norm(L, H), mlp_norm=norm(L, H),
        w_qkv=mat(L, spec.qkv_size, H, fan_in=H), w_o=mat(L, H, spec.q_size, fan_in=spec.q_size),
        w_gu=mat(L, 2 * I, H, fan_in=H), w_down=mat(L, H, I, fan_in=I),
        b_qkv=(0.1 * mat(L, spec.qkv_size, fan_in=1)) if spec.qkv_bias else None,
        q_norm=norm(L, D) if spec.qk_norm else None, k_norm=norm(L, D) if spec.qk_norm else None)
    return w
