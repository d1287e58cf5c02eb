"""Bytes a decode step must move at least, and the time that takes at the measured copy bandwidth.

A step reads every weight once (ModelSpec.weight_bytes_per_step: the layer matrices, the norms and the LM
head; the few embedding rows are left out), reads the K and V of every cached position of every sequence,
and writes the new position's K and V. Activations stay on chip or in L2 and are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.spec import ModelSpec


@dataclass(frozen=True)
class StepBytes:
    weights: int
    kv_read: int
    kv_written: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_read + self.kv_written


def step_bytes(spec: ModelSpec, batch: int, context: int, dtype: torch.dtype,
               weight_bytes: int | None = None) -> StepBytes:
    """One decode step of `batch` sequences that each hold `context` cached positions; `weight_bytes`: the weights
    as loaded (PackedWeights.bytes_per_step, packed formats counted exactly), default every matrix in `dtype`."""
    per_pos = spec.kv_bytes_per_position(dtype) * batch
    weights = spec.weight_bytes_per_step(dtype) if weight_bytes is None else weight_bytes
    return StepBytes(weights=weights, kv_read=context * per_pos, kv_written=per_pos)


def bytes_per_step(spec: ModelSpec, batch: int, context: int, dtype: torch.dtype, weight_bytes: int | None = None) -> int:
    return step_bytes(spec, batch, context, dtype, weight_bytes).total


def roofline_ms(nbytes: int, bandwidth_TBps: float) -> float:
    """Milliseconds to move `nbytes` at a copy bandwidth that counts bytes read plus bytes written."""
    return nbytes / (bandwidth_TBps * 1e12) * 1e3


def roofline_fraction(nbytes: int, bandwidth_TBps: float, ms_per_step: float) -> float:
    """(bytes / bandwidth) / measured time: 1.0 runs at the copy bandwidth."""
    return roofline_ms(nbytes, bandwidth_TBps) / ms_per_step
