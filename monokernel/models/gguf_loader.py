"""Loads a llama.cpp GGUF file: metadata -> ModelSpec, tensors -> PackedWeights, and the tokenizer.

packed=True (the default): Q8_0, Q4_0, Q4_1, Q4_K and Q6_K matrices stay packed, converted losslessly to the
canonical layouts of models/quant (gguf_packed.py); the engines dequantise them one matmul at a time. Any other
quantised type (Q5_K, Q2_K, IQ*, ...) has no packed format yet: it is dequantised to the activation dtype at
load, with a one-line notice. packed=False dequantises every tensor at load (the behaviour before issue 18):
the model then equals the one llama.cpp runs, up to the engine's own arithmetic, either way.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import CheckpointError, UnsupportedModelError
from .quant import QuantTensor
from .quant.gguf_packed import PACKED, from_gguf_blocks
from .spec import ModelSpec, RopeScaling, rope_inv_freq
from .tokenizer import Tokenizer, gguf_field
from .weights import PackedWeights, pack_from_hf

# GGUF tensor names (llama.cpp's) -> Hugging Face state-dict names, which pack_from_hf takes.
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
                "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
                "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
                "attn_v.bias": "self_attn.v_proj.bias", "ffn_gate.weight": "mlp.gate_proj.weight",
                "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
# Llama-3 frequency scaling is baked into this tensor (one divisor per frequency), not into metadata.
_ROPE_FREQS = "rope_freqs.weight"


def load_gguf_checkpoint(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                         packed: bool = True) -> tuple[ModelSpec, PackedWeights, Tokenizer]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    reader, tensors = _open(path)
    spec = _spec_from_metadata(reader, tensors, name=path.stem)
    hf_to_gguf = _hf_names(spec, tensors)
    # a corrupt block_count would size the layer stacks before a missing tensor is noticed (2M layers: 25 GB)
    layers = {int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if layers != set(range(spec.num_layers)):
        raise CheckpointError(f"GGUF llama.block_count={spec.num_layers} but the file holds the tensors of "
                              f"{len(layers)} layers; the file is corrupt or incomplete")
    notices: set[str] = set()

    def get(name: str) -> torch.Tensor:
        gguf_name = hf_to_gguf.get(name)
        if gguf_name is None:
            raise CheckpointError(f"{path} lacks the tensor that holds {name!r}")
        t = tensors[gguf_name]
        w = _packed(t, notices) if packed else None
        if w is None:
            w = _dequantize(t)
        # convert_hf_to_gguf.py interleaves the two rotary halves of every q/k head (llama.cpp's rope
        # rotates adjacent pairs, HF's rotates halves); undo it so the rows are in the HF layout again.
        # A row count that does not split into heads is left alone: pack_from_hf then names the bad shape.
        heads = {"attn_q": spec.num_heads, "attn_k": spec.num_kv_heads}.get(gguf_name.split(".")[-2])
        if heads and w.ndim >= 1 and w.shape[0] % (2 * heads) == 0:
            if isinstance(w, QuantTensor):
                w = w.permute_rows(_unpermute_rotary(torch.arange(w.shape[0]), heads))
            else:
                w = _unpermute_rotary(w, heads)
        return w

    layers = tqdm(range(spec.num_layers), desc=f"loading {spec.name}", unit="layer", file=sys.stderr,
                  disable=not sys.stderr.isatty(), leave=False)
    weights = pack_from_hf(spec, get, dtype, device, progress=layers)
    for kind in sorted(notices):
        print(f"monokernel: note: {path.name}: {kind} tensors are dequantised to {str(dtype).removeprefix('torch.')} "
              f"at load (packed: {', '.join(PACKED)})", file=sys.stderr)
    return spec, weights, Tokenizer.from_gguf_metadata(reader)


def gguf_spec(path: str | Path) -> ModelSpec:
    """The spec alone, from the metadata (the tensors stay memory-mapped and unread)."""
    path = Path(path)
    reader, tensors = _open(path)
    return _spec_from_metadata(reader, tensors, name=path.stem)


# What the gguf package raises on a file cut short or filled with garbage: it parses with numpy views whose
# lengths come from the file itself, so a bad length surfaces as any of these.
_PARSE_ERRORS = (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError,
                 EOFError, MemoryError, AttributeError, AssertionError)


def _open(path: Path):
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
    except _PARSE_ERRORS as e:
        raise CheckpointError(f"{path} could not be read as a GGUF file ({type(e).__name__}: {str(e)[:200]}); "
                              "it may be truncated or corrupt (re-download it), or written by a newer llama.cpp "
                              "(upgrade the gguf package)") from None
    return reader, tensors


def _typed(reader, key: str, kind: type | tuple[type, ...], default=None):
    """One metadata value, checked against the type the loader needs: a field of the wrong type is a corrupt
    or foreign file, named here rather than failing later in int() or a comparison."""
    value = gguf_field(reader, key, default)
    if value is default:
        return value
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)))
    if not ok:
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise CheckpointError(f"GGUF metadata {key}={value!r:.80} should be {names}; the file is corrupt or not a "
                              "llama.cpp model")
    return value


def _spec_from_metadata(reader, tensors: dict, name: str) -> ModelSpec:
    def meta(key, default=None, kind=(int, float)):
        return _typed(reader, key, kind, default)

    arch = meta("general.architecture", kind=str)
    if arch != "llama":
        raise UnsupportedModelError(f"GGUF general.architecture={arch!r} is not supported (only 'llama')")
    if (meta("llama.expert_count") or 0) > 0:
        raise UnsupportedModelError(f"GGUF llama.expert_count={meta('llama.expert_count')}: "
                                    "mixture-of-experts models are not supported")

    def need(key, kind=int):
        value = meta(key, kind=kind)
        if value is None:
            raise CheckpointError(f"GGUF metadata lacks {key!r}; the file is incomplete")
        return value

    hidden, heads = need("llama.embedding_length"), need("llama.attention.head_count")
    if heads <= 0:
        raise CheckpointError(f"GGUF llama.attention.head_count={heads} must be positive; the file is corrupt")
    head_dim = meta("llama.attention.key_length", hidden // heads, kind=int)
    rot_dims = meta("llama.rope.dimension_count", head_dim, kind=int)
    if rot_dims != head_dim:
        raise UnsupportedModelError(f"GGUF llama.rope.dimension_count={rot_dims} with head_dim={head_dim}: "
                                    "partial rotary embeddings are not supported")
    scaling_type = meta("llama.rope.scaling.type", "none", kind=str)
    if scaling_type != "none" and not (scaling_type == "linear" and meta("llama.rope.scaling.factor", 1.0) == 1.0):
        raise UnsupportedModelError(f"GGUF llama.rope.scaling.type={scaling_type!r} is not supported "
                                    "(supported: none, and Llama-3 scaling given as rope_freqs.weight)")
    # Older files have no llama.vocab_size; the embedding's row count is then the vocabulary size.
    embed = tensors.get("token_embd.weight")
    vocab = meta("llama.vocab_size", kind=int) or (int(embed.shape[-1]) if embed is not None and len(embed.shape) else 0)
    eos = [meta(f"tokenizer.ggml.{k}_token_id", kind=int) for k in ("eos", "eot", "eom")]
    spec = ModelSpec(
        name=name, arch="LlamaForCausalLM", vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=need("llama.feed_forward_length"), num_layers=need("llama.block_count"),
        num_heads=heads, num_kv_heads=meta("llama.attention.head_count_kv", heads, kind=int), head_dim=head_dim,
        rms_norm_eps=float(need("llama.attention.layer_norm_rms_epsilon", kind=(int, float))),
        rope_theta=float(meta("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=need("llama.context_length"),
        # llama.cpp writes no output.weight when the LM head is the embedding matrix.
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=meta("tokenizer.ggml.bos_token_id", kind=int),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)))
    if _ROPE_FREQS in tensors:
        spec = spec.with_(rope_scaling=_llama3_scaling(spec, _dequantize(tensors[_ROPE_FREQS]).float()))
    return spec


def _llama3_scaling(spec: ModelSpec, factors: torch.Tensor) -> RopeScaling:
    """Recovers the Llama-3 scaling parameters that produce llama.cpp's per-frequency divisors.

    The file keeps only the divisors; every Llama-3.x model uses low/high_freq_factor 1/4 and an original
    context of 8192 with the largest divisor as the factor, so that candidate is checked, not assumed."""
    candidate = RopeScaling(factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
    plain = rope_inv_freq(spec.with_(rope_scaling=None))
    scaled = rope_inv_freq(spec.with_(rope_scaling=candidate))
    if factors.shape != plain.shape or not torch.allclose(plain / factors, scaled, rtol=1e-5):
        raise UnsupportedModelError(f"GGUF {_ROPE_FREQS} does not match Llama-3 rope scaling "
                                    "(factor, 1, 4, 8192); other rope scalings are not supported")
    return candidate


def _hf_names(spec: ModelSpec, tensors: dict) -> dict[str, str]:
    """HF name -> GGUF name for every tensor in the file; a tensor we do not know would be silently
    dropped, changing the model, so it is an error."""
    out = {}
    for gguf_name in tensors:
        if gguf_name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[gguf_name]] = gguf_name
            continue
        if gguf_name == _ROPE_FREQS:
            continue
        parts = gguf_name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
            out[f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"] = gguf_name
            continue
        raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no counterpart in a Llama model; "
                                    "this variant of the architecture is not supported")
    return out


def _dequantize(t) -> torch.Tensor:
    from gguf.quants import dequantize

    try:
        arr = dequantize(t.data, t.tensor_type)
        # GGUF lists dimensions innermost first; numpy wants them outermost first.
        arr = arr.reshape(tuple(int(d) for d in reversed(t.shape)))
    except NotImplementedError:
        raise UnsupportedModelError(f"GGUF tensor {t.name!r} has type {t.tensor_type.name}, which the gguf "
                                    "package cannot dequantise; use a file quantised differently (e.g. Q8_0, Q4_K)") from None
    except _PARSE_ERRORS as e:
        raise CheckpointError(f"GGUF tensor {t.name!r} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                              "the file is truncated or corrupt") from None
    if not arr.flags.writeable:  # F32 data is a view of the read-only memory map
        arr = arr.copy()
    return torch.from_numpy(arr)


_DENSE_TYPES = ("F32", "F16", "BF16", "F64")


def _packed(t, notices: set[str]) -> QuantTensor | None:
    """The tensor kept packed, or None where it is read dense (a float type, a vector, a type without a
    packed format: named in `notices`)."""
    kind = t.tensor_type.name
    if kind in _DENSE_TYPES or len(t.shape) != 2:
        return None
    if kind not in PACKED:
        notices.add(kind)
        return None
    k, rows = (int(d) for d in t.shape)
    try:
        return from_gguf_blocks(kind, np.asarray(t.data).reshape(rows, -1), rows, k)
    except _PARSE_ERRORS as e:
        raise CheckpointError(f"GGUF tensor {t.name!r} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                              "the file is truncated or corrupt") from None


def _unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf's permute viewed each head's rows as (2, D/2) and swapped to (D/2, 2); swap back.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
