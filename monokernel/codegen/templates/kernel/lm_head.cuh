#pragma once
#include "config.cuh"
#include "sampling.cuh"
#include "staging.cuh"
#include "sync.cuh"

// The next token: each LM-head tile's (max, first index) per row, then one block's argmax over the tiles; a
// verify step then counts each sequence's accepted draft tokens. A row that samples (Params::sampling) takes
// both over its Gumbel-perturbed scores (sampling.cuh) instead of the raw logits; the logits buffer keeps the
// raw logits either way.
namespace mk {

struct ArgMax {
  int idx;
  float val;
};

// (max, index) over the warp's lanes, every lane ending with it; ties go to the smallest index, as
// torch.argmax. The index is the first parameter because the order of the parameters showed in the PTX.
__device__ __forceinline__ ArgMax warp_argmax(int idx, float best) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ob > best || (ob == best && oi < idx)) { best = ob; idx = oi; }
  }
  return {idx, best};
}

// Per-tile (max, first index) of the logits this block just wrote, one warp per sequence: of the raw logits
// (greedy, as before sampling existed) or of the scores logit / T + gumbel (the branch is warp-uniform).
__device__ void lm_tile_max(const Params& p, const Task& t) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b = warp; b < B; b += NCW) {
    const Sampler s = make_sampler(p.sampling, b, input_id(p.positions, b, p.ids_i64 & 2));
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

// Final argmax over the tiles' maxima; ties go to the smallest vocabulary index, as torch.argmax.
__device__ void final_argmax(const Params& p, int num_tiles) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b = warp; b < B; b += NCW) {
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = lane; i < num_tiles; i += 32) {
      const float v = __ldcg(p.lm_max + i * B + b);
      const int vi = __ldcg(p.lm_idx + i * B + b);
      if (v > best || (v == best && vi < idx)) { best = v; idx = vi; }
    }
    const int top = warp_argmax(idx, best).idx;
    if (lane == 0) p.out_tokens[b] = top;
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
