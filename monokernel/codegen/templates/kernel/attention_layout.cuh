#pragma once
#include "config.cuh"
#include "staging.cuh"

// What an attention task covers and where its data sits: its keys (the producer streams the same), and
// its shared-memory scratch.
namespace mk {

// Keys per KV split for a sequence with n keys (schedule.config.KernelConfig.kv_chunk computes the same):
// at least MIN_KV_CHUNK, so short contexts leave the later splits inactive.
__device__ __forceinline__ int kv_chunk(int n) { return max(MIN_KV_CHUNK, (n + KV_SPLITS - 1) / KV_SPLITS); }

// Keys of an attention task: [lo, hi) of [0, pos]; [lo, old_hi) come from the cache (written by earlier
// steps), through the ring; row pos is this step's own. Producer and consumers compute the same range.
struct KeyRange {
  int lo, hi, old_hi, pos, chunk;
  KeyRange() = default;
  __device__ KeyRange(const Params& p, const Task& t) {
    pos = input_id(p.positions, TASK_SEQ(t), p.ids_i64 & 2);
    chunk = kv_chunk(pos + 1);
    lo = TASK_SPLIT(t) * chunk;
    hi = min(pos + 1, lo + chunk);
    old_hi = min(hi, pos);
  }
};

// The scratch, in floats from `sm`: the group's queries (G x D, q_slot order), the new key and value (D
// each), then NCW x G x (D + 2) per-warp partials (o, m, l). The task's parts take `sm` and derive their
// pointers from these offsets rather than receive them: pointers passed in changed the compiled code.
constexpr int ATTN_Q = 0, ATTN_KN = ATTN_Q + G * D, ATTN_VN = ATTN_KN + D, ATTN_PART = ATTN_VN + D;

}  // namespace mk
