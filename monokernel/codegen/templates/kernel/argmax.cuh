#pragma once
#include "config.cuh"

namespace mk {

// The (max, first index) reduction of the LM head's argmax, greedy and sampled alike.
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

}  // namespace mk
