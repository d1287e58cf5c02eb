"""PackedWeights: every tensor of a model, packed once in the layout the kernels read.

Per-layer matrices are stacked over layers (one tensor per kind, layer-major), so a kernel needs one
base pointer per kind and the reference engine reads plain views of the same memory:
  w_qkv  (L, q+2kv, H)   rows: q heads, then k heads, then v heads
  w_o    (L, H, q)
  w_gu   (L, 2I, H)      rows interleaved: 2i = gate_i, 2i+1 = up_i, so any even row range holds whole pairs
  w_down (L, H, I)

A matrix (the four stacks, lm_head, embed) is either a dense tensor in the activation dtype or a QuantTensor
(models/quant) of the same logical shape, kept packed; a stack whose layers differ in format (a Q4_K_M GGUF) is
a LayerStack. `matrix()` and `embedding()` are how the engines read them: dense views, or dequantize() of the
layer / row tile asked for, so weights stay packed in memory and are expanded one matmul at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Iterable

import torch

from ..errors import CheckpointError, UnsupportedModelError
from .formats import Format, get_format
from .quant import QuantTensor, dequantize
from .quant.tensor import LayerStack, RowStack, cat_rows, format_label, interleave_rows, stack_matrices
from .spec import ModelSpec

Matrix = "torch.Tensor | QuantTensor | LayerStack"
MATRICES = ("embed", "lm_head", "w_qkv", "w_o", "w_gu", "w_down")


@dataclass
class PackedWeights:
    spec: ModelSpec
    embed: Matrix                  # (V, H)
    lm_head: Matrix                # (V, H); the same object as embed when tied
    final_norm: torch.Tensor       # (H,)
    attn_norm: torch.Tensor        # (L, H)
    mlp_norm: torch.Tensor         # (L, H)
    w_qkv: Matrix                  # (L, q+2kv, H)
    w_o: Matrix                    # (L, H, q)
    w_gu: Matrix                   # (L, 2I, H)
    w_down: Matrix                 # (L, H, I)
    b_qkv: torch.Tensor | None = None   # (L, q+2kv)
    q_norm: torch.Tensor | None = None  # (L, D)
    k_norm: torch.Tensor | None = None  # (L, D)

    @property
    def dtype(self) -> torch.dtype:
        """The activation type these weights are computed in (the norms' type)."""
        return self.attn_norm.dtype

    @property
    def format(self) -> Format:
        """How the per-layer matrices are stored (models/formats.py); UnsupportedModelError where they mix
        formats, which no single kernel trait reads."""
        names = self.formats()
        layer_formats = {n for k in ("w_qkv", "w_o", "w_gu", "w_down") for n in names[k]}
        if len(layer_formats) != 1:
            raise UnsupportedModelError(f"the layers' matrices mix the formats {', '.join(sorted(layer_formats))}; "
                                        "the megakernel reads one weight format")
        return get_format(layer_formats.pop())

    @property
    def quantised(self) -> bool:
        return any(not isinstance(getattr(self, n), torch.Tensor) for n in MATRICES)

    def formats(self) -> dict[str, list[str]]:
        """Each matrix's storage format(s): one name, or one a layer for a LayerStack."""
        out = {}
        for n in MATRICES:
            m = getattr(self, n)
            out[n] = m.formats if isinstance(m, LayerStack) else [format_label(m)]
        return out

    @property
    def device(self) -> torch.device:
        return self.attn_norm.device

    @property
    def nbytes(self) -> int:
        """Bytes the weights occupy (packed codes, scales and zeros counted as stored; a tied head once)."""
        seen, total = set(), 0
        for name, t in self.tensors().items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            total += t.nbytes if not isinstance(t, torch.Tensor) else t.numel() * t.element_size()
        return total

    def bytes_per_step(self) -> int:
        """Bytes a decode step reads as these weights are stored: every layer matrix and the LM head (packed:
        codes, scales and zeros exactly), the norms and biases; the embedding's B rows are not counted."""
        total = 0
        for name, t in self.tensors().items():
            if name == "embed":
                continue
            total += t.nbytes if not isinstance(t, torch.Tensor) else t.numel() * t.element_size()
        return total

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "spec" and getattr(self, f.name) is not None}

    # ---- reading the matrices ----------------------------------------------------------------------
    def matrix(self, name: str, layer: int | None = None, rows: slice | None = None) -> torch.Tensor:
        """A dense (rows, K) matrix in the activation dtype: a view of a dense tensor, or dequantize() of the
        packed layer / rows asked for."""
        m = getattr(self, name)
        if layer is not None:
            m = m[layer]
        if rows is not None:
            if isinstance(m, QuantTensor) and m.format.block_rows > 1:   # 128-row blocks: expand, then cut
                return dequantize(m, self.dtype)[rows]
            m = m[rows] if isinstance(m, torch.Tensor) else m.rows(rows)
        return m if isinstance(m, torch.Tensor) else dequantize(m, self.dtype)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of the embedding for `tokens` (any shape) -> (*tokens.shape, H): a gather, dequantising only
        the rows looked up."""
        e = self.embed
        if isinstance(e, torch.Tensor):
            return torch.nn.functional.embedding(tokens, e)
        if e.format.block_rows > 1:
            return dequantize(e, self.dtype)[tokens]
        return dequantize(e.take_rows(tokens), self.dtype).reshape(*tokens.shape, e.shape[-1])

    def dequantized(self) -> "PackedWeights":
        """The same model with every matrix dense in the activation dtype (the engines that read no packed
        format: the baselines, and the megakernel for formats it has no trait for)."""
        if not self.quantised:
            return self
        dense = {n: _dense(getattr(self, n), self.dtype) for n in MATRICES if n != "lm_head"}
        dense["lm_head"] = dense["embed"] if self.lm_head is self.embed else _dense(self.lm_head, self.dtype)
        return replace(self, **dense)

    def with_dense_head(self) -> "PackedWeights":
        """The same model with the embedding and the LM head dense in the activation dtype, the layers' matrices
        as stored: what the megakernel reads (it takes B embedding rows and the LM head as T). The values are
        those the reference engine computes with (dequantize() rounded to the activation dtype), so a GGUF's
        Q8_0 embedding / LM head gives the same logits either way; a tied head stays one tensor."""
        if all(isinstance(getattr(self, n), torch.Tensor) for n in ("embed", "lm_head")):
            return self
        embed = _dense(self.embed, self.dtype)
        return replace(self, embed=embed,
                       lm_head=embed if self.lm_head is self.embed else _dense(self.lm_head, self.dtype))

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


def _dense(m, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(m, (QuantTensor, RowStack)):
        return dequantize(m, dtype)
    if isinstance(m, LayerStack):
        return torch.stack([_dense(x, dtype) for x in m.layers])
    return m


def interleave_gate_up(gate, up):
    """(I, H), (I, H) -> (2I, H) with rows gate_0, up_0, gate_1, up_1, ..."""
    if isinstance(gate, QuantTensor) or isinstance(up, QuantTensor):
        return interleave_rows(gate, up)
    return torch.stack([gate, up], dim=1).reshape(2 * gate.shape[0], gate.shape[1])


def pack_from_hf(spec: ModelSpec, get: Callable[[str], torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str, progress: Iterable[int] | None = None) -> PackedWeights:
    """Packs tensors named as in a Hugging Face Llama-family state dict.

    `get(name)` returns one tensor (any dtype/device) or raises CheckpointError; shapes are checked here
    so that a mismatching checkpoint is reported with the tensor's name. A matrix may come back as a
    QuantTensor (a quantised checkpoint): it is kept packed, stacked over layers like the dense ones."""
    L, H, I = spec.num_layers, spec.hidden_size, spec.intermediate_size

    def fetch(name: str, shape: tuple[int, ...]):
        t = get(name)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, config.json implies {shape}")
        return t.to(device) if isinstance(t, QuantTensor) else t.to(device=device, dtype=dtype)

    def stacked(*shape):
        return torch.empty((L, *shape), dtype=dtype, device=device)

    mats = {n: _Stacker(L) for n in ("w_qkv", "w_o", "w_gu", "w_down")}
    attn_norm, mlp_norm = stacked(H), stacked(H)
    b_qkv = stacked(spec.qkv_size) if spec.qkv_bias else None
    q_norm = stacked(spec.head_dim) if spec.qk_norm else None
    k_norm = stacked(spec.head_dim) if spec.qk_norm else None
    for i in (progress if progress is not None else range(L)):
        p = f"model.layers.{i}."
        q = fetch(p + "self_attn.q_proj.weight", (spec.q_size, H))
        k = fetch(p + "self_attn.k_proj.weight", (spec.kv_size, H))
        v = fetch(p + "self_attn.v_proj.weight", (spec.kv_size, H))
        mats["w_qkv"].append(_cat_rows([q, k, v]))
        if b_qkv is not None:
            b_qkv[i] = torch.cat([fetch(p + f"self_attn.{n}_proj.bias", (sz,))
                                  for n, sz in (("q", spec.q_size), ("k", spec.kv_size), ("v", spec.kv_size))])
        if q_norm is not None:
            q_norm[i] = fetch(p + "self_attn.q_norm.weight", (spec.head_dim,))
            k_norm[i] = fetch(p + "self_attn.k_norm.weight", (spec.head_dim,))
        mats["w_o"].append(fetch(p + "self_attn.o_proj.weight", (H, spec.q_size)))
        mats["w_gu"].append(_interleave(fetch(p + "mlp.gate_proj.weight", (I, H)),
                                        fetch(p + "mlp.up_proj.weight", (I, H)), dtype))
        mats["w_down"].append(fetch(p + "mlp.down_proj.weight", (H, I)))
        attn_norm[i] = fetch(p + "input_layernorm.weight", (H,))
        mlp_norm[i] = fetch(p + "post_attention_layernorm.weight", (H,))
    embed = fetch("model.embed_tokens.weight", (spec.vocab_size, H))
    lm_head = embed if spec.tie_word_embeddings else fetch("lm_head.weight", (spec.vocab_size, H))
    w = PackedWeights(spec=spec, embed=embed, lm_head=lm_head, final_norm=fetch("model.norm.weight", (H,)),
                      attn_norm=attn_norm, mlp_norm=mlp_norm, **{n: m.result() for n, m in mats.items()},
                      b_qkv=b_qkv, q_norm=q_norm, k_norm=k_norm)
    w.validate()
    return w


def _cat_rows(parts: list):
    """q, k and v into one w_qkv: one tensor where they share a format, else a RowStack of their own formats."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts)
    try:
        return cat_rows(parts)
    except (CheckpointError, AttributeError):
        return RowStack(parts)


