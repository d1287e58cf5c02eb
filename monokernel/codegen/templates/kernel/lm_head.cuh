#pragma once
#include "argmax.cuh"
#include "config.cuh"
#include "sampling.cuh"
#include "staging.cuh"
#include "sync.cuh"
#include "topk.cuh"

// The next token: each LM-head tile's (max, first index) per row, then one block's argmax over the tiles; a
// verify step then counts each sequence's accepted draft tokens. A row that samples (Params::sampling) takes
// both over its Gumbel-perturbed scores (sampling.cuh) instead of the raw logits, and a row that asks for
// top-k or top-p keeps and merges candidates instead (topk.cuh); the logits buffer keeps the raw logits.
namespace mk {

// Per-tile (max, first index) of the logits this block just wrote, one warp per sequence: of the raw logits
// (greedy, as before sampling existed) or of the scores logit / T + gumbel; a top-k/top-p row keeps its
// candidates instead (both branches warp-uniform). `sm`: the block's scratch, free after the GEMV.
__device__ void lm_tile_max(const Params& p, const Task& t, float* sm) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b = warp; b < B; b += NCW) {
    const Sampler s = make_sampler(p.sampling, b, input_id(p.positions, b, p.ids_i64 & 2));
    if (s.filter) {
      lm_tile_keep(p, t.arg0, t.arg1, t.tile, b, s.inv_t, reinterpret_cast<uint64_t*>(sm) + warp * KEEP_CAP);
      continue;
    }
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int r = lane; r < t.arg1; r += 32) {
      float v = p.logits[(size_t)b * V + t.arg0 + r];
      if (s.on) v = gumbel_score(s, v, t.arg0 + r);
      if (v > best) { best = v; idx = t.arg0 + r; }
    }
    const ArgMax m = warp_argmax(idx, best);
    if (lane == 0) {
      p.lm_max[t.tile * B + b] = m.val;
      p.lm_idx[t.tile * B + b] = m.idx;
    }
  }
}

// Final argmax over the tiles' maxima; ties go to the smallest vocabulary index, as torch.argmax. A top-k/top-p
// row merges its tiles' candidates instead; its flags are loaded first so their latency hides under the
// maxima's, whose result that row then drops.
__device__ void final_argmax(const Params& p, int num_tiles, float* sm) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b = warp; b < B; b += NCW) {
    const uint32_t flags = __ldg(p.sampling + SAMPLE_WORDS * b);
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = lane; i < num_tiles; i += 32) {
      const float v = __ldcg(p.lm_max + i * B + b);
      const int vi = __ldcg(p.lm_idx + i * B + b);
      if (v > best || (v == best && vi < idx)) { best = v; idx = vi; }
    }
    const int top = warp_argmax(idx, best).idx;
    if (flags & (FLAG_TOP_K | FLAG_TOP_P)) {
      final_filtered(p, num_tiles, b, reinterpret_cast<uint64_t*>(sm) + warp * KEEP_CAP);
    } else if (lane == 0) {
      p.out_tokens[b] = top;
      p.host_draw[b] = 0;
    }
  }
  if constexpr (VT > 1) {
    // row t's input token (t >= 1) is draft token t; it is accepted while every draft token before it was
    // and it equals the greedy token of row t - 1, so the host reads one count and the tokens
    consumer_sync();   // the rows' tokens, written by the other warps
    for (int s = threadIdx.x; s < SEQS; s += NCT) {
      int n = 0;
      while (n < VT - 1 && p.out_tokens[s * VT + n] == input_id(p.tokens, s * VT + n + 1, p.ids_i64 & 1)) ++n;
      p.out_tokens[B + s] = n;
    }
  }
}

}  // namespace mk
