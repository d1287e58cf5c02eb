"""What a kernel is generated for: the model, the batch, the cache length, the weight format, the
activation/KV dtype and the GPU. Nothing here is a choice of how: that is `Tuning`."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnsupportedModelError
from ..models.formats import FORMATS, Format, get_format, kernel_activation
from ..models.spec import ModelSpec

MAX_BATCH = 16
# Tokens of one sequence a verify step scores in one launch (speculative decoding): the tensor-core attention
# walk takes a split's new keys in one 8-key pass, and a draft past 7 tokens is rarely all accepted.
MAX_TOKENS_PER_SEQ = 8
# Query heads per KV head: the CUDA-core attention walk (past the tensor cores' 8) keeps per-lane state for
# each, and 32 spill hundreds of bytes even with 255 registers a thread (perf note 28); 16 fit.
MAX_GROUP = 16


@dataclass(frozen=True)
class GpuInfo:
    name: str = "H100"
    sm_count: int = 132
    smem_per_block: int = 227 * 1024   # opt-in dynamic shared memory per block on sm_90
    arch: str = "sm_90a"


@dataclass(frozen=True)
class KernelInputs:
    spec: ModelSpec
    batch: int
    max_seq: int
    weights: Format | str = "bf16"      # how the weight matrices are stored
    activations: Format | str = "bf16"  # the residual stream, inputs and the KV cache
    gpu: GpuInfo = field(default_factory=GpuInfo)
    # Rows of the batch per sequence: 1 for a decode step; T > 1 for a verify step, where rows s*T .. s*T+T-1
    # are T consecutive positions of sequence s (its last token and a draft), causal among themselves, and
    # the KV cache holds batch // T sequences.
    tokens_per_seq: int = 1

    def __post_init__(self):
        act = kernel_activation(self.activations)
        w = get_format(self.weights)
        if w.quantised and not w.kernel:
            # the format table and the packed layout are ready (models/quant); the kernel's unpacking trait
            # and tile layout for this row are issue 18's kernel half (int8 has one)
            raise UnsupportedModelError(f"quantised weights ({w.name}) are not in the megakernel yet; "
                                        "use engine='reference'")
        if not w.kernel:
            raise UnsupportedModelError(f"the megakernel cannot read {w.name} weights; use dtype='bf16'")
        if not w.quantised and w != act:
            # the matrix-vector templates read weights in the activation type so far: the storage type
            # `WT` beside `T` is where a quantised format's unpacking goes
            raise UnsupportedModelError(f"{w.name} weights with {act.name} activations are not supported yet; "
                                        f"store the weights as {act.name}")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "activations", act)
        if not 1 <= self.batch <= MAX_BATCH:
            raise UnsupportedModelError(f"batch {self.batch} out of range: the megakernel takes 1..{MAX_BATCH}")
        t = self.tokens_per_seq
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_TOKENS_PER_SEQ or self.batch % t:
            raise UnsupportedModelError(f"tokens_per_seq={t!r} must be an integer in 1..{MAX_TOKENS_PER_SEQ} that divides "
                                        f"the batch ({self.batch} rows)")
        if self.max_seq > self.spec.max_position_embeddings or self.max_seq < 1:
            raise UnsupportedModelError(
                f"max_seq={self.max_seq} must be in 1..max_position_embeddings={self.spec.max_position_embeddings}")
        s = self.spec
        per_vector = 128 // w.bits       # weights of one 16-byte load
        if w.group_size and any(k % w.group_size for k in (s.hidden_size, s.q_size, s.intermediate_size)):
            raise UnsupportedModelError(f"{w.name} groups of {w.group_size} must divide hidden_size, q_size and "
                                        f"intermediate_size ({s.hidden_size}, {s.q_size}, {s.intermediate_size})")
        for name, k in (("hidden_size", s.hidden_size), ("q_size", s.q_size), ("intermediate_size", s.intermediate_size)):
            if k % per_vector:
                raise UnsupportedModelError(f"{name}={k} must be a multiple of {per_vector} for 16-byte loads of "
                                            f"{w.name} weights")
        if s.group_size > MAX_GROUP:
            raise UnsupportedModelError(
                f"{s.num_heads} query heads over {s.num_kv_heads} KV heads ({s.group_size} per KV head): the megakernel "
                f"takes at most {MAX_GROUP} per KV head (more spill registers); use --engine reference")
        if s.head_dim % 32:
            raise UnsupportedModelError(f"head_dim={s.head_dim} must be a multiple of 32 (one warp spans a head)")

    @property
    def seqs(self) -> int:
        """Sequences of the KV cache: the batch's rows, tokens_per_seq a sequence."""
        return self.batch // self.tokens_per_seq

    @property
    def wb(self) -> int:
        """Bytes of one stored weight element of the layers' matrices where it is whole bytes (bf16, int8)."""
        return self.weights.bits // 8

    def code_row_bytes(self, op) -> int:
        """Bytes of one stored row of `op`'s matrix, codes only: the LM head stays in the activation type (a
        quantised checkpoint's too: models/quant/rtn.py)."""
        from .abi import op_matrix_shape
        from .tasks import Op
        k = op_matrix_shape(self.spec, op)[1]
        return k * self.ab if op == Op.LMHEAD else k * self.weights.bits // 8

    def scale_row_bytes(self, op) -> int:
        """Bytes of one row's group scales as they follow a chunk's codes in a ring slot (int4): whole 16-byte
        units, since the bulk copy moves nothing smaller (MegaDecoder pads the table to match); 0 without."""
        from .abi import op_matrix_shape
        from .tasks import Op
        if op == Op.LMHEAD or not self.grouped:
            return 0
        groups = op_matrix_shape(self.spec, op)[1] // self.weights.group_size
        size = FORMATS[self.weights.scale_format].element_bytes
        return -(-groups * size // 16) * 16

    def row_bytes(self, op) -> int:
        """Bytes one row of `op` takes in the ring: its codes and, for int4, its scales."""
        return self.code_row_bytes(op) + self.scale_row_bytes(op)

    @property
    def scaled(self) -> bool:
        """The layers' matrices are int8 or fp8 codes with a scale a row (a table the epilogue reads)."""
        return self.weights.quantised and not self.weights.group_size

    @property
    def grouped(self) -> bool:
        """The layers' matrices are int4 codes with a scale a group along K (streamed after the codes)."""
        return self.weights.quantised and bool(self.weights.group_size)

    @property
    def ab(self) -> int:
        """Bytes of one activation or KV-cache element."""
        return self.activations.element_bytes