def _interleave(gate, up, dtype: torch.dtype):
    """gate/up rows interleaved: packed where both share a format; dense (dequantised) where they differ, as no
    row tile of w_gu may mix formats (a tile holds whole gate/up pairs)."""
    try:
        return interleave_gate_up(gate, up)
    except (CheckpointError, AttributeError):
        return interleave_gate_up(_dense(gate, dtype), _dense(up, dtype))


class _Stacker:
    """Layers into one (L, rows, K) tensor. Dense layers are copied one by one into a stack allocated at the
    first (holding every layer in a list until the end would hold the model twice); packed ones are listed
    and stacked at the end (a quarter of the bytes), or kept per layer where their formats differ."""

    def __init__(self, layers: int):
        self.layers, self.dense, self.items = layers, None, []

    def append(self, m) -> None:
        if isinstance(m, torch.Tensor) and not self.items:
            if self.dense is None:
                self.dense, self.n = torch.empty((self.layers, *m.shape), dtype=m.dtype, device=m.device), 0
            self.dense[self.n] = m
            self.n += 1
            return
        if self.dense is not None:      # a packed layer after dense ones: keep them per layer
            self.items, self.dense = [self.dense[i] for i in range(self.n)], None
        self.items.append(m)

    def result(self):
        return self.dense if self.dense is not None else stack_matrices(self.items)


