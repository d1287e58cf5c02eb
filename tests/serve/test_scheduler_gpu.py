"""The request-level engine on the megakernel (skipped without CUDA): continuous batching over the B slots of
one compiled batch, pad rows in free and prefilling slots, prefix reuse, must give the reference scheduler's
greedy tokens. Run by the device issue: `python -m pytest -q -m gpu tests/serve/test_scheduler_gpu.py`."""
from __future__ import annotations

import pytest
import torch

from monokernel.models.weights import random_weights
from monokernel.runtime.engine import Engine
from monokernel.runtime.sampling import SamplingParams
from monokernel.runtime.scheduler import Scheduler

from conftest import TINY_SPECS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SPEC = TINY_SPECS["llama"]   # tied N(0, 1) embeddings: well-separated logits, bf16 cannot flip a greedy token
PROMPTS = [[5, 9, 300, 2, 77], [1], [int(x) for x in torch.arange(3, 400, 13)], [44, 45, 46], [7] * 40]
LENGTHS = [20, 6, 14, 9, 11]


@pytest.fixture(scope="module")
def weights():
    return random_weights(SPEC, torch.bfloat16, "cuda", seed=11)


def staggered(engine: Engine, batch: int) -> tuple[list[list[int]], str]:
    """Requests arriving over several steps into `batch` slots; their tokens in arrival order."""
    sched = Scheduler(engine, batch, prefill_chunk_size=16)
    ids, out = [], {}
    for step in range(200):
        if step % 3 == 0 and len(ids) < len(PROMPTS):
            i = len(ids)
            ids.append(sched.add_request(PROMPTS[i], SamplingParams(max_new_tokens=LENGTHS[i])))
        for ev in sched.step():
            assert ev.error is None
            out.setdefault(ev.request_id, []).append(ev.token_id)
        if len(ids) == len(PROMPTS) and not sched.has_work:
            break
    return [out[i] for i in ids], sched.kind


def test_continuous_batching_mega(weights):
    mega = Engine(weights, engine="mega", max_seq=256)
    ref = Engine(weights, engine="reference", max_seq=256)
    got, kind = staggered(mega, 3)
    want, _ = staggered(ref, 3)
    assert kind == "mega" and got == want
    assert [len(t) for t in got] == LENGTHS


def test_prefix_reuse_mega(weights):
    mega = Engine(weights, engine="mega", max_seq=256)
    sched = Scheduler(mega, 2)
    [first] = sched.generate([PROMPTS[2]], SamplingParams(max_new_tokens=8))
    follow = PROMPTS[2] + first.token_ids + [11, 12]
    before = sched.stats.prefill_tokens
    [second] = sched.generate([follow], SamplingParams(max_new_tokens=6))
    assert sched.stats.prefill_tokens - before == 3
    fresh = Scheduler(Engine(weights, engine="reference", max_seq=256), 2).generate([follow],
                                                                                    SamplingParams(max_new_tokens=6))
    assert second.token_ids == fresh[0].token_ids
