"""CPU simulator of a schedule: runs one decode step task by task, in a random order that respects only
the declared counter waits, with the same per-task math as the kernel.

Intermediate buffers start as NaN each step, so a task that runs before the data it needs was written
poisons the logits: a missing dependency shows up as a mismatch with the reference engine.

Weight tiles are read through PackedWeights.matrix: a quantised model's rows are dequantised per task by the
same oracle the reference engine uses, so a simulated step of a packed model matches the reference's.

Sampling (Params::sampling) follows the kernel's LM head: a sampling sequence's tile maxima are taken over the
Gumbel-perturbed scores of monokernel/gumbel.py, the numpy model of the kernel's RNG, bitwise on the integers;
a top-k/top-p sequence's tiles keep candidates and the argmax task merges them, as schedule/candidates.py
follows the kernel's steps.
"""
from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .. import gumbel
from . import candidates
from ..errors import InputError
from ..models.weights import PackedWeights
from ..reference.model import apply_rope, rms_norm, rope_cos_sin
from ..models.spec import rope_inv_freq
from .abi import alloc_buffers
from .build import Schedule
from .step_check import bad_input, input_error_message
from .tasks import NO_COUNTER, Op, Task

if TYPE_CHECKING:   # an annotation only: schedule/ sits below runtime/ in the pipeline
    from ..runtime.kv_cache import KVCache


