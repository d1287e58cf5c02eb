"""`quantization_config` of a Hugging Face config.json -> the loader of its packed matrices, or an
UnsupportedModelError naming the field and value it cannot honour.

Supported: quant_method "gptq" (gptq.py), "awq" (awq.py), "compressed-tensors" (compressed_tensors.py).
A scheme answers which tensor suffixes it reads (so the safetensors loader does not call them unused) and
turns one linear layer's tensors into a QuantTensor in the canonical layout of models/quant.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from ...errors import CheckpointError, UnsupportedModelError
from .tensor import QuantTensor

Get = Callable[[str], torch.Tensor]
GROUPS = (32, 64, 128)


class Scheme(Protocol):
    suffixes: tuple[str, ...]     # tensor names after "<module>." the scheme reads

    def quantised(self, module: str, has: Callable[[str], bool]) -> bool: ...
    def matrix(self, module: str, get: Get) -> QuantTensor: ...


def refuse(key: str, value: Any, why: str, where: str = "quantization_config") -> UnsupportedModelError:
    return UnsupportedModelError(f"{where}.{key}={value!r} is not supported: {why}")


def scheme_for(config: dict) -> Scheme | None:
    """The scheme of a config.json, None where it has no quantization_config."""
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise refuse("quantization_config", q, "expected an object", where="config")
    method = q.get("quant_method")
    if method == "gptq":
        from .gptq import GptqScheme
        return GptqScheme.from_config(q)
    if method == "awq":
        from .awq import AwqScheme
        return AwqScheme.from_config(q)
    if method == "compressed-tensors":
        from .compressed_tensors import CompressedTensorsScheme
        return CompressedTensorsScheme.from_config(q)
    raise refuse("quant_method", method, "supported: gptq, awq, compressed-tensors (or a dense checkpoint with "
                 "--quantize)")


def packed_int4(method: str, module: str, get: Get) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A GPTQ or AWQ layer's qweight, scales and qzeros; a missing qzeros is an incomplete checkpoint."""
    qweight, scales = get(f"{module}.qweight"), get(f"{module}.scales")
    try:
        qzeros = get(f"{module}.qzeros")
    except CheckpointError:
        raise CheckpointError(f"{method} tensor {module}.qzeros is missing (qweight and scales are there); the "
                              "checkpoint is incomplete: re-download it") from None
    return qweight, scales, qzeros


def check_group(group: Any, where: str = "quantization_config", key: str = "group_size") -> int:
    if group not in GROUPS:
        raise refuse(key, group, f"int4 group sizes are {', '.join(map(str, GROUPS))}", where)
    return group


def scale_suffix(scales: torch.Tensor, module: str) -> str:
    """The format-name suffix of int4 scales stored as fp16 ("") or bf16 ("-bf16"); other types would round."""
    if scales.dtype == torch.float16:
        return ""
    if scales.dtype == torch.bfloat16:
        return "-bf16"
    raise UnsupportedModelError(f"{module} scales are {scales.dtype}; int4 formats keep fp16 or bf16 scales "
                                "(converting would round them)")


def trivial_g_idx(g_idx: torch.Tensor, k: int, group: int, module: str, what: str) -> None:
    """Refuses act-order: a g_idx other than k // group would need the activations permuted per matrix."""
    expect = torch.arange(k, dtype=torch.int64) // group
    if g_idx.shape != (k,) or not torch.equal(g_idx.to(torch.int64), expect):
        raise UnsupportedModelError(f"{module}.g_idx is not k // group_size: {what} (act-order) checkpoints are "
                                    "not supported; use one quantised without act-order (desc_act=False)")
