"""QuantTensor: a quantised matrix (or a layer stack of them) in the canonical layout of models/quant/__init__.py.

It stands where PackedWeights holds a dense tensor; indexing the leading (layer) dimension and slicing rows give
QuantTensors of the same format, so the reference engine and the simulator fetch a layer or a tile of rows
exactly as they fetch them from a dense tensor, then call dequantize().
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import CheckpointError
from ..formats import FORMATS, Format, get_format


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Integers 0..15 (..., n) -> uint8 (..., ceil(n/2)): element 2j in the low nibble of byte j."""
    v = values.to(torch.uint8)
    if v.shape[-1] % 2:
        v = torch.nn.functional.pad(v, (0, 1))
    return v[..., 0::2] | (v[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_nibbles: uint8 (..., m) -> uint8 (..., n) with n <= 2m."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
    return out[..., :n]


@dataclass
class QuantTensor:
    format: Format
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, ...]          # the logical (*stack, rows, K)

    def __post_init__(self):
        self.format = get_format(self.format)
        self.shape = tuple(int(d) for d in self.shape)
        f, shape = self.format, self.shape
        if not f.quantised:
            raise ValueError(f"QuantTensor of the unquantised format {f.name}")
        *lead, rows, k = shape
        expect = {"codes": ((*lead, rows, -(-k * f.bits // 8)), f.torch_dtype),
                  "scales": ((*lead, -(-rows // f.block_rows), f.groups(k)), FORMATS[f.scale_format].torch_dtype)}
        if f.zero == "int":
            expect["zeros"] = ((*lead, rows, -(-f.groups(k) // 2)), torch.uint8)
        elif f.zero == "min":
            expect["zeros"] = ((*lead, rows, f.groups(k)), FORMATS[f.scale_format].torch_dtype)
        elif self.zeros is not None:
            raise ValueError(f"{f.name} has no zero points")
        for name, (want_shape, want_dtype) in expect.items():
            t = getattr(self, name)
            if t is None or tuple(t.shape) != want_shape or t.dtype != want_dtype:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ValueError(f"{f.name} {name} of a {shape} matrix: expected {want_shape} {want_dtype}, got {got}")

    # ---- what a dense tensor answers ---------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes + scales + zeros (Format.bytes_for per matrix, times the stack)."""
        return sum(t.numel() * t.element_size() for t in self.parts())

    def parts(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.codes, self.scales, self.zeros) if t is not None)

    def _map(self, fn, shape) -> "QuantTensor":
        return QuantTensor(self.format, fn(self.codes), fn(self.scales),
                           None if self.zeros is None else fn(self.zeros), shape)

    def __getitem__(self, index) -> "QuantTensor":
        """One matrix of a stack (an int), a (layer, row slice) pair as the simulator takes tiles, or rows of
        one matrix (a slice)."""
        if isinstance(index, tuple):
            layer, rows = index
            return self[layer].rows(rows)
        if isinstance(index, slice) and self.ndim == 2:
            return self.rows(index)
        if not isinstance(index, int) or self.ndim < 3:
            raise TypeError("a QuantTensor stack is indexed by layer (an int) or (layer, row slice); one matrix by a row slice")
        return self._map(lambda t: t[index], self.shape[1:])

    def rows(self, rows: slice) -> "QuantTensor":
        """A contiguous range of rows; with blocks of several rows it must start and end on block bounds."""
        r0, r1, step = rows.indices(self.shape[-2])
        br = self.format.block_rows
        if step != 1 or (br > 1 and (r0 % br or (r1 % br and r1 != self.shape[-2]))):
            raise ValueError(f"rows {r0}:{r1} of a {self.format.name} matrix are not whole blocks of {br} rows")
        s = slice(r0 // br, -(-r1 // br))
        return QuantTensor(self.format, self.codes[..., r0:r1, :], self.scales[..., s, :],
                           None if self.zeros is None else self.zeros[..., r0:r1, :],
                           (*self.shape[:-2], r1 - r0, self.shape[-1]))

    def take_rows(self, index: torch.Tensor) -> "QuantTensor":
        """Rows gathered by index (an embedding lookup); index (...,) of a single matrix."""
        if self.ndim != 2 or self.format.block_rows != 1:
            raise ValueError(f"take_rows needs one {self.format.name} matrix with a scale per row")
        flat = index.reshape(-1)
        return QuantTensor(self.format, self.codes[flat], self.scales[flat],
                           None if self.zeros is None else self.zeros[flat], (flat.numel(), self.shape[-1]))

    def permute_rows(self, perm: torch.Tensor) -> "QuantTensor":
        """Rows reordered (the GGUF rotary un-permutation); lossless for formats with a scale per row."""
        if self.format.block_rows != 1:
            raise ValueError(f"rows of a {self.format.name} matrix cannot be permuted one by one")
        return self._map(lambda t: t[..., perm, :], self.shape)

    def to(self, device=None) -> "QuantTensor":
        return self._map(lambda t: t.to(device), self.shape)

    def __repr__(self) -> str:
        return f"QuantTensor({self.format.name}, shape={self.shape}, {self.nbytes} bytes)"


# formats with blocks of rows -> the same values with a scale per row (the blocks' scales repeated)
ROW_SCALED = {"fp8-b128": "fp8-g128"}


def per_row_scales(qt: QuantTensor) -> QuantTensor:
    """The matrix with one scale (group) per row: a block format's scales repeated over its rows, losslessly."""
    f = qt.format
    if f.block_rows == 1:
        return qt
    s = qt.scales.repeat_interleave(f.block_rows, dim=-2)[..., :qt.shape[-2], :]
    return QuantTensor(ROW_SCALED[f.name], qt.codes, s.contiguous(), qt.zeros, qt.shape)


def cat_rows(parts: list[QuantTensor]) -> QuantTensor:
    """Matrices of one format and K stacked along rows (q, k and v into w_qkv); blocks of rows that would
    straddle two matrices become a scale per row."""
    if parts[0].format.block_rows > 1 and any(p.shape[-2] % p.format.block_rows for p in parts[:-1]):
        parts = [per_row_scales(p) for p in parts]
    f = parts[0].format
    if any(p.format != f or p.shape[-1] != parts[0].shape[-1] for p in parts):
        raise CheckpointError(f"matrices stacked into one ({', '.join(p.format.name for p in parts)}) must share "
                              "one format and K")
    zeros = None if f.zero is None else torch.cat([p.zeros for p in parts], dim=-2)
    return QuantTensor(f, torch.cat([p.codes for p in parts], dim=-2), torch.cat([p.scales for p in parts], dim=-2),
                       zeros, (*parts[0].shape[:-2], sum(p.shape[-2] for p in parts), parts[0].shape[-1]))


def interleave_rows(a: QuantTensor, b: QuantTensor) -> QuantTensor:
    """Rows a_0, b_0, a_1, b_1, ... (gate and up into w_gu); blocks of rows become a scale per row."""
    a, b = per_row_scales(a), per_row_scales(b)
    if a.format != b.format or a.shape != b.shape:
        raise CheckpointError(f"gate and up ({a.format.name}, {b.format.name}) must share one format and shape "
                              "with a scale per row to be interleaved")

    def mix(x, y):
        return torch.stack([x, y], dim=-2).flatten(-3, -2)
    zeros = None if a.zeros is None else mix(a.zeros, b.zeros)
    return QuantTensor(a.format, mix(a.codes, b.codes), mix(a.scales, b.scales), zeros,
                       (*a.shape[:-2], 2 * a.shape[-2], a.shape[-1]))


def stack_layers(parts: list[QuantTensor]) -> QuantTensor:
    f = parts[0].format
    if any(p.format != f or p.shape != parts[0].shape for p in parts):
        raise CheckpointError("layers stacked into one tensor must share one format")
    zeros = None if f.zero is None else torch.stack([p.zeros for p in parts])
    return QuantTensor(f, torch.stack([p.codes for p in parts]), torch.stack([p.scales for p in parts]), zeros,
                       (len(parts), *parts[0].shape))


def nbytes(m) -> int:
    """Bytes a matrix holds, dense or packed."""
    return m.numel() * m.element_size() if isinstance(m, torch.Tensor) else m.nbytes


def format_label(m) -> str:
    """A matrix's storage format as results and errors name it."""
    if isinstance(m, QuantTensor):
        return m.format.name
    if isinstance(m, RowStack):
        return "+".join(format_label(p) for p in m.parts)
    return get_format(m.dtype).name


class RowStack:
    """Matrices of differing formats stacked along rows: a Q4_K_M GGUF stores a layer's q and k as Q4_K and its
    v as Q6_K, all three in one w_qkv. Each part keeps its own format; a row range gives the parts it covers."""

    def __init__(self, parts: list):
        self.parts = list(parts)
        if len({p.shape[-1] for p in self.parts}) != 1:
            raise CheckpointError("matrices stacked along rows must share K")

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[-2] for p in self.parts), self.parts[0].shape[-1])

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    ndim = 2

    @property
    def nbytes(self) -> int:
        return sum(nbytes(p) for p in self.parts)

    def rows(self, rows: slice) -> "RowStack":
        r0, r1, _ = rows.indices(self.shape[0])
        out, base = [], 0
        for p in self.parts:
            n = p.shape[-2]
            lo, hi = max(r0 - base, 0), min(r1 - base, n)
            if lo < hi:
                out.append(p[lo:hi] if isinstance(p, torch.Tensor) else p.rows(slice(lo, hi)))
            base += n
        return RowStack(out)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.rows(index)
        raise TypeError("a RowStack is one matrix: index it by a row slice")

    def to(self, device=None) -> "RowStack":
        return RowStack([p.to(device) for p in self.parts])

    def __repr__(self) -> str:
        return f"RowStack({format_label(self)}, shape={self.shape})"


class LayerStack:
    """Per-layer matrices of one kind whose formats differ (a Q4_K_M GGUF stores some layers' ffn_down as Q6_K,
    the others as Q4_K): indexed like a stacked tensor, one QuantTensor (or dense tensor) a layer."""

    def __init__(self, layers: list):
        self.layers = list(layers)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.layers), *self.layers[0].shape)

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(nbytes(m) for m in self.layers)

    @property
    def formats(self) -> list[str]:
        return [format_label(m) for m in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index):
        if isinstance(index, tuple):
            layer, rows = index
            m = self.layers[layer]
            return m[rows] if isinstance(m, torch.Tensor) else m.rows(rows)
        return self.layers[index]

    def to(self, device=None) -> "LayerStack":
        return LayerStack([m.to(device) for m in self.layers])

    def __repr__(self) -> str:
        return f"LayerStack({', '.join(self.formats)}, shape={self.shape})"


def stack_matrices(parts: list) -> "QuantTensor | LayerStack | torch.Tensor":
    """Per-layer matrices -> one stacked tensor of one format, or a LayerStack where the formats differ."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.stack(parts)
    if all(isinstance(p, QuantTensor) and p.format == parts[0].format for p in parts):
        return stack_layers(parts)
    return LayerStack(parts)
