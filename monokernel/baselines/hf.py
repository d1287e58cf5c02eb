"""Hugging Face transformers as a decode baseline: `LlamaForCausalLM` (or the Mistral/Qwen2/Qwen3 class)
over the PackedWeights tensors, a `StaticCache`, one `model(...)` call per decode step.

The model is built on the meta device from a config derived from the ModelSpec, then its parameters are
assigned views of the packed tensors (no copies): q/k/v are row blocks of w_qkv, gate/up the even/odd
rows of the interleaved w_gu (a row stride of 2H, which cuBLAS takes as its leading dimension). The
rotary embedding module is rebuilt on the real device (its buffers are computed, not loaded).

Two variants: eager (transformers' default attention, "sdpa") and compiled, `torch.compile(model.forward,
mode="reduce-overhead", fullgraph=True)` as transformers documents for static caches.

Positions: transformers' static cache writes the whole batch at one position (its own counter in
transformers 5, `cache_position` before), so `step` requires every sequence at the same position and
`enqueue` runs at the cache's own write position. The benchmark keeps all sequences at the same length,
so that is no restriction there.
"""
from __future__ import annotations

import inspect

import torch

from ..errors import InputError, UnsupportedModelError
from ..models.spec import ModelSpec
from ..models.weights import PackedWeights
from .torch_compile import configure_inductor

_CONFIG_CLASSES = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
                   "Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config"}


def hf_config(spec: ModelSpec, dtype: torch.dtype):
    """A transformers config with the spec's shapes (rope_parameters in transformers 5, rope_theta and
    rope_scaling before)."""
    import transformers

    cls = getattr(transformers, _CONFIG_CLASSES[spec.arch])
    rope: dict = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling is not None:
        r = spec.rope_scaling
        rope.update(rope_type="llama3", factor=r.factor, low_freq_factor=r.low_freq_factor,
                    high_freq_factor=r.high_freq_factor,
                    original_max_position_embeddings=r.original_max_position_embeddings)
    kwargs = dict(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                  num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                  num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, hidden_act="silu",
                  rms_norm_eps=spec.rms_norm_eps, max_position_embeddings=spec.max_position_embeddings,
                  tie_word_embeddings=spec.tie_word_embeddings, use_cache=True)
    if spec.arch == "MistralForCausalLM":
        kwargs["sliding_window"] = None    # the spec already capped the context at the window
    if spec.arch.startswith("Qwen"):
        kwargs["use_sliding_window"] = False
    if "rope_parameters" in inspect.signature(cls.__init__).parameters:
        kwargs["rope_parameters"] = rope
    else:
        kwargs["rope_theta"] = spec.rope_theta
        kwargs["rope_scaling"] = None if rope["rope_type"] == "default" else {**rope, "type": rope["rope_type"]}
    cfg = cls(**kwargs)
    cfg.architectures = [spec.arch]
    return cfg


def hf_state_dict(weights: PackedWeights) -> dict[str, torch.Tensor]:
    """Hugging Face parameter names -> views of the packed tensors (the inverse of pack_from_hf)."""
    s, w = weights.spec, weights
    q, kv = s.q_size, s.kv_size
    state = {"model.embed_tokens.weight": w.embed, "lm_head.weight": w.lm_head, "model.norm.weight": w.final_norm}
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        qkv = w.w_qkv[i]
        state.update({p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q:q + kv],
                      p + "self_attn.v_proj.weight": qkv[q + kv:], p + "self_attn.o_proj.weight": w.w_o[i],
                      p + "mlp.gate_proj.weight": w.w_gu[i, 0::2], p + "mlp.up_proj.weight": w.w_gu[i, 1::2],
                      p + "mlp.down_proj.weight": w.w_down[i], p + "input_layernorm.weight": w.attn_norm[i],
                      p + "post_attention_layernorm.weight": w.mlp_norm[i]})
        if w.b_qkv is not None:
            b = w.b_qkv[i]
            state.update({p + "self_attn.q_proj.bias": b[:q], p + "self_attn.k_proj.bias": b[q:q + kv],
                          p + "self_attn.v_proj.bias": b[q + kv:]})
        if w.q_norm is not None:
            state[p + "self_attn.q_norm.weight"] = w.q_norm[i]
            state[p + "self_attn.k_norm.weight"] = w.k_norm[i]
    return state


