"""The derivation rules of the tuning: each resolves one knob left `None`, in the order of RULES (a later
rule may read what an earlier one decided), and says why, citing its perf note."""
from __future__ import annotations

from .inputs import KernelInputs
from .abi import op_matrix_shape
from .layout import MMA_ROWS, Layout, chain_blocks, is_fp8, keys_per_pass, mma_slot_bytes
from .tasks import Op
from .tuning import Tuning

LOOKAHEAD_KB = 128    # perf note 23 (160 KB outran the helpers' issue rate)


def rule_gemv_mma(i: KernelInputs, t: Tuning) -> bool:
    # bf16 from batch 3: at batch 8 the CUDA-core path is compute-bound, 4x too slow. Quantised weights at
    # every batch: on CUDA cores their unpacking and FMAs set the pace at batch 1 already (perf note 29); on
    # tensor cores the codes only turn into bf16 pairs (perf note 30). int8 needs K % 32 (8 codes a lane). fp8
    # has no CUDA-core path: tensor cores at every batch.
    # int8 at batch 1-2 stays on CUDA cores: 2.65 against 3.58 ms at 8B batch 1 (its byte permute already
    # cheap, the tensor-core loop issue-bound on unpacking and operand traffic: perf note 30)
    # int8 with a scale a group (GGUF Q8_0) has no CUDA-core path either: its group scales fold into the
    # tensor-core accumulators once a group (perf note 31).
    if i.weights.quantised:
        return mma_quantised_fits(i) and (i.weights.bits == 4 or bool(mma_only(i)) or i.batch > 2)
    return i.batch > 2


def mma_only(i: KernelInputs) -> str | None:
    """Why these weights run on the tensor-core path only (None: the CUDA-core path reads them too)."""
    f = i.weights
    if is_fp8(i):
        return "fp8 weights"
    if f.zero == "int":
        return f"{f.name} weights (a zero point a group)"
    if f.zero == "min":
        return f"{f.name} weights (a float min a group, GGUF Q4_1)"
    if f.quantised and f.bits == 8 and f.group_size:
        return f"{f.name} weights (int8 with a scale a group, GGUF Q8_0)"
    return None


def mma_quantised_fits(i: KernelInputs) -> bool:
    """Every layer matrix's K is whole warp steps of the tensor-core path (int4: always, K % 32 is checked)."""
    return all(op_matrix_shape(i.spec, op)[1] % 32 == 0 for op in (Op.QKV, Op.OPROJ, Op.GATEUP, Op.DOWN))


def rule_lmhead_mma(i: KernelInputs, t: Tuning) -> bool:
    # with the other ops: a tensor-core kernel streams the LM head in its 8-row chunks as well, except where the
    # H200 measured the bf16 LM head faster on CUDA cores in a quantised kernel (perf note 37, 8B, two rounds
    # each): batch 1 but fp8 (int4-g128 -2.2 %, zero-point int4 -2.1 %, int8-g32 -1.0 %; fp8 +0.9 %) and
    # batch 2 of the 8-bit formats (int8-g32 -1.3 %, fp8 -1.1 %; int4 +0.1 to +0.9 %); at batch 8 +3.5-6.4 %
    if not t.gemv_mma:
        return False
    if i.weights.quantised and (i.batch == 1 and not is_fp8(i) or i.batch == 2 and i.weights.bits == 8):
        return False
    return True


def rule_consumer_warps(i: KernelInputs, t: Tuning) -> int:
    # 8 measured 3 % faster than 7 at batch 8 and 16 of the 8B preset (1B: 3 % at batch 8, 7 % slower at
    # 16), although 8 consumers and the producer cap a thread at 168 registers (registers.py); where that
    # spills, codegen/fit.py builds the kernel again with 7 (perf note 28). The tensor-core path at batch 1-2
    # (every quantised kernel) spills 96-132 B with 8 on the 8B preset, bf16 and int4 alike: 7 at once.
    return 7 if t.gemv_mma and i.batch <= 2 else 8


