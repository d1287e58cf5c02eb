#pragma once
#include "attention_layout.cuh"
#include "config.cuh"
#include "numerics.cuh"
#include "sync.cuh"

// How an attention task's per-warp partials become its output: combined within the block into the split's
// partial (or the output itself), and the election of the block that combines the splits.
namespace mk {

// The per-warp partials (attention_layout.cuh) per query head into the split's partial (o, m, l) at
// `out`, or, where `active` is 1, straight into the attention output `dst`.
__device__ __forceinline__ void combine_warps(const Params& p, float* sm, size_t out, int active, T* dst) {
  const float* part = sm + ATTN_PART;
  for (int i = threadIdx.x; i < G * D; i += NCT) {
    const int g = i / D, d = i % D;
    float mx = -INFINITY;
    for (int w = 0; w < NCW; ++w) mx = fmaxf(mx, part[(w * G + g) * (D + 2) + D]);
    float o = 0.f, den = 0.f;
    if (mx != -INFINITY) {
      for (int w = 0; w < NCW; ++w) {
        const float* pw = part + (w * G + g) * (D + 2);
        if (pw[D] == -INFINITY) continue;
        const float c = expf(pw[D] - mx);
        o = fmaf(c, pw[d], o);
        den = fmaf(c, pw[D + 1], den);
      }
    }
    if (active == 1) {
      dst[i] = from_f(o / den);
      continue;
    }
    p.attn_o[(out + g) * D + d] = o;
    if (d == 0) { p.attn_m[out + g] = mx; p.attn_l[out + g] = den; }
  }
}

// The last split of this (layer, b, kv head) to finish combines all of them (log-sum-exp) into the
// attention output, so the O projection stages a plain vector instead of every block re-reading
// every split's partials. The increment wraps the arrival count back to 0 for the next step.
// True in the block that is that last split (every consumer thread agrees).
__device__ __forceinline__ bool last_split(const Params& p, size_t head, int active, float* part) {
  volatile int* last = reinterpret_cast<volatile int*>(part);
  consumer_sync();                       // every partial store of this block precedes the release below
  if (threadIdx.x == 0)
    *last = atom_inc_acq_rel(p.attn_done + head, active - 1) == (uint32_t)(active - 1);
  consumer_sync();
  return *last;
}

}  // namespace mk