def build_hf_model(weights: PackedWeights):
    """The transformers model for `weights`, sharing their storage, in eval mode."""
    import transformers

    spec = weights.spec
    if spec.arch not in _CONFIG_CLASSES:
        raise UnsupportedModelError(f"no Hugging Face baseline for {spec.arch}")
    cfg = hf_config(spec, weights.dtype)
    with torch.device("meta"):
        model = getattr(transformers, spec.arch)(cfg)
    state = hf_state_dict(weights)
    if "lm_head.weight" not in model.state_dict():   # tied: transformers may list only the embedding
        state.pop("lm_head.weight")
    model.load_state_dict(state, strict=True, assign=True)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Built outside the meta context (its inv_freq is computed, not loaded), then moved, fp32 kept.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config).to(weights.device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise UnsupportedModelError(f"transformers model still has meta tensors after loading: {leftover[:5]}")
    return model.eval()


class HFDecoder:
    """A Decoder (runtime/decoders.py) over transformers' StaticCache of `max_seq` positions; compile=True
    compiles the forward (CUDA graphs)."""

    status = None

    def __init__(self, weights: PackedWeights, batch: int, max_seq: int, *, compile: bool = False):
        from transformers import StaticCache

        spec = weights.spec
        if max_seq > spec.max_position_embeddings:
            raise InputError(f"max_seq={max_seq} exceeds the model's {spec.max_position_embeddings} positions")
        self.spec, self.batch, self.max_seq, self.device = spec, batch, max_seq, weights.device
        self.model = build_hf_model(weights)
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        self.cache = StaticCache(config=self.model.config, max_cache_len=max_seq)
        # Allocate the layers now (transformers does it lazily on the first update) so write_kv can fill them.
        if hasattr(self.cache, "early_initialization"):
            self.cache.early_initialization(batch_size=batch, num_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                                            dtype=weights.dtype, device=weights.device)
        else:
            fake = torch.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), dtype=weights.dtype, device=weights.device)
            for layer in self.cache.layers:
                n_args = len(inspect.signature(layer.lazy_initialization).parameters)
                layer.lazy_initialization(*(fake,) * n_args)
        params = inspect.signature(self.model.forward).parameters
        # transformers >= 5 names the argument `cache` (past_key_values is deprecated); older ones take
        # cache_position, which later versions replaced by a counter inside each static layer.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._cache_position = "cache_position" in params
        # (S, B, 1) position ids, so a step slices them instead of launching a fill
        self._position_ids = torch.arange(max_seq, device=self.device)[:, None, None].repeat(1, batch, 1)
        self._next = 0
        self.compiled = compile
        self.inductor_settings = configure_inductor() if compile else {}   # the same as the torch-compile baseline's
        self._forward = (torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True)
                         if compile else self.model.forward)

    @property
    def variant(self) -> str:
        return f"{'compiled' if self.compiled else 'eager'} ({self.attn_implementation} attention)"

    def _seek(self, position: int) -> None:
        """Moves the static cache's write position (transformers 5 keeps it per layer)."""
        if position == self._next:
            return
        for layer in self.cache.layers:
            n = getattr(layer, "cumulative_length", None)
            if isinstance(n, torch.Tensor):
                n.fill_(position)
            elif n is not None:
                layer.cumulative_length = position
        self._next = position

    @torch.no_grad()
    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes K/V (B, KVH, T, D) of one layer into cache positions 0..T-1; the next step is at T."""
        T = k.shape[2]
        if T > self.max_seq:
            raise InputError(f"{T} cached positions do not fit max_seq={self.max_seq}")
        lay = self.cache.layers[layer]
        lay.keys[:, :, :T].copy_(k)
        lay.values[:, :, :T].copy_(v)
        self._next = -1
        self._seek(T)

    @torch.no_grad()
    def _step_at(self, tokens: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step with every sequence at `position` (a host int: no synchronisation)."""
        if not 0 <= position < self.max_seq:
            raise InputError(f"position {position} outside the static cache (0..{self.max_seq - 1})")
        self._seek(position)
        kwargs = {self._cache_arg: self.cache, "position_ids": self._position_ids[position], "use_cache": True}
        if self._cache_position:
            kwargs["cache_position"] = self._position_ids[position, 0]
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        out = self._forward(input_ids=tokens.to(self.device, torch.long)[:, None], **kwargs)
        self._next = position + 1
        logits = out.logits[:, -1].float()
        if self.compiled and logits.dtype == out.logits.dtype:
            logits = logits.clone()    # fp32 model: .float() is the graph's own buffer, overwritten next replay
        return logits.argmax(dim=-1), logits

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = positions.cpu()
        if not bool((p == p[0]).all()):
            raise InputError(f"the Hugging Face static cache takes one position for the whole batch, got {p.tolist()}")
        return self._step_at(tokens, int(p[0]))

    def enqueue(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A step at the cache's write position (T after write_kv of T positions, one further after each
        step), which `positions` must equal: reading them back would synchronise."""
        return self._step_at(tokens, self._next)

    def check(self) -> None:
        pass


__all__ = ["HFDecoder", "build_hf_model", "hf_config", "hf_state_dict"]
