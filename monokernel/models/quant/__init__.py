"""Quantised weight matrices: one container (QuantTensor), one canonical in-memory layout per format family, one
oracle (`dequantize`), and the converters from each checkpoint's own packing (gptq, awq, compressed_tensors,
gguf_packed) and from dense weights (rtn). The formats themselves are rows of models/formats.py.

Canonical layout of a matrix of logical shape (*S, R, K) (S: the layer stack of PackedWeights, R rows = output
channels, K = the reduction axis, row-major as the dense matrices):

  codes   4-bit: uint8 (*S, R, ceil(K/2)), element 2j of a row in the low nibble of byte j, 2j+1 in the high
                 nibble (unsigned 0..15; symmetric formats subtract `code_offset` = 8)
          8-bit: int8 (*S, R, K) (two's complement) or float8_e4m3fn (*S, R, K)
  scales  (*S, ceil(R/block_rows), groups) in the format's scale type; groups = K/group_size, or 1 per row
  zeros   zero="int": uint8 (*S, R, ceil(groups/2)), nibbles packed along the groups as the codes are
          zero="min": (*S, R, groups) in the scale type (a float added after scaling)
          zero=None:  absent

  w[r, k] = s * (c - code_offset)            zero=None
          = s * (c - z)                      zero="int"
          = s * c + m                        zero="min"
  with s = scales[r // block_rows, k // group_size], z and m of group k // group_size, computed in fp32 in this
  order, then rounded to the activation dtype. For every checkpoint format (fp16/bf16 scales, GGUF's) each step
  is exact in fp32, so any order (an FMA too) gives the same bits and the only rounding is the last; an fp32
  scale of our own (--quantize int8/fp8) makes the product one fp32 rounding, which a kernel must do the same.

Every checkpoint format is converted to this layout at load losslessly (the tests compare `dequantize` of the
converted tensor with the checkpoint's own published formula, bitwise); the kernel's tile layout will be made
from it once at load, as the bf16 tiles are made from the dense matrices.
"""
from .dequant import dequantize
from .tensor import QuantTensor, pack_nibbles, unpack_nibbles

__all__ = ["QuantTensor", "dequantize", "pack_nibbles", "unpack_nibbles"]
