#pragma once
#include "config.cuh"

// Temperature sampling in the LM head by the Gumbel-max trick: the token is argmax_i(logit_i / T + g_i) with
// g_i = -log(-log(u_i)), an exact draw from softmax(logits / T), so the tiles' (max, index) reduction and the
// final argmax stay as they are. u_i comes from a counter-based hash of (seed, position, vocabulary index):
// SplitMix64's output function, a few ALU ops a logit. monokernel/gumbel.py specifies every step and models
// it in numpy (bitwise on the integers); change both together.
namespace mk {

constexpr uint64_t SM_GOLDEN = 0x9E3779B97F4A7C15ull;   // gumbel.GOLDEN

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// One sequence's sampler for this step, from Params::sampling (gumbel.sampling_words: flags, 1/T as fp32
// bits, seed low, seed high, then top-k/top-p words that topk.cuh reads; written by the host between
// launches, so read through the read-only path).
struct Sampler {
  bool on;       // false: greedy, the raw logits compared exactly as before
  bool filter;   // top-k or top-p: the tiles keep candidates instead of a maximum (topk.cuh)
  float inv_t;
  uint64_t key;  // mix64(mix64(seed) + GOLDEN * (position + 1))
};

__device__ __forceinline__ Sampler make_sampler(const uint32_t* words, int b, int position) {
  const uint4 w = __ldg(reinterpret_cast<const uint4*>(words + SAMPLE_WORDS * b));   // the first 16 bytes
  const uint64_t seed = (uint64_t)w.z | (uint64_t)w.w << 32;
  return {(w.x & FLAG_SAMPLE) != 0, (w.x & (FLAG_TOP_K | FLAG_TOP_P)) != 0, __uint_as_float(w.y),
          mix64(mix64(seed) + SM_GOLDEN * (uint64_t)(position + 1))};
}

// The perturbed score of vocabulary index `idx`: u = odd 24-bit integer * 2^-24 (exact, in (0, 1)), then
// fp32 ops with no contraction into FMA (the numpy model rounds after each), and the precise logf.
__device__ __forceinline__ float gumbel_score(const Sampler& s, float logit, int idx) {
  const uint64_t h = mix64(s.key + SM_GOLDEN * (uint64_t)(idx + 1));
  const float u = __uint2float_rn((uint32_t)(h >> 40) | 1u) * 0x1p-24f;
  const float g = -logf(-logf(u));
  return __fadd_rn(__fmul_rn(logit, s.inv_t), g);
}

}  // namespace mk
