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
// steps), through the ring; the rest are this step's own. Producer and consumers compute the same range.
// A decode step's row has one new key, at pos. A verify step's row t of a sequence (VT > 1) sits at
// pos = base + t, where base is the sequence's first new position: keys [base, pos] are the new keys of
// rows 0..t, which every task prepares from the QKV results itself (nnew of them from new_lo on), so the
// rows of a sequence never wait for each other, and the cache is read only below base.
struct KeyRange {
  int lo, hi, old_hi, pos, chunk, new_lo, nnew;
  KeyRange() = default;
  __device__ KeyRange(const Params& p, const Task& t) {
    pos = input_id(p.positions, TASK_SEQ(t), p.ids_i64 & 2);
    chunk = kv_chunk(pos + 1);
    lo = TASK_SPLIT(t) * chunk;
    hi = min(pos + 1, lo + chunk);
    const int base = pos - TASK_SEQ(t) % VT;
    old_hi = min(hi, base);
    new_lo = max(lo, base);
    nnew = VT == 1 ? 1 : max(0, hi - new_lo);   // a decode step prepares its new key in every split
  }
};

// The scratch, in floats from `sm`: the group's queries (G x D, q_slot order), the new keys and values (VT x D
// each), then NCW x G x (D + 2) per-warp partials (o, m, l), which also hold the new keys and values in the model
// dtype for the walk (schedule.layout.attn_floats sizes the scratch for both). The task's parts take `sm` and
// derive their pointers from these offsets rather than receive them: pointers passed in changed the compiled code.
constexpr int ATTN_Q = 0, ATTN_KN = ATTN_Q + G * D, ATTN_VN = ATTN_KN + VT * D, ATTN_PART = ATTN_VN + VT * D;
static_assert(VT >= 1 && VT <= MAX_VT && MAX_VT <= 8 && B % VT == 0,
              "a verify step takes 1..MAX_VT rows a sequence, MAX_VT <= 8: one 8-key tensor-core pass");

}  // namespace mk
