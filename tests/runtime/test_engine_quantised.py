"""The Engine on packed weights: prefill (runtime/prefill.py), the scheduler and the decode steps read the
matrices through PackedWeights, and give the tokens the same weights give dequantised at load."""
from __future__ import annotations

import pytest
import torch

from monokernel.runtime.engine import Engine

from conftest import TINY_SPECS, quantised_weights


@pytest.mark.parametrize("fmt, arch", [("int4-g32-min", "qwen2"), ("fp8-b128", "llama")])
def test_packed_generates_as_dense(fmt, arch):
    packed = quantised_weights(TINY_SPECS[arch], fmt, head=True)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    got = [g.token_ids for g in Engine.from_weights(packed).generate_ids(prompts, max_new_tokens=6)]
    expect = [g.token_ids for g in Engine.from_weights(packed.dequantized()).generate_ids(prompts, max_new_tokens=6)]
    assert got == expect and all(len(t) == 6 for t in got)
