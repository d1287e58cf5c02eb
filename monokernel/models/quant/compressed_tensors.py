"""compressed-tensors checkpoints (llm-compressor, vLLM's format) -> int4 / int8 / fp8 formats.

One config group targeting every Linear is read (`config_groups.*.targets == ["Linear"]`, the rest listed in
`ignore`, usually lm_head). Weights only: activations stay in the activation dtype, so a W8A8 / FP8-dynamic
checkpoint runs as its weight-only twin (its `input_scale` tensors are read and dropped).

  format pack-quantized, int 4 bits   weight_packed int32 (N, K/8): element 8j + i in bits 4i of word j,
                                      stored as q + 8 (q signed); weight_scale (N, K/g); asymmetric:
                                      weight_zero_point int32 (N/8, K/g) packed the same way along N
                                      W = (q - zp) * s   -> int4-gG[-zp][-bf16]
  format pack-quantized, int 8 bits   weight_packed int32 (N, K/4), stored as q + 128, channel scales -> int8
  format int-quantized / naive-quantized, int 8 bits: weight int8 (N, K), channel scales -> int8
  format float-quantized, float 8 bits: weight float8_e4m3fn (N, K); weight_scale (N, 1) channel, (1,) tensor
                                      -> fp8; (N/128, K/128) block [128, 128] -> fp8-b128
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import CheckpointError, UnsupportedModelError
from .hf_config import Get, check_group, refuse, scale_suffix, trivial_g_idx
from .tensor import QuantTensor, pack_nibbles

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")
STRATEGIES = {"int": {4: ("group",), 8: ("channel",)}, "float": {8: ("channel", "tensor", "block")}}


def unpack_words(words: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """int32 words -> unsigned codes, element (32/bits)*j + i in bits `bits`*i of word j along `dim`."""
    per = 32 // bits
    w = (words.to(torch.int64) & 0xFFFFFFFF).movedim(dim, -1)
    out = torch.stack([(w >> (bits * i)) & ((1 << bits) - 1) for i in range(per)], dim=-1).flatten(-2)[..., :n]
    return out.movedim(-1, dim)


@dataclass(frozen=True)
class CompressedTensorsScheme:
    format: str
    kind: str               # "int" or "float"
    bits: int
    strategy: str
    symmetric: bool
    group: int
    suffixes: tuple[str, ...] = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point",
                                 "weight_g_idx", "input_scale", "input_zero_point")

    @classmethod
    def from_config(cls, q: dict) -> "CompressedTensorsScheme":
        where = "quantization_config"
        fmt = q.get("format")
        if fmt not in FORMATS:
            raise refuse("format", fmt, f"supported: {', '.join(FORMATS)}")
        if q.get("kv_cache_scheme") is not None:
            raise refuse("kv_cache_scheme", q["kv_cache_scheme"], "the KV cache stays in the activation dtype")
        groups = q.get("config_groups") or {}
        if not isinstance(groups, dict) or len(groups) != 1:
            raise refuse("config_groups", list(groups) if isinstance(groups, dict) else groups,
                         "exactly one group (targets ['Linear']) is read")
        name, group = next(iter(groups.items()))
        where = f"quantization_config.config_groups.{name}"
        if group.get("targets") != ["Linear"]:
            raise refuse("targets", group.get("targets"), "one scheme for every Linear is read", where)
        w = group.get("weights") or {}
        where += ".weights"
        kind, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy")
        allowed = STRATEGIES.get(kind, {}).get(bits)
        if allowed is None:
            raise refuse("num_bits", bits, "supported: int 4 and 8 bits, float 8 bits", where) if kind in STRATEGIES \
                else refuse("type", kind, "supported: int, float", where)
        if strategy not in allowed:
            raise refuse("strategy", strategy, f"{kind} {bits}-bit weights are read as: {', '.join(allowed)}", where)
        if strategy == "block" and w.get("block_structure") not in ([128, 128], (128, 128)):
            raise refuse("block_structure", w.get("block_structure"), "blocks are [128, 128]", where)
        symmetric = w.get("symmetric", True)
        if not symmetric and bits == 8:
            raise refuse("symmetric", symmetric, "8-bit weights are read symmetric", where)
        if w.get("dynamic") not in (False, None):
            raise refuse("dynamic", w.get("dynamic"), "weights have static scales", where)
        if fmt == "float-quantized" and kind != "float" or fmt != "float-quantized" and kind == "float":
            raise refuse("type", kind, f"format {fmt!r} does not store {kind} weights", where)
        g = check_group(w.get("group_size"), where) if strategy == "group" else 0
        return cls(format=fmt, kind=kind, bits=bits, strategy=strategy, symmetric=symmetric, group=g)

    def quantised(self, module: str, has) -> bool:
        return has(f"{module}.weight_scale")

    def matrix(self, module: str, get: Get) -> QuantTensor:
        scale = get(f"{module}.weight_scale")
        if self.kind == "float":
            return self._fp8(module, get(f"{module}.weight"), scale)
        if self.format == "pack-quantized":
            shape = tuple(int(d) for d in get(f"{module}.weight_shape").tolist())
            n, k = shape
            u = unpack_words(get(f"{module}.weight_packed"), self.bits, k, dim=1)     # (N, K) unsigned
        else:
            q = get(f"{module}.weight")
            if q.dtype != torch.int8:
                raise CheckpointError(f"{module}.weight is {q.dtype}; an int-quantized weight is int8")
            n, k = q.shape
            u = q.to(torch.int64) + 128
        if self.bits == 8:
            if scale.shape not in ((n, 1), (n,)):
                raise CheckpointError(f"{module}.weight_scale has shape {tuple(scale.shape)}; channel scales are ({n}, 1)")
            # fp32 scales hold bf16/fp16 ones exactly
            return QuantTensor("int8", (u - 128).to(torch.int8), scale.reshape(n, 1).float(), None, (n, k))
        g = self.group
        if k % g:
            raise UnsupportedModelError(f"compressed-tensors {module}: group_size={g} does not divide K={k}")
        if scale.shape != (n, k // g):
            raise CheckpointError(f"{module}.weight_scale has shape {tuple(scale.shape)}, expected {(n, k // g)}")
        try:
            trivial_g_idx(get(f"{module}.weight_g_idx"), k, g, module, "actorder")
        except CheckpointError:
            pass
        suffix = scale_suffix(scale, module)
        codes = pack_nibbles(u)
        if self.symmetric:
            return QuantTensor(f"int4-g{g}{suffix}", codes, scale.contiguous(), None, (n, k))
        try:
            zp = get(f"{module}.weight_zero_point")
        except CheckpointError:
            raise CheckpointError(f"compressed-tensors tensor {module}.weight_zero_point is missing for an "
                                  "asymmetric (symmetric=false) scheme; re-download the checkpoint") from None
        z = unpack_words(zp, 4, n, dim=0)                                           # (N, K/g) unsigned: zp + 8
        return QuantTensor(f"int4-g{g}-zp{suffix}", codes, scale.contiguous(), pack_nibbles(z), (n, k))

    def _fp8(self, module: str, q: torch.Tensor, scale: torch.Tensor) -> QuantTensor:
        if q.dtype != torch.float8_e4m3fn:
            raise CheckpointError(f"{module}.weight is {q.dtype}; float-quantized weights are float8_e4m3fn")
        n, k = q.shape
        s = scale.float()
        if self.strategy == "block":
            want = (-(-n // 128), -(-k // 128))
            if tuple(s.shape) != want:
                raise CheckpointError(f"{module}.weight_scale has shape {tuple(s.shape)}, expected {want} for 128x128 blocks")
            return QuantTensor("fp8-b128", q.contiguous(), s.contiguous(), None, (n, k))
        if self.strategy == "tensor":
            if s.numel() != 1:
                raise CheckpointError(f"{module}.weight_scale has {s.numel()} values; a tensor scale is one")
            s = s.reshape(1, 1).expand(n, 1)        # one scale a row, each the tensor's: the same values
        elif s.shape not in ((n, 1), (n,)):
            raise CheckpointError(f"{module}.weight_scale has shape {tuple(s.shape)}; channel scales are ({n}, 1)")
        return QuantTensor("fp8", q.contiguous(), s.reshape(n, 1).contiguous(), None, (n, k))