class Simulator:
    def __init__(self, schedule: Schedule, weights: PackedWeights):
        self.sched, self.w = schedule, weights
        self.plan = schedule.plan
        self.spec = weights.spec
        self.inv_freq = rope_inv_freq(self.spec)
        self.vt = self.plan.inputs.tokens_per_seq

    def _buffers(self):
        """The kernel's buffers (codegen.abi.PARAMS), poisoned, and the splits arrived per (layer, b, kv head)."""
        buf = alloc_buffers(self.plan, self.sched, self.w.dtype, "cpu", poison=True)
        buf.arrived = {}
        return buf

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rng: random.Random,
             tasks: list[Task] | None = None, sampling=None):
        """Runs every task once in a random dependency-respecting order; returns (next_tokens, logits). Inputs
        out of range raise InputError before any task runs, as the kernel refuses them (step_check.py).
        sampling: Params::sampling words (B, 8) (gumbel.sampling_words), or None: every sequence greedy."""
        bad = bad_input(tokens, positions, self.spec.vocab_size, self.plan.max_seq, self.vt)
        if bad:
            raise InputError(input_error_message(bad[0], 1, *bad[1:], self.spec.vocab_size, self.plan.max_seq))
        buf = self._buffers()
        buf.sampling = self._sampling(sampling, positions)
        tasks = list(self.sched.tasks if tasks is None else tasks)
        counters = [0] * self.sched.num_counters
        pending = tasks
        while pending:
            ready = [t for t in pending if t.wait_counter == NO_COUNTER or counters[t.wait_counter] >= t.wait_count]
            if not ready:
                raise RuntimeError("schedule deadlocks: no task is ready")
            t = rng.choice(ready)
            pending.remove(t)
            self._run(t, buf, tokens, positions, cache)
            if t.signal_counter != NO_COUNTER:
                counters[t.signal_counter] += 1
        self.host_draw = buf.host_draw.clone()    # the rows the host must draw (top-k/top-p past the candidates)
        return buf.out_tokens.long(), buf.logits

    # --- per-task math ---------------------------------------------------------------------
    def _run(self, t: Task, buf, tokens, positions, cache):
        s, w, L = self.spec, self.w, self.spec.num_layers
        rows = slice(t.row0, t.row0 + t.rows)
        if t.op == Op.EMBED:
            buf.x[0] = w.embedding(tokens)
        elif t.op == Op.QKV:
            h = rms_norm(buf.x[t.layer], w.attn_norm[t.layer], s.rms_norm_eps)
            bias = None if w.b_qkv is None else w.b_qkv[t.layer, rows]
            buf.qkv[t.layer][:, rows] = F.linear(h, w.matrix("w_qkv", t.layer, rows), bias)
        elif t.op == Op.ATTN:
            self._attention(t, buf, positions, cache)
        elif t.op == Op.OPROJ:
            att = buf.attn_out[t.layer]
            buf.x_mid[t.layer][:, rows] = buf.x[t.layer][:, rows] + F.linear(att, w.matrix("w_o", t.layer, rows))
        elif t.op == Op.GATEUP:
            h = rms_norm(buf.x_mid[t.layer], w.mlp_norm[t.layer], s.rms_norm_eps)
            gu = F.linear(h, w.matrix("w_gu", t.layer, rows))
            buf.act[t.layer][:, t.row0 // 2:(t.row0 + t.rows) // 2] = F.silu(gu[:, 0::2]) * gu[:, 1::2]
        elif t.op == Op.DOWN:
            buf.x[t.layer + 1][:, rows] = buf.x_mid[t.layer][:, rows] + F.linear(buf.act[t.layer], w.matrix("w_down", t.layer, rows))
        elif t.op == Op.LMHEAD:
            h = rms_norm(buf.x[L], w.final_norm, s.rms_norm_eps)
            logits = F.linear(h, w.matrix("lm_head", rows=rows)).float()
            buf.logits[:, rows] = logits
            m, i = logits.max(dim=1)   # first index of the maximum, as torch.argmax
            if buf.sampling is not None:
                on, inv_t, keys, top_k, top_p, filtered = buf.sampling
                plain = on & ~filtered
                rows_on = torch.from_numpy(plain)
                sc = gumbel.scores(logits[rows_on].numpy(), inv_t[plain], keys[plain], t.row0)
                m[rows_on], i[rows_on] = torch.from_numpy(sc.max(axis=1)), torch.from_numpy(sc.argmax(axis=1))
                for b in np.flatnonzero(filtered):   # their maxima stay unwritten: the argmax task merges these
                    row = logits[b].numpy()
                    buf.lm_cand[t.tile, b] = torch.from_numpy(candidates.tile_keep(row, t.row0).view(np.int64))
                    if not top_k[b] and top_p[b] < 1:
                        buf.lm_sum[t.tile, b] = float(candidates.tile_mass(row, inv_t[b]))
                keep = torch.from_numpy(~filtered)
                m, i = torch.where(keep, m, buf.lm_max[t.tile]), torch.where(keep, i + t.row0, buf.lm_idx[t.tile].long())
                buf.lm_max[t.tile], buf.lm_idx[t.tile] = m, i
            else:
                buf.lm_max[t.tile], buf.lm_idx[t.tile] = m, i + t.row0
        elif t.op == Op.PREFETCH:
            pass                                # a cache hint: no math
        elif t.op == Op.ARGMAX:
            best = buf.lm_max.argmax(dim=0)     # earliest tile wins ties, so the smallest index overall
            B, vt = self.plan.batch, self.vt
            buf.out_tokens[:B] = buf.lm_idx.gather(0, best[None])[0]
            buf.host_draw[:] = 0
            if buf.sampling is not None:
                self._merge(buf, t.wait_count)
            if vt > 1:    # each sequence's accepted draft tokens: rows 1.. whose input is the greedy token before
                same = (buf.out_tokens[:B].view(-1, vt)[:, :-1] == tokens.view(-1, vt)[:, 1:].to(torch.int32))
                buf.out_tokens[B:] = same.int().cumprod(dim=1).sum(dim=1)
        else:
            raise ValueError(t.op)

    def _sampling(self, words, positions):
        """None (all greedy), or (on (B,) bool, 1/T (B,) fp32, key (B,) uint64, top_k (B,), top_p (B,), filtered
        (B,) bool: a top-k/top-p row) per sequence, as the kernel derives them from Params::sampling and the
        input positions."""
        if words is None:
            return None
        words = np.asarray(words)
        if words.shape != (self.plan.batch, gumbel.SAMPLE_WORDS):
            raise InputError(f"sampling words of shape {tuple(words.shape)}: the batch needs "
                             f"({self.plan.batch}, {gumbel.SAMPLE_WORDS}) (gumbel.sampling_words)")
        on, inv_t, seeds = gumbel.unpack_words(words)
        if not on.any():
            return None
        top_k, top_p = gumbel.unpack_filters(words, self.spec.vocab_size)
        filtered = gumbel.filtered_rows(words)
        return on, inv_t, gumbel.sequence_keys(seeds, positions.cpu().numpy()), top_k, top_p, filtered

    def _merge(self, buf, num_tiles: int) -> None:
        """The argmax task's side of a top-k/top-p row: the tiles' candidates merged, cut and drawn from."""
        on, inv_t, keys, top_k, top_p, filtered = buf.sampling
        for b in np.flatnonzero(filtered):
            cand = buf.lm_cand[:num_tiles, b].numpy().view(np.uint64)
            sums = buf.lm_sum[:num_tiles, b].numpy() if not top_k[b] and top_p[b] < 1 else None
            token, flag = candidates.final_draw(cand, sums, inv_t[b], keys[b], int(top_k[b]), top_p[b],
                                                self.spec.vocab_size)
            buf.out_tokens[b], buf.host_draw[b] = token, int(flag)

    def _attention(self, t: Task, buf, positions, cache):
        s, w, c = self.spec, self.w, self.plan
        D, G = s.head_dim, s.group_size
        b, kvh = t.seq_and_kv_head(s.num_kv_heads)
        split, layer = t.split, t.layer
        seq = b // self.vt                     # a verify step's rows of one sequence share its cache
        pos = int(positions[b])
        base = pos - b % self.vt               # the sequence's first new position: the cache is read below it
        qkv = buf.qkv[layer, b]
        q = qkv[kvh * G * D:(kvh + 1) * G * D].view(1, G, 1, D)
        if s.qk_norm:
            q = rms_norm(q, w.q_norm[layer], s.rms_norm_eps)
        cos, sin = rope_cos_sin(self.inv_freq, torch.tensor([[pos]]), q.dtype)
        q = apply_rope(q, cos, sin).view(G, D)
        n_keys = pos + 1
        chunk = c.attn.kv_chunk(n_keys)
        lo, hi = split * chunk, min(n_keys, (split + 1) * chunk)
        if lo >= hi:          # an inactive split: the combine never reads it
            return
        old_hi = min(hi, base)
        new = [self._new_kv(buf, layer, b - (pos - key), kvh, key) for key in range(max(lo, base), hi)]
        keys = torch.cat([cache.k[layer, seq, kvh, lo:old_hi], *(k[None] for k, _ in new)])
        vals = torch.cat([cache.v[layer, seq, kvh, lo:old_hi], *(v[None] for _, v in new)])
        if lo <= pos < hi:       # the split that holds the row's own position appends its K/V to the cache
            cache.k[layer, seq, kvh, pos], cache.v[layer, seq, kvh, pos] = new[-1]
        scores = (q.float() @ keys.float().T) / math.sqrt(D)           # (G, n)
        m = scores.max(dim=1).values
        p = torch.exp(scores - m[:, None])
        buf.attn_o[layer, b, kvh, split] = p @ vals.float()
        buf.attn_m[layer, b, kvh, split] = m
        buf.attn_l[layer, b, kvh, split] = p.sum(dim=1)
        key = (layer, b, kvh)
        buf.arrived[key] = buf.arrived.get(key, 0) + 1
        active = -(-n_keys // chunk)
        if buf.arrived[key] == active:      # the last split to finish combines them all
            heads = slice(kvh * G * D, (kvh + 1) * G * D)
            buf.attn_out[layer, b, heads] = self._combine_one(
                buf.attn_m[layer, b, kvh, :active], buf.attn_l[layer, b, kvh, :active], buf.attn_o[layer, b, kvh, :active])

    def _new_kv(self, buf, layer: int, row: int, kvh: int, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's key (k-norm, RoPE at pos) and value of batch row `row`, from its QKV results: an attention
        task prepares every new key it attends to itself (a verify step's rows before its own too)."""
        s, w, D = self.spec, self.w, self.spec.head_dim
        qkv = buf.qkv[layer, row]
        k = qkv[s.q_size + kvh * D:s.q_size + (kvh + 1) * D].view(1, 1, 1, D)
        v = qkv[s.q_size + s.kv_size + kvh * D:s.q_size + s.kv_size + (kvh + 1) * D]
        if s.qk_norm:
            k = rms_norm(k, w.k_norm[layer], s.rms_norm_eps)
        cos, sin = rope_cos_sin(self.inv_freq, torch.tensor([[pos]]), k.dtype)
        return apply_rope(k, cos, sin).view(D), v

    def _combine_one(self, m, l, o) -> torch.Tensor:
        """Log-sum-exp combine of one kv head's active splits: m, l (S, G); o (S, G, D) -> (G * D,)"""
        mx = m.max(dim=0, keepdim=True).values
        scale = torch.exp(m - mx)
        out = (o * scale[..., None]).sum(dim=0) / (l * scale).sum(dim=0)[..., None]   # (G, D)
        return out.reshape(-1).to(self.w.dtype)
