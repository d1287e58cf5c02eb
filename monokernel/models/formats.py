"""The one table of element formats: how a weight matrix is stored, and which types activations and the
KV cache use. Quantised weight formats become rows here (bits below 16, a group size, a scale format);
every other module asks this table instead of keeping its own dtype map.

A weight format and the activation/KV dtype are separate choices: `KernelInputs` takes one of each, the
kernel gets a weight storage type `WT` beside its activation type `T`, and `bytes_for` counts the packed
codes plus their scales, so a roofline never counts more bytes than a step must read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class Format:
    name: str                       # the name users write (--dtype, --weights) and results record
    bits: int                       # bits of one stored element (a packed code for quantised formats)
    torch_dtype: torch.dtype        # the torch dtype of the stored tensor (packed codes: an integer dtype)
    ctype: str | None               # the C++ storage type in the kernel; None: the kernel cannot read it
    group_size: int = 0             # elements along K that share one scale (0: no scales)
    scale_format: str | None = None  # the format of those scales (a name in FORMATS)
    activation: bool = False        # may serve as the activation / KV-cache type of the kernel
    aliases: tuple[str, ...] = ()

    def __post_init__(self):
        if (self.group_size == 0) != (self.scale_format is None):
            raise ValueError(f"format {self.name}: a group size and a scale format go together")

    @property
    def kernel(self) -> bool:
        """Whether the megakernel can read weights stored this way."""
        return self.ctype is not None

    @property
    def element_bytes(self) -> int:
        """Bytes of one element where elements are whole bytes (the element type of a plain tensor)."""
        if self.bits % 8:
            raise ValueError(f"format {self.name} packs {self.bits}-bit codes: count with bytes_for()")
        return self.bits // 8

    def bytes_for(self, elements: int, rows: int = 1) -> int:
        """Bytes a step reads for `elements` weights in `rows` rows: packed codes plus one scale per group."""
        codes = -(-elements * self.bits // 8)
        if not self.group_size:
            return codes
        groups = rows * -(-(elements // max(rows, 1)) // self.group_size)
        return codes + groups * FORMATS[self.scale_format].element_bytes


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("bf16", 16, torch.bfloat16, "__nv_bfloat16", activation=True, aliases=("bfloat16",)),
    Format("fp16", 16, torch.float16, "__half", activation=True, aliases=("float16", "half")),
    Format("fp32", 32, torch.float32, None, aliases=("float32", "float")),
)}
_BY_ALIAS = {a: f for f in FORMATS.values() for a in (f.name, *f.aliases)}
_BY_TORCH = {f.torch_dtype: f for f in FORMATS.values() if not f.group_size}


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
        raise InputError(f"dtype {name!r} is not supported; use one of {', '.join(FORMATS)}")
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