def rule_slot_bytes(i: KernelInputs, t: Tuning) -> int:
    if t.gemv_mma:
        return mma_slot_bytes(i, t)
    # a slot holds one full row of the widest matrix (two for gate/up pairs); 32 KiB otherwise keeps 6 or so
    # slots in flight, enough bytes to cover HBM latency on one SM
    need = max(i.row_bytes(Op.DOWN), 2 * i.row_bytes(Op.GATEUP), i.row_bytes(Op.OPROJ))
    return max(32 * 1024, -(-need // 1024) * 1024)


def rule_seg_prefetch(i: KernelInputs, t: Tuning) -> bool:
    # on where it costs nothing: a 16-bit kernel with a segment-staged op whose input area already holds two
    # segments, so the ring keeps its slots (8B at batch 4-12, where down alone is staged). The H200 measured 8B
    # b8 -1.4 and -1.5 % (two rounds, perf note 40); where the second segment would take ring slots (1B and 3B
    # at b8, 8B at b16) it stays off, unmeasured
    if i.weights.quantised:
        return False
    off, on = Layout(i, t.replace(seg_prefetch=False)), Layout(i, t.replace(seg_prefetch=True))
    # (only tensor-core ops stage; an unchanged input area leaves the whole layout, its ring too, unchanged)
    return any(g.seg_staged for g in off.gemv.values()) and on.input_len == off.input_len


def helpers_fit(i: KernelInputs, t: Tuning) -> bool:
    return 1 <= t.lookahead_blocks <= i.gpu.sm_count // 4


def rule_l2_lookahead_kb(i: KernelInputs, t: Tuning) -> int:
    # on where a chain block's QKV and O tiles fit its ring together (the ring is then full and HBM idle
    # through the chain: the 1B preset) and leave gate/up rows to prefetch; measured slower at 8B (note 23)
    if not helpers_fit(i, t):
        return 0
    lay = Layout(i, t.replace(l2_lookahead_kb=LOOKAHEAD_KB))
    on = lay.chain_fits_ring() and lay.lookahead_skip_rows < lay.gemv[Op.GATEUP].tile_rows
    return LOOKAHEAD_KB if on else 0


def rule_next_step_lookahead(i: KernelInputs, t: Tuning) -> bool:
    return i.batch > 2          # measured faster from batch 3, neutral at batch 1


def rule_attn_prologue_early(i: KernelInputs, t: Tuning) -> bool:
    return i.batch <= 2         # perf note 24; at batch 8 the registers it holds spill on the 3B preset


def rule_kv_splits(i: KernelInputs, t: Tuning) -> int:
    # no more attention tasks than blocks: one block running two would hold up the whole phase; and none where
    # one task per (sequence, kv head) already keeps a third of the SMs streaming KV rows: those blocks then
    # draw the copy bandwidth between them, and a split would only add the combine's round trips (perf note 20)
    chain = chain_blocks(i, t)
    per = i.batch * i.spec.num_kv_heads
    splits = 1 if 3 * per >= chain else chain // per
    return max(1, min(64, splits))


def rule_attn_key_batch(i: KernelInputs, t: Tuning) -> int:
    # 2 where 8k-32k contexts make tasks of 512-2048 keys; from batch 3 tasks are short and 1 measured faster
    return 2 if i.batch <= 2 else 1


def rule_attn_mma(i: KernelInputs, t: Tuning) -> bool:
    return i.spec.group_size <= MMA_ROWS     # faster at every batch and context measured (perf note 20)


def rule_min_kv_chunk(i: KernelInputs, t: Tuning) -> int:
    return keys_per_pass(i, t)   # a shorter split idles warps


RULES = (("gemv_mma", rule_gemv_mma), ("lmhead_mma", rule_lmhead_mma), ("consumer_warps", rule_consumer_warps), ("slot_bytes", rule_slot_bytes),
         ("seg_prefetch", rule_seg_prefetch), ("l2_lookahead_kb", rule_l2_lookahead_kb),
         ("next_step_lookahead", rule_next_step_lookahead), ("attn_prologue_early", rule_attn_prologue_early),
         ("kv_splits", rule_kv_splits), ("attn_key_batch", rule_attn_key_batch), ("attn_mma", rule_attn_mma),
         ("min_kv_chunk", rule_min_kv_chunk))


def resolve(i: KernelInputs, t: Tuning) -> Tuning:
    """The tuning with every None replaced by its rule's value, in RULES order."""
    for name, rule in RULES:
        if getattr(t, name) is None:
            t = t.replace(**{name: rule(i, t)})
    missing = t.unresolved()
    assert not missing, f"knobs without a rule: {missing}"
    return t
