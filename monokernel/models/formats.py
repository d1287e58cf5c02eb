"""The one table of element formats: how a weight matrix is stored, and which types activations and the
KV cache use. Quantised weight formats become rows here (bits below 16, a group size, a scale format);
every other module asks this table instead of keeping its own dtype map.

A weight format and the activation/KV dtype are separate choices: `KernelInputs` takes one of each, the
kernel gets a weight storage type `WT` beside its activation type `T`, and `bytes_for` counts the packed
codes plus their scales, so a roofline never counts more bytes than a step must read.

Quantised rows (int8, int4 g32/64/128 sym/zp with fp16/bf16 scales, fp8 per channel and 128x128, and the GGUF
types mapped onto them) carry everything the kernel's unpacking needs: code bits, offset, zero kind, group,
block rows and scale type. Their in-memory layout (models/quant) is one per family; `ctype` stays None
until the megakernel has a trait for the row, so KernelInputs refuses it by name. int8 (a scale a row) has
one: the CUDA-core matrix-vector path reads its codes and scales the row's sum (templates/kernel/gemv.cuh),
the tensor-core path turns them into operand pairs (gemv_mma.cuh); so do the int4 rows, symmetric or with an
integer zero point a group (GPTQ asym, AWQ; tensor cores only), their group scales in the stored rows, and fp8
e4m3 with a scale a row (tensor cores only: the hardware's e4m3 pair conversion), and GGUF's Q8_0 (int8-g32)
and Q4_1 (int4-g32-min: a float min a group, its term the min times the group's input sum; tensor cores only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class Format:
    name: str                       # the name users write (--dtype, --quantize) and results record
    bits: int                       # bits of one stored element (a packed code for quantised formats)
    torch_dtype: torch.dtype        # the torch dtype of the stored tensor (packed codes: an integer dtype)
    ctype: str | None               # the C++ storage type in the kernel; None: the kernel cannot read it
    group_size: int = 0             # elements along K that share one scale (0 with a scale format: a whole row)
    scale_format: str | None = None  # the format of those scales (a name in FORMATS); None: not quantised
    activation: bool = False        # may serve as the activation / KV-cache type of the kernel
    aliases: tuple[str, ...] = ()
    block_rows: int = 1             # rows that share one scale (128 for 128x128 blocks)
    code_offset: int = 0            # subtracted from every unsigned code (8: symmetric int4 stored as 0..15)
    zero: str | None = None         # None: w = s*(c - offset); "int": w = s*(c - z), z a `bits`-bit integer a
                                    # group; "min": w = s*c + m, m a float a group in the scale format
    source: str = ""                # the checkpoint formats stored losslessly this way (documentation)

    def __post_init__(self):
        if self.group_size and self.scale_format is None:
            raise ValueError(f"format {self.name}: a group size and a scale format go together")
        if self.zero not in (None, "int", "min") or (self.zero and self.scale_format is None):
            raise ValueError(f"format {self.name}: zero={self.zero!r} needs a scale format and is 'int' or 'min'")

    @property
    def quantised(self) -> bool:
        """Codes with scales: read through models.quant.dequantize(), never as a plain tensor."""
        return self.scale_format is not None

    @property
    def kernel(self) -> bool:
        """Whether the megakernel can read weights stored this way."""
        return self.ctype is not None

    @property
    def element_bytes(self) -> int:
        """Bytes of one element where elements are whole bytes (the element type of a plain tensor)."""
        if self.bits % 8 or self.quantised:
            raise ValueError(f"format {self.name} stores {self.bits}-bit codes with scales: count with bytes_for()")
        return self.bits // 8

    def groups(self, k: int) -> int:
        """Scales along one row of K elements."""
        return -(-k // self.group_size) if self.group_size else 1

    def bytes_for(self, elements: int, rows: int = 1) -> int:
        """Bytes a step reads for `elements` weights in `rows` rows of K = elements / rows: every row's codes
        rounded up to whole bytes, one scale per group (per block of `block_rows` rows), and the zero points
        (`int`: packed `bits` to a group, each row rounded up to whole bytes; `min`: one scale-format value)."""
        rows = max(rows, 1)
        k = elements // rows
        codes = rows * -(-k * self.bits // 8)
        if not self.quantised:
            return codes
        scale_bytes = FORMATS[self.scale_format].element_bytes
        g = self.groups(k)
        scales = -(-rows // self.block_rows) * g * scale_bytes
        zeros = {None: 0, "int": rows * -(-g * self.bits // 8), "min": rows * g * scale_bytes}[self.zero]
        return codes + scales + zeros


def _quantised() -> list[Format]:
    """The weight formats of issue 18, one row each; the layouts they name are in models/quant/__init__.py.

    int4 rows are generated over group size (32, 64, 128), zero kind (none: symmetric, codes 0..15 around 8;
    `-zp`: integer zero points, GPTQ/AWQ/compressed-tensors asymmetric) and scale type (fp16, the checkpoints'
    default; `-bf16`)."""
    rows = [
        Format("int8", 8, torch.int8, "int8_t", 0, "fp32", source="--quantize int8 (absmax/127 a row), "
               "compressed-tensors W8A16 channel; fp32 scales hold any checkpoint's bf16/fp16 scale exactly"),
        # GGUF Q8_0 and Q4_1 read natively on tensor cores: the group scales (and Q4_1's mins) in each stored
        # segment after its codes, folded into the accumulators once a group (templates/kernel/gemv_mma.cuh)
        Format("int8-g32", 8, torch.int8, "int8_t", 32, "fp16", source="GGUF Q8_0"),
        Format("int8-g16-fp32", 8, torch.int8, None, 16, "fp32", source="GGUF Q6_K (codes q-32, scale d*sc)"),
        Format("int4-g32-min", 4, torch.uint8, "uint8_t", 32, "fp16", zero="min", source="GGUF Q4_1 (w = d*q + m)"),
        Format("int4-g32-min-fp32", 4, torch.uint8, None, 32, "fp32", zero="min",
               source="GGUF Q4_K (scale d*sc, min -dmin*m a sub-block of 32)"),
        Format("fp8", 8, torch.float8_e4m3fn, "uint8_t", 0, "fp32", source="--quantize fp8 (absmax/448 a row), "
               "compressed-tensors FP8 channel or tensor"),
        Format("fp8-b128", 8, torch.float8_e4m3fn, None, 128, "fp32", block_rows=128,
               source="compressed-tensors FP8 block [128, 128], DeepSeek/Qwen weight_scale_inv"),
        Format("fp8-g128", 8, torch.float8_e4m3fn, None, 128, "fp32",
               source="fp8-b128 matrices whose rows are interleaved (gate/up) or not whole blocks (k/v of 64 "
                      "rows): each row repeats its block's scale, losslessly, for 1/32 more bytes"),
    ]
    for g in (32, 64, 128):
        for zero, zs in ((None, ""), ("int", "-zp")):
            for scale, ss in (("fp16", ""), ("bf16", "-bf16")):
                src = {None: "symmetric: GPTQ sym, compressed-tensors pack-quantized sym" + (", GGUF Q4_0" if g == 32 and scale == "fp16" else ""),
                       "int": "GPTQ asym, AWQ GEMM, compressed-tensors pack-quantized asym"}[zero]
                # every int4 row has the kernel's trait (codes two a byte; the tensor-core path also subtracts a
                # zero point a group, which rides after the scales in each stored segment)
                rows.append(Format(f"int4-g{g}{zs}{ss}", 4, torch.uint8, "uint8_t", g, scale,
                                   zero=zero,
                                   code_offset=8 if zero is None else 0, source=src))
    return rows


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("bf16", 16, torch.bfloat16, "__nv_bfloat16", activation=True, aliases=("bfloat16",)),
    Format("fp16", 16, torch.float16, "__half", activation=True, aliases=("float16", "half")),
    Format("fp32", 32, torch.float32, None, aliases=("float32", "float")),
    *_quantised(),
)}
# --quantize NAME: round-to-nearest from a dense checkpoint (models/quant/rtn.py); "int4" is group 128
QUANTIZE_ALIASES = {"int4": "int4-g128"}
_BY_ALIAS = {a: f for f in FORMATS.values() for a in (f.name, *f.aliases)}
_BY_TORCH = {f.torch_dtype: f for f in FORMATS.values() if not f.quantised}


def get_format(name: str | torch.dtype | Format) -> Format:
    """A format by name, alias or unquantised torch dtype; InputError naming the choices otherwise."""
    if isinstance(name, Format):
        return name
    if isinstance(name, torch.dtype):
        if name in _BY_TORCH:
            return _BY_TORCH[name]
        raise InputError(f"dtype {name} has no format; use one of {', '.join(FORMATS)}")
    f = _BY_ALIAS.get(str(name).lower())
    if f is None:
        plain = ", ".join(n for n, g in FORMATS.items() if not g.quantised)
        raise InputError(f"dtype {name!r} is not supported; use one of {plain} "
                         f"(weight formats for --quantize: {', '.join(quantize_choices())})")
    return f


# The K-quant mappings (Q4_K / Q6_K's sub-blocks as fp32-scaled groups) come from llama.cpp's own quantiser only;
# Q8_0 (int8-g32) and Q4_1 (int4-g32-min) are round-to-nearest in llama.cpp too, so --quantize makes their twins.
_NOT_RTN = ("int8-g16-fp32", "int4-g32-min-fp32")


def quantize_choices() -> list[str]:
    return [*QUANTIZE_ALIASES, *(n for n, f in FORMATS.items() if f.quantised and n not in _NOT_RTN)]


def quantize_format(name: str | Format) -> Format:
    """A format `--quantize` can produce from dense weights (round-to-nearest), or InputError listing them."""
    f = name if isinstance(name, Format) else _BY_ALIAS.get(QUANTIZE_ALIASES.get(str(name).lower(), str(name).lower()))
    if f is None or f.name not in quantize_choices():
        name = name.name if isinstance(name, Format) else name
        raise InputError(f"quantize={name!r} is not a format round-to-nearest can produce; "
                         f"use one of {', '.join(quantize_choices())}")
    return f


def format_name(dtype: torch.dtype) -> str:
    return get_format(dtype).name


def kernel_activation(fmt: str | torch.dtype | Format) -> Format:
    """The format as the megakernel's activation / KV type, or UnsupportedModelError saying which it takes."""
    from ..errors import UnsupportedModelError
    f = get_format(fmt)
    if not f.activation:
        names = " or ".join(n for n, g in FORMATS.items() if g.activation)
        raise UnsupportedModelError(f"the megakernel runs {names} activations, not {f.name}; use dtype='bf16'")
    return f
