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

from ..errors import CheckpointError, UnsupportedModelError
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

    def __post_init__(self):
        # the smoothing divides by high - low, and the wavelength bands need positive bounds
        if not (math.isfinite(self.factor) and self.factor > 0 and 0 < self.low_freq_factor < self.high_freq_factor
                and math.isfinite(self.high_freq_factor) and self.original_max_position_embeddings > 0):
            raise UnsupportedModelError(f"llama3 rope scaling {self} is invalid: it needs factor > 0, "
                                        "0 < low_freq_factor < high_freq_factor and original_max_position_embeddings > 0")


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
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise UnsupportedModelError(f"config field rms_norm_eps={self.rms_norm_eps!r} must be a finite number > 0")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise UnsupportedModelError(f"config field rope_theta={self.rope_theta!r} must be a finite number > 1")

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

    def kv_bytes_per_position(self, dtype: str | Format = "bf16") -> int:
        """K and V of one position of one sequence, all layers, stored as `dtype`."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * get_format(dtype).element_bytes

    def vector_elements(self) -> int:
        """Elements of the norms and biases a step reads (kept in the activation type)."""
        per_layer = 2 * self.hidden_size + (self.qkv_size if self.qkv_bias else 0) + (2 * self.head_dim if self.qk_norm else 0)
        return self.num_layers * per_layer + self.hidden_size

    def weight_bytes_per_step(self, weights: str | Format = "bf16", vectors: str | Format | None = None,
                              head: str | Format | None = None) -> int:
        """Bytes of weights a decode step must read: every layer matrix in the weight format (packed codes plus
        their scales and zeros), the LM head in `head`, the norms and biases in `vectors`. Defaults: `vectors`
        is the weight format where it is a plain type, else bf16; `head` is the weight format where it is plain,
        else `vectors` (quantised twins keep the LM head dense: models/weights.quantize_weights)."""
        w = get_format(weights)
        v = get_format(vectors or (w if not w.quantised else "bf16"))
        h = get_format(head or (w if not w.quantised else v))
        return (sum(n * (h if name == "lm_head" else w).bytes_for(r * k, r) for name, r, k, n in self.weight_matrices())
                + self.vector_elements() * v.element_bytes)

    def with_(self, **changes) -> "ModelSpec":
        return replace(self, **changes)

    # ---- Construction from a Hugging Face config -------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "") -> "ModelSpec":
        """Raises CheckpointError for a missing or mistyped field, UnsupportedModelError for a value the engine
        cannot honour; never a KeyError or TypeError (the config is user input)."""
        if not isinstance(cfg, dict):
            raise CheckpointError(f"config.json holds a {type(cfg).__name__}, not a JSON object")
        archs = cfg.get("architectures") or []
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise UnsupportedModelError(f"config field architectures={archs!r}: expected exactly one architecture")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"config field architectures={arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"config field hidden_act={act!r} is not supported (only 'silu')")
        if _flag(cfg, "mlp_bias"):
            raise UnsupportedModelError("config field mlp_bias=true is not supported")
        hidden = _int(cfg, "hidden_size")
        heads = _int(cfg, "num_attention_heads")
        layers = _int(cfg, "num_hidden_layers")
        head_dim = _int(cfg, "head_dim", None)
        if head_dim is None:
            head_dim = hidden // heads if heads > 0 else 0   # heads <= 0 is refused by __post_init__
        max_pos = _int(cfg, "max_position_embeddings", 2048)

        # Sliding windows: honoured by capping the context at the window; attention inside the window is then
        # exactly full attention, for sliding and full layers alike.
        window = cfg.get("sliding_window")
        if arch.startswith("Qwen") and not (_flag(cfg, "use_sliding_window") and _qwen_slides(cfg, layers)):
            window = None
        if window is not None:
            window = _int(cfg, "sliding_window")
            if window <= 0:
                raise UnsupportedModelError(f"config field sliding_window={window} must be positive or null")
            max_pos = min(max_pos, window)

        theta, scaling = _rope_from_config(cfg)
        # Qwen2 always has q/k/v bias and no o_proj bias; elsewhere attention_bias also adds an o_proj
        # bias, which the packed layout and the kernel have no place for.
        if arch != "Qwen2ForCausalLM" and _flag(cfg, "attention_bias"):
            raise UnsupportedModelError(f"config field attention_bias=true is not supported for {arch}")
        qkv_bias = arch == "Qwen2ForCausalLM"
        model_name = name or cfg.get("_name_or_path", "") or arch
        return cls(
            name=model_name if isinstance(model_name, str) else arch,
            arch=arch,
            vocab_size=_int(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(cfg, "intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=_int(cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=_float(cfg, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            max_position_embeddings=max_pos,
            tie_word_embeddings=_flag(cfg, "tie_word_embeddings"),
            qkv_bias=qkv_bias,
            qk_norm=arch == "Qwen3ForCausalLM",
            rope_scaling=scaling,
            bos_token_id=_token_id(cfg, "bos_token_id"),
            eos_token_ids=_token_ids(cfg, "eos_token_id"),
        )

    @classmethod
    def from_config_file(cls, path: str | Path, name: str = "") -> "ModelSpec":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise UnsupportedModelError(f"{path} not found: a checkpoint directory needs a config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UnsupportedModelError(f"{path} is not valid JSON: {e}") from None
        except RecursionError:
            raise UnsupportedModelError(f"{path} is nested too deeply to be a config.json") from None
        return cls.from_hf_config(cfg, name=name or path.parent.name)


_MISSING = object()


def _get(cfg: dict[str, Any], key: str, default: Any):
    value = cfg.get(key, default)
    if value is _MISSING:
        raise CheckpointError(f"config.json lacks the required field {key!r}; the checkpoint's config is "
                              "incomplete (re-download it or save it again with save_pretrained)")
    return value


def _int(cfg: dict[str, Any], key: str, default: Any = _MISSING) -> Any:
    """An integer field (an integral float is accepted, as json writes 4096.0 for some converters)."""
    value = _get(cfg, key, default)
    if value is None and default is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"config field {key}={value!r} must be an integer")
    return value


def _float(cfg: dict[str, Any], key: str, default: Any = _MISSING) -> float:
    value = _get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"config field {key}={value!r} must be a number")
    try:
        return float(value)
    except OverflowError:
        raise CheckpointError(f"config field {key}={value!r} is out of range") from None


def _flag(cfg: dict[str, Any], key: str) -> bool:
    value = cfg.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise CheckpointError(f"config field {key}={value!r} must be true or false")
    return value


def _token_id(cfg: dict[str, Any], key: str) -> int | None:
    value = cfg.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise CheckpointError(f"config field {key}={value!r} must be a token id (an integer >= 0) or null")
    return value


def _token_ids(cfg: dict[str, Any], key: str) -> tuple[int, ...]:
    value = cfg.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise CheckpointError(f"config field {key}={value!r} must be a token id or a list of token ids")
    return tuple(values)


def _qwen_slides(cfg: dict[str, Any], layers: int) -> bool:
    """Whether any layer of a Qwen2/3 with use_sliding_window uses its window. transformers slides layer i
    when i >= max_window_layers, unless the config lists layer_types itself."""
    types = cfg.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or any(not isinstance(t, str) for t in types):
            raise CheckpointError(f"config field layer_types={types!r} must be a list of strings")
        return "sliding_attention" in types
    return _int(cfg, "max_window_layers", 28) < layers   # 28: transformers' default for Qwen2 and Qwen3


_ROPE_TYPES = ("default", "llama3")


def _rope_from_config(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """theta and the Llama-3 scaling, from every place a config can put them.

    transformers >= 5 writes "rope_parameters" (possibly one dict per layer type), older versions
    "rope_theta" + "rope_scaling"; a config edited by hand can hold both, and transformers 5 then lets
    rope_scaling win. Every source is read and checked, and sources that disagree are refused: reading one
    and ignoring the other is how a YaRN model silently ran with plain RoPE."""
    top_theta = _float(cfg, "rope_theta", None) if cfg.get("rope_theta") is not None else None
    sources: list[tuple[str, dict]] = []
    for key in ("rope_scaling", "rope_parameters"):
        params = cfg.get(key)
        if params is None or params == {}:
            continue
        if not isinstance(params, dict):
            raise CheckpointError(f"config field {key}={params!r} must be an object or null")
        nested = [k for k, v in params.items() if isinstance(v, dict)]
        if nested:   # one dict per layer type ({"full_attention": {...}, ...})
            sources += [(f"{key}.{k}", params[k]) for k in nested]
        else:
            sources.append((key, params))
    if cfg.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise UnsupportedModelError(f"config field partial_rotary_factor={cfg['partial_rotary_factor']!r}: "
                                    "partial rotary embeddings are not supported")

    readings = []
    for field, params in sources:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind is None:
            kind = "default"
        if kind not in _ROPE_TYPES:
            raise UnsupportedModelError(f"config field {field}.rope_type={kind!r} is not supported "
                                        f"(supported: {', '.join(map(repr, _ROPE_TYPES))}); the model would run "
                                        "with the wrong positions")
        if params.get("partial_rotary_factor") not in (None, 1, 1.0):
            raise UnsupportedModelError(f"config field {field}.partial_rotary_factor="
                                        f"{params['partial_rotary_factor']!r}: partial rotary embeddings are not supported")
        theta = _float(params, "rope_theta", None) if params.get("rope_theta") is not None else top_theta
        readings.append((field, kind, theta, _llama3(field, params) if kind == "llama3" else None))

    if len({(kind, theta, scaling) for _, kind, theta, scaling in readings}) > 1:
        said = "; ".join(f"{f}: rope_type {k!r}, rope_theta {t}" for f, k, t, _ in readings)
        raise UnsupportedModelError(f"config fields disagree about rotary embeddings ({said}); "
                                    "keep one of them (rope_parameters in transformers >= 5)")
    theta = readings[0][2] if readings else top_theta
    theta = 10000.0 if theta is None else theta
    if not (math.isfinite(theta) and theta > 1):
        raise UnsupportedModelError(f"config field rope_theta={theta!r} must be a finite number > 1")
    return theta, readings[0][3] if readings else None


def _llama3(field: str, params: dict) -> RopeScaling:
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if key not in params:
            raise UnsupportedModelError(f"config field {field} of rope_type 'llama3' lacks {key!r}")
    try:
        return RopeScaling(factor=_float(params, "factor"), low_freq_factor=_float(params, "low_freq_factor"),
                           high_freq_factor=_float(params, "high_freq_factor"),
                           original_max_position_embeddings=_int(params, "original_max_position_embeddings"))
    except CheckpointError as e:
        raise CheckpointError(f"{e} (in {field})") from None


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
