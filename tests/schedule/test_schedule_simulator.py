"""The schedule, run by the CPU simulator in random dependency-respecting orders, against the reference."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from monokernel.errors import UnsupportedModelError
from monokernel.models.formats import FORMATS

from monokernel.models.weights import random_weights
from monokernel.reference.model import ReferenceModel
from monokernel.schedule.build import build_schedule
from monokernel.schedule.inputs import GpuInfo
from monokernel.schedule.plan import plan_for
from monokernel.schedule.simulate import Simulator
from monokernel.schedule.tasks import NO_COUNTER, Op

from conftest import QUANT_CASES, TINY_SPECS, prefilled, quantised_weights

MAX_SEQ = 96


def _setup(name: str, batch: int, blocks: int = 7, seed: int = 0, **overrides):
    spec = TINY_SPECS[name]
    gen = torch.Generator().manual_seed(seed)
    w = random_weights(spec, torch.float32, seed=seed)
    ref = ReferenceModel(w)
    lengths = [int(x) for x in torch.randint(1, MAX_SEQ - 4, (batch,), generator=gen)]
    c_ref, c_sim = prefilled(ref, batch, MAX_SEQ, lengths, gen)
    sched = build_schedule(plan_for(spec, batch, MAX_SEQ, gpu=GpuInfo(sm_count=blocks), min_kv_chunk=4, **overrides))
    tok = torch.randint(0, spec.vocab_size, (batch,), generator=gen)
    return ref, Simulator(sched, w), c_ref, c_sim, tok, torch.tensor(lengths)


@pytest.mark.parametrize("name", list(TINY_SPECS))
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_matches_reference(name, batch):
    """The simulated schedule matches the reference."""
    ref, sim, c_ref, c_sim, tok, pos = _setup(name, batch)
    rng = random.Random(batch)
    for _ in range(3):     # several steps: the KV appends of one step feed the next
        out, logits = sim.step(tok, pos, c_sim, rng)
        expect = ref.forward(tok[:, None], pos, c_ref)[:, 0]
        torch.testing.assert_close(logits, expect, rtol=1e-4, atol=1e-4)
        assert torch.equal(out, expect.argmax(-1))
        tok, pos = out, pos + 1
    torch.testing.assert_close(c_sim.k, c_ref.k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("skip", [frozenset(), frozenset({Op.GATEUP}), frozenset({Op.GATEUP, Op.DOWN})],
                         ids=["none", "gateup", "mlp"])
def test_lookahead_helpers(name, batch, skip):
    """The simulated schedule with lookahead helpers matches the reference. Two of 9 blocks kept out of the chain
    (QKV, attention, O) to prefetch; their gate/up rows are fewer, or they sit out the gate/up or the whole MLP too."""
    ref, sim, c_ref, c_sim, tok, pos = _setup(name, batch, blocks=9, lookahead_blocks=2, l2_lookahead_kb=1,
                                              helpers_skip=skip)
    assert sim.plan.chain_blocks == 7 and any(t.op == Op.PREFETCH for t in sim.sched.tasks)
    assert not any(t.op in skip for b in (7, 8) for t in sim.sched.blocks[b])
    rng = random.Random(batch)
    for _ in range(2):
        out, logits = sim.step(tok, pos, c_sim, rng)
        expect = ref.forward(tok[:, None], pos, c_ref)[:, 0]
        torch.testing.assert_close(logits, expect, rtol=1e-4, atol=1e-4)
        tok, pos = out, pos + 1


@pytest.mark.parametrize("op", [Op.ATTN, Op.OPROJ, Op.GATEUP, Op.DOWN, Op.LMHEAD, Op.ARGMAX])
def test_a_missing_dependency_is_caught(op):
    """Dropping the waits of one op lets it run before its inputs exist in some orders; the poisoned
    buffers then reach the logits. Across a few random orders at least one must fail."""
    ref, sim, c_ref, _, tok, pos = _setup("llama", 3)
    tasks = [dataclasses.replace(t, wait_counter=NO_COUNTER, wait_count=0) if t.op == op else t
             for t in sim.sched.tasks]
    failures = 0
    for seed in range(6):
        _, _, c_r, c_s, _, _ = _setup("llama", 3)
        out, logits = sim.step(tok, pos, c_s, random.Random(seed), tasks=tasks)
        good = ref.forward(tok[:, None], pos, c_r)[:, 0]
        failures += not (torch.isfinite(logits).all() and torch.allclose(logits, good, rtol=1e-4, atol=1e-4)
                         and torch.equal(out, good.argmax(-1)))
    assert failures > 0


def test_bytes_per_phase():
    """Every block streams about the same bytes per phase."""
    from monokernel.models.presets import preset
    for name in ("llama-3.2-1b", "llama-3.1-8b"):
        sched = build_schedule(plan_for(preset(name), 1, 4096))
        per_phase = sched.bytes_per_block()
        busy = per_phase.sum(0) > 0
        ratio = per_phase[:, busy].max(0) / per_phase[:, busy].mean(0)
        assert ratio.max() < 1.10, (name, ratio.max())


@pytest.mark.parametrize("overrides", [{}, {"lookahead_blocks": 2, "l2_lookahead_kb": 1}], ids=["plain", "lookahead"])
def test_deadlock_free_order(overrides):
    """A deadlock-free order on each block. Every block's queue is in global phase order and waits only on earlier
    phases."""
    sched = _setup("qwen2", 3, blocks=9, **overrides)[1].sched
    order = {t: i for i, t in enumerate(sched.tasks)}
    signals = {}
    for t in sched.tasks:
        signals.setdefault(t.signal_counter, []).append(order[t])
    for q in sched.blocks:
        idx = [order[t] for t in q]
        assert idx == sorted(idx)
        for t in q:
            if t.wait_counter != NO_COUNTER:
                assert len(signals[t.wait_counter]) == t.wait_count
                assert max(signals[t.wait_counter]) < order[t]


@pytest.mark.parametrize("fmt", list(QUANT_CASES))
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_quantised(fmt, batch):
    """The simulated schedule of a quantised tiny model (every weight format, each on one architecture) matches
    the reference engine on the same packed weights: each task dequantises its own row tile, the reference whole
    matrices. int8-g32 also packs the tied embedding / LM head, as the default GGUF does."""
    spec = TINY_SPECS[QUANT_CASES[fmt]]
    plan = plan_for(spec, batch, MAX_SEQ, gpu=GpuInfo(sm_count=7), min_kv_chunk=4)
    # one step: the KV appends across steps are the dense test's (test_matches_reference); the weights are this one's
    _packed_matches_reference(quantised_weights(spec, fmt, head=fmt == "int8-g32"), plan, batch, steps=1, argmax=True)


def _packed_matches_reference(w, plan, batch: int, steps: int, argmax: bool = False) -> None:
    """The plan's schedule, simulated on packed weights `w`, against the reference on the same weights over
    `steps` decode steps from random prompts (the logits, and where `argmax`, the greedy tokens)."""
    spec = w.spec
    gen = torch.Generator().manual_seed(batch)
    ref = ReferenceModel(w)
    lengths = [int(x) for x in torch.randint(1, MAX_SEQ - 4, (batch,), generator=gen)]
    c_ref, c_sim = prefilled(ref, batch, MAX_SEQ, lengths, gen)
    sim = Simulator(build_schedule(plan), w)
    tok, pos = torch.randint(0, spec.vocab_size, (batch,), generator=gen), torch.tensor(lengths)
    rng = random.Random(batch)
    for _ in range(steps):
        out, logits = sim.step(tok, pos, c_sim, rng)
        expect = ref.forward(tok[:, None], pos, c_ref)[:, 0]
        torch.testing.assert_close(logits, expect, rtol=1e-4, atol=1e-4)
        if argmax:
            assert torch.equal(out, expect.argmax(-1))
        tok, pos = out, pos + 1


@pytest.mark.parametrize("mma", [None, False], ids=["rules", "cuda-cores"])
@pytest.mark.parametrize("name", list(TINY_SPECS))
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_int8_plan(name, batch, mma):
    """The plan the megakernel builds for int8 weights (1-byte rows: other chunks, tiles and task costs; the
    tensor-core path from batch 3 where every K is a multiple of 32, else CUDA cores) simulates to the
    reference on the same packed weights."""
    spec = TINY_SPECS[name]
    plan = plan_for(spec, batch, MAX_SEQ, "int8", "bf16", gpu=GpuInfo(sm_count=7), min_kv_chunk=4, gemv_mma=mma)
    assert plan.tuning.gemv_mma == (mma is None and spec.intermediate_size % 32 == 0 and batch > 2)
    assert plan.gemv[Op.QKV].code_bits == 8 and plan.gemv[Op.LMHEAD].code_bits == 16
    assert plan.gemv[Op.QKV].scaled and not plan.gemv[Op.LMHEAD].scaled
    _packed_matches_reference(quantised_weights(spec, "int8", seed=batch), plan, batch, steps=2)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_fp8_plan(name, batch):
    """fp8 e4m3 with a scale a row: the tensor-core path at every batch (it has no CUDA-core one: refused there),
    simulating to the reference on the same packed weights."""
    spec = TINY_SPECS[name]
    with pytest.raises(UnsupportedModelError, match="fp8 weights run on the tensor-core path only"):
        plan_for(spec, batch, MAX_SEQ, "fp8", "bf16", gemv_mma=False)
    plan = plan_for(spec, batch, MAX_SEQ, "fp8", "bf16", gpu=GpuInfo(sm_count=7), min_kv_chunk=4)
    g = plan.gemv[Op.QKV]
    assert plan.tuning.gemv_mma and g.fp8 and g.scaled and g.code_bits == 8 and not plan.gemv[Op.LMHEAD].fp8
    _packed_matches_reference(quantised_weights(spec, "fp8", seed=batch), plan, batch, steps=2)


def test_fp8_refused_where_k_is_not_whole_warp_steps():
    with pytest.raises(UnsupportedModelError, match="fp8 weights need every layer matrix's K to be a multiple of 32"):
        plan_for(TINY_SPECS["llama"], 1, MAX_SEQ, "fp8", "bf16")


@pytest.mark.parametrize("mma", [None, False], ids=["rules", "cuda-cores"])
@pytest.mark.parametrize("name, fmt", [("qwen3", "int4-g128"), ("qwen2", "int4-g64"), ("mistral", "int4-g32-bf16"),
                                       ("qwen2", "int4-g128-zp"), ("mistral", "int4-g32-zp-bf16")])
@pytest.mark.parametrize("batch", [1, 3])
def test_int4_plan(name, fmt, batch, mma):
    """The plan for symmetric int4 weights (half-byte codes and their group scales: a slot's after its codes on
    CUDA cores, each segment's after its codes on tensor cores; other chunks, tiles and task costs) simulates
    to the reference on the same packed weights."""
    spec = TINY_SPECS[name]
    zp = FORMATS[fmt].zero == "int"
    if zp and mma is False:
        with pytest.raises(UnsupportedModelError, match="zero point a group.*tensor-core path only"):
            plan_for(spec, batch, MAX_SEQ, fmt, "bf16", gemv_mma=False)
        return
    plan = plan_for(spec, batch, MAX_SEQ, fmt, "bf16", gpu=GpuInfo(sm_count=7), min_kv_chunk=4, gemv_mma=mma)
    g = plan.gemv[Op.QKV]
    assert g.code_bits == 4 and plan.tuning.gemv_mma == (mma is None) and g.zero_points == zp
    if mma is None:     # one segment: the codes, the row's scales padded to 16 bytes, its zero points likewise
        groups = spec.hidden_size // FORMATS[fmt].group_size
        zeros = -(-(-(-groups // 2)) // 16) * 16 if zp else 0
        assert g.code_row_bytes == spec.hidden_size // 2 + -(-groups * 2 // 16) * 16 + zeros
        assert g.scale_row_bytes == 0
    else:
        assert g.code_row_bytes == spec.hidden_size // 2 and g.scale_row_bytes % 16 == 0
    _packed_matches_reference(quantised_weights(spec, fmt, seed=batch), plan, batch, steps=2)


GGUF_CASES = [("int8-g32", "qwen3"), ("int8-g32", "mistral"), ("int8-g32", "llama-704"),
              ("int4-g32-min", "mistral"), ("int4-g32-min", "qwen2"), ("int4-g32-min", "llama-704")]
# tiny llama (llama3 rope scaling, tied embeddings) with whole groups of 32 along the down projection's K
GGUF_SPECS = {**TINY_SPECS, "llama-704": TINY_SPECS["llama"].with_(name="tiny-llama-704", intermediate_size=704)}


@pytest.mark.parametrize("fmt,name", GGUF_CASES, ids=[f"{f}-{n}" for f, n in GGUF_CASES])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_gguf_plan(fmt, name, batch):
    """GGUF Q8_0 (int8-g32) and Q4_1 (int4-g32-min) natively: tensor cores at every batch (no CUDA-core path:
    refused), each stored segment its codes, its group scales and (Q4_1) its mins, each padded to 16 bytes; the
    plan's schedule simulates to the reference on the same packed weights."""
    spec = GGUF_SPECS[name]
    f = FORMATS[fmt]
    with pytest.raises(UnsupportedModelError, match=rf"{fmt} weights \(.*GGUF.*\) run on the tensor-core path only"):
        plan_for(spec, batch, MAX_SEQ, fmt, "bf16", gemv_mma=False)
    plan = plan_for(spec, batch, MAX_SEQ, fmt, "bf16", gpu=GpuInfo(sm_count=7), min_kv_chunk=4)
    g = plan.gemv[Op.QKV]
    assert plan.tuning.gemv_mma and g.group == 32 and g.code_bits == f.bits and g.mins == (f.zero == "min")
    assert not g.scaled and not g.zero_points and not plan.gemv[Op.LMHEAD].mins
    pad = -(-(spec.hidden_size // 32) * 2 // 16) * 16
    assert g.kseg == spec.hidden_size and g.code_row_bytes == spec.hidden_size * f.bits // 8 + pad * (1 + g.mins)
    _packed_matches_reference(quantised_weights(spec, fmt, seed=batch), plan, batch, steps=2)


def test_gguf_k_not_whole_groups_refused():
    """A Q4_1 / Q8_0 model whose K is not whole groups of 32 is refused by name before any kernel is built."""
    spec = TINY_SPECS["llama"]          # intermediate_size 688 = 21.5 groups
    for fmt in ("int4-g32-min", "int8-g32"):
        with pytest.raises(UnsupportedModelError, match=rf"{fmt} groups of 32 must divide .*688"):
            plan_for(spec, 1, MAX_SEQ, fmt, "bf16")


LOOP_KNOBS = [{"mma_code_unroll": 4}, {"mma_scale_swizzle": True}, {"lmhead_mma": False}]


@pytest.mark.parametrize("knobs", LOOP_KNOBS, ids=lambda k: ",".join(f"{a}={int(v)}" for a, v in k.items()))
@pytest.mark.parametrize("fmt,name", [("int4-g32-min", "qwen2"), ("int4-g128", "qwen3"), ("int8-g32", "mistral")])
@pytest.mark.parametrize("batch", [1, 3])
def test_quantised_loop_knobs(knobs, fmt, name, batch):
    """The quantised tensor-core loop's knobs (perf note 35) leave a plan whose schedule simulates to the reference
    on the same packed weights; lmhead_mma=0 cuts the LM head's tiles into CUDA-core chunks of whole rows."""
    spec = GGUF_SPECS[name]
    plan = plan_for(spec, batch, MAX_SEQ, fmt, "bf16", gpu=GpuInfo(sm_count=7), min_kv_chunk=4,
                    **{"lmhead_mma": True, **knobs})
    assert plan.gemv[Op.LMHEAD].on_tensor_cores == knobs.get("lmhead_mma", True)
    _packed_matches_reference(quantised_weights(spec, fmt, seed=batch), plan, batch, steps=2, argmax=True)


# seg_prefetch (perf note 40): with the rules' inputs (the tiny down projections' inputs fit shared memory: the
# knob then changes nothing), as at 8B batch 8 (the RMSNorm ops' inputs in shared memory, the down projection's
# staged) and with every op staged, over K segments of 160 with tails, where it double-buffers the segments
SEG_PREFETCH = ("rules", "down-staged", "all-staged")


@pytest.mark.parametrize("inputs", SEG_PREFETCH)
@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral"])
@pytest.mark.parametrize("batch", [3, 8])
def test_seg_prefetch(inputs, name, batch):
    """seg_prefetch=1's plans (two staged segments in the input area) schedule and simulate to the reference."""
    spec = TINY_SPECS[name]
    knobs = {} if inputs == "rules" else dict(mma_kseg_max=160, input_smem_budget=batch * spec.hidden_size * 2
                                              if inputs == "down-staged" else 0)
    plan = plan_for(spec, batch, MAX_SEQ, gpu=GpuInfo(sm_count=7), min_kv_chunk=4, seg_prefetch=1, **knobs)
    staged = [op for op, g in plan.gemv.items() if g.seg_staged]
    assert bool(staged) == (inputs != "rules") and plan.tuning.gemv_mma
    if staged:
        assert Op.DOWN in staged and plan.smem.input_len >= 2 * 192
        assert (Op.QKV in staged) == (inputs == "all-staged")
    w = random_weights(spec, torch.float32, seed=batch)
    _packed_matches_reference(w, plan, batch, steps=2, argmax=True)
