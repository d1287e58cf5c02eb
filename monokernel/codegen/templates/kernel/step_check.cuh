#pragma once
#include "config.cuh"

// The step's own check of what the host hands it. A token outside the vocabulary would read past the
// embedding, a position outside the cache would write K/V rows of the next (layer, sequence, head): the host
// checks neither on its fast path (that would drain the launch queue). A step that fails the check, or that
// follows a failed step, does nothing at all: no block writes or signals, so the host can report the error
// and, after a bad input, run on as if the step had never been launched.
namespace mk {

// Params::error words (schedule.abi.ERROR_WORDS): the code, then for a bad input the step's epoch, the
// sequence and its value (clamped to int).
__device__ __forceinline__ long long input_id_wide(const int* base, int i, bool wide) {
  return wide ? __ldg(reinterpret_cast<const long long*>(base) + i) : (long long)__ldg(base + i);
}

// Called by every thread of the block before anything else; false: the block must return at once.
__device__ __forceinline__ bool step_may_run(const Params& p) {
  int code = ERR_NONE;
  long long value = 0;
  if (threadIdx.x < B) {
    const long long tok = input_id_wide(p.tokens, threadIdx.x, p.ids_i64 & 1);
    const long long pos = input_id_wide(p.positions, threadIdx.x, p.ids_i64 & 2);
    if (tok < 0 || tok >= V) { code = ERR_BAD_TOKEN; value = tok; }
    else if (pos < 0 || pos >= MAX_SEQ) { code = ERR_BAD_POSITION; value = pos; }
    // a verify step's rows of a sequence are consecutive positions: its attention derives the sequence's
    // first new position from them and reads only the cache below it
    else if (VT > 1 && threadIdx.x % VT && pos != input_id_wide(p.positions, threadIdx.x - 1, p.ids_i64 & 2) + 1) {
      code = ERR_BAD_VERIFY_POSITION;
      value = pos;
    }
  }
  static_assert(B < THREADS, "a thread past the batch reads the earlier error");
  const bool earlier = threadIdx.x == B && *reinterpret_cast<volatile int*>(p.error) != ERR_NONE;
  // one block reports; every block sees the same inputs and stops by itself
  if (code != ERR_NONE && blockIdx.x == 0 && atomicCAS(p.error, ERR_NONE, code) == ERR_NONE) {
    p.error[1] = (int)p.epoch;
    p.error[2] = threadIdx.x;
    p.error[3] = value > 2147483647ll ? 2147483647 : value < -2147483647ll ? -2147483647 : (int)value;
  }
  return !__syncthreads_or(code != ERR_NONE || earlier);
}

}  // namespace mk
