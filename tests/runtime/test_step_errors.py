"""How the host reads the kernel's error words (CPU: the decoding, not the kernel), and the simulator
refusing the inputs the kernel refuses."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import TINY_SPECS
from monokernel.errors import InputError, KernelRuntimeError
from monokernel.models.weights import random_weights
from monokernel.runtime.kv_cache import KVCache
from monokernel.runtime.mega import step_error
from monokernel.schedule.build import build_schedule
from monokernel.schedule.plan import plan_for
from monokernel.schedule.simulate import Simulator
from monokernel.schedule.step_check import BAD_POSITION, BAD_TOKEN

SPEC = TINY_SPECS["llama"]
PLAN = plan_for(SPEC, 3, 64)


def test_bad_token_words():
    err, back = step_error([BAD_TOKEN, 7, 2, 1234], 9, PLAN, 10.0)
    assert isinstance(err, InputError) and back == 6
    assert "step 7: an input token is outside the vocabulary: sequence 2 has 1234, outside the vocabulary of " \
           "1000 tokens (0..999)" in str(err) and "decoder runs on" in str(err)


def test_bad_position_words_across_the_epoch_wrap():
    # the kernel sees the epoch mod 2^32, stored as int32
    host = 2**32 + 5
    err, back = step_error([BAD_POSITION, 3, 0, -1], host, PLAN, 10.0)
    assert back == 2**32 + 2 and "KV cache of 64 positions (0..63)" in str(err) and "has -1" in str(err)
    err, back = step_error([BAD_POSITION, -2, 1, 70], 2**32 - 1, PLAN, 10.0)    # epoch 2^32 - 2 as int32
    assert back == 2**32 - 3


def test_timeout_words_reset():
    err, back = step_error([1, 0, 0, 0], 12, PLAN, 0.5)
    assert isinstance(err, KernelRuntimeError) and back is None
    assert "dependency counter" in str(err) and "timeout 0.5 s" in str(err) and "reset" in str(err)


@pytest.mark.parametrize("tok, pos, match", [
    ([1, 1000, 2], [3, 4, 5], "sequence 1 has 1000, outside the vocabulary"),
    ([-1, 0, 2], [3, 4, 5], "sequence 0 has -1, outside the vocabulary"),
    ([1, 2, 2**32 + 3], [3, 4, 5], f"sequence 2 has {2**32 + 3}"),       # int32 truncation would make it 3
    ([1, 2, 3], [3, 64, 5], "sequence 1 has 64, outside the KV cache of 64"),
])
def test_simulator_refuses_what_the_kernel_refuses(tok, pos, match):
    w = random_weights(SPEC, torch.float32, seed=1)
    sim = Simulator(build_schedule(PLAN), w)
    cache = KVCache(SPEC, 3, 64, torch.float32, "cpu")
    before = cache.k.clone()
    with pytest.raises(InputError, match=match):
        sim.step(torch.tensor(tok), torch.tensor(pos), cache, random.Random(0))
    assert torch.equal(cache.k, before)
