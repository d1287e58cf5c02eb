"""ModelSpec: the shape of a decoder-only transformer, read from a Hugging Face config.json.

Every number the kernel generator needs is here; invariants are checked in __post_init__ so a
bad checkpoint fails at load time with the field's name, never deep inside a kernel.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UnsupportedModelError
from .formats import Format, get_format

# Architecture name (config.json "architectures"[0]) -> (qkv bias, q/k RMSNorm).
# Qwen2 always has q/k/v bias; Qwen3 has per-head q/k norm.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling ("rope_type": "llama3"); None on the spec means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {self.arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, f)) <= 0:
                raise UnsupportedModelError(f"config field {f}={getattr(self, f)!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    # Derived sizes, in elements.
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        per_layer = (self.qkv_size * self.hidden_size + self.hidden_size * self.q_size
                     + 3 * self.hidden_size * self.intermediate_size + 2 * self.hidden_size)
        if self.qkv_bias:
            per_layer += self.qkv_size
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.num_layers * per_layer + self.vocab_size * self.hidden_size + head + self.hidden_size

    def weight_matrices(self) -> tuple[tuple[str, int, int, int], ...]:
        """(PackedWeights name, rows, K, count) of every matrix a decode step streams whole; the embedding
        is read one row per sequence (ignored: it is tiny) unless it is the tied LM head."""
        H, L = self.hidden_size, self.num_layers
        return (("w_qkv", self.qkv_size, H, L), ("w_o", H, self.q_size, L),
                ("w_gu", 2 * self.intermediate_size, H, L), ("w_down", H, self.intermediate_size, L),
                ("lm_head", self.vocab_size, H, 1))

    def vector_elements(self) -> int:
        """Elements of the norms and biases a step reads (kept in the activation type)."""
        per_layer = 2 * self.hidden_size + (self.qkv_size if self.qkv_bias else 0) + (2 * self.head_dim if self.qk_norm else 0)
        return self.num_layers * per_layer + self.hidden_size

    def weight_bytes_per_step(self, weights: str | Format = "bf16", vectors: str | Format | None = None) -> int:
        """Bytes of weights a decode step must read: every matrix in the weight format (packed codes plus
        their scales), the norms and biases in `vectors` (default: the weight format where it is a plain
        type, else bf16)."""
        w = get_format(weights)
        v = get_format(vectors or (w if not w.group_size else "bf16"))
        return (sum(n * w.bytes_for(r * k, r) for _, r, k, n in self.weight_matrices())
                + self.vector_elements() * v.element_bytes)

    def with_(self, **changes) -> "ModelSpec":
        return replace(self, **changes)

    # ---- Construction from a Hugging Face config -------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "") -> "ModelSpec":
        archs = cfg.get("architectures") or []
        if len(archs) != 1:
            raise UnsupportedModelError(f"config field architectures={archs!r}: expected exactly one architecture")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"config field architectures={arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"config field hidden_act={act!r} is not supported (only 'silu')")
        if cfg.get("mlp_bias", False):
            raise UnsupportedModelError("config field mlp_bias=true is not supported")
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        head_dim = cfg.get("head_dim") or hidden // heads
        max_pos = int(cfg.get("max_position_embeddings", 2048))

        # Sliding windows: honoured by capping the context at the window (attention inside the window is
        # then exactly full attention). Qwen2/3 only apply it when use_sliding_window is set.
        window = cfg.get("sliding_window")
        if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
            window = None
        if window is not None:
            window = int(window)
            if window <= 0:
                raise UnsupportedModelError(f"config field sliding_window={window} must be positive or null")
            if arch.startswith("Qwen") and cfg.get("max_window_layers", 0) < int(cfg["num_hidden_layers"]):
                raise UnsupportedModelError(
                    f"config field use_sliding_window=true with max_window_layers={cfg.get('max_window_layers')}: "
                    "per-layer windows are not supported; set use_sliding_window to false")
            max_pos = min(max_pos, window)

        theta, scaling = _rope_from_config(cfg)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        # Qwen2 always has q/k/v bias and no o_proj bias; elsewhere attention_bias also adds an o_proj
        # bias, which the packed layout and the kernel have no place for.
        if arch != "Qwen2ForCausalLM" and cfg.get("attention_bias", False):
            raise UnsupportedModelError(f"config field attention_bias=true is not supported for {arch}")
        qkv_bias = arch == "Qwen2ForCausalLM"
        return cls(
            name=name or cfg.get("_name_or_path", "") or arch,
            arch=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            rope_scaling=scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )

    @classmethod
    def from_config_file(cls, path: str | Path, name: str = "") -> "ModelSpec":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise UnsupportedModelError(f"{path} not found: a checkpoint directory needs a config.json") from None
        except json.JSONDecodeError as e:
            raise UnsupportedModelError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_config(cfg, name=name or path.parent.name)


def _rope_from_config(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes "rope_parameters"; older configs "rope_theta" + "rope_scaling".
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "llama3":
        try:
            return theta, RopeScaling(
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise UnsupportedModelError(f"config field rope_scaling of type 'llama3' lacks {e.args[0]!r}") from None
    raise UnsupportedModelError(
        f"config field rope_scaling.rope_type={kind!r} is not supported (supported: 'default', 'llama3')")


def rope_inv_freq(spec: ModelSpec) -> "torch.Tensor":
    """Inverse frequencies (head_dim/2,) in fp32, with Llama-3 scaling applied, as transformers computes them."""
    import torch

    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = spec.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)