RANDOM_CHUNK = 1 << 24   # elements (64 MiB of fp32)


def random_weights(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                   seed: int = 0, weights: str | Format | None = None) -> PackedWeights:
    """Seeded random weights with the statistics of a trained model (never zero): matrices ~ N(0, 1/fan_in)
    so activations keep unit scale through the layers, norms ~ 1 ± 0.1.

    `weights` (a --quantize format): the per-layer matrices are drawn one layer at a time and quantised at
    once, so a preset's quantised twin never holds its dense matrices (a 70B int4 preset fits beside nothing
    else); on the CPU the values are those of the dense draw where every layer's size is a multiple of 16."""
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

    fmt = None
    if weights is not None:
        from .formats import quantize_format
        fmt = quantize_format(weights)

    def mat(*shape, fan_in):
        if fmt is None or len(shape) < 3:
            return normal(shape, 0.0, fan_in ** -0.5)
        from .quant.rtn import quantize
        return stack_matrices([quantize(normal(shape[1:], 0.0, fan_in ** -0.5), fmt) for _ in range(shape[0])])

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


def quantize_weights(w: PackedWeights, fmt: str | Format) -> PackedWeights:
    """Round-to-nearest (models/quant/rtn.py) of the per-layer matrices, one layer at a time.

    The embedding and the LM head stay in the activation dtype: the embedding is a gather of B rows a step, so
    its bytes never count; the LM head is a share of the bytes that grows as models shrink (a quarter of a
    1B int4 step), but its logits decide every greedy token, and the published int4 recipes (gpt-fast,
    torchao, GPTQ/AWQ checkpoints) keep it dense too, so our quantised twins compare with theirs."""
    from .formats import quantize_format
    from .quant.rtn import quantize

    f = quantize_format(fmt)
    if w.quantised:
        raise CheckpointError(f"these weights are already quantised ({', '.join(sorted({n for v in w.formats().values() for n in v}))}); "
                              f"quantising them again as {f.name} would round twice: load a dense checkpoint")
    out = {}
    for name in ("w_qkv", "w_o", "w_gu", "w_down"):
        m = getattr(w, name)
        out[name] = stack_matrices([quantize(m[i], f) for i in range(m.shape[0])])
    return replace(w, **out)
