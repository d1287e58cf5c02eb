#pragma once
#include "config.cuh"
#include "numerics.cuh"

// What a matrix-vector op does with a result row, on either path (CUDA cores or tensor cores): its bias
// or residual, the reference's rounding points, and where it is stored.
namespace mk {

// The residual that row `row` of sequence b adds its result to (O and down projections; 0 for the others).
// It was written phases before the task's own wait, so a task loads its first epilogue's residuals at its
// start and their L2 round trip overlaps the weight stream instead of delaying the task's signal.
template <int OP>
__device__ __forceinline__ float residual(const Params& p, const Task& t, int row, int b) {
  const size_t i = ((size_t)t.layer * B + b) * H + row;
  if constexpr (OP == OP_OPROJ) return ld_act(p.x + i);
  else if constexpr (OP == OP_DOWN) return ld_act(p.x_mid + i);
  else return 0.f;
}

// Epilogue element i of the task's rows from f0 on (row i / B, sequence i % B): its residual, preloaded by
// this thread (`pre`) if it is its first element.
template <int OP>
__device__ __forceinline__ float residual_at(const Params& p, const Task& t, int f0, int i, float pre) {
  return f0 == 0 && i == (int)threadIdx.x ? pre : residual<OP>(p, t, t.arg0 + f0 + i / B, i % B);
}

template <int OP, int RR>
__device__ __forceinline__ float preload_residual(const Params& p, const Task& t) {
  return (int)threadIdx.x < min(RR, t.arg1) * B ? residual<OP>(p, t, t.arg0 + threadIdx.x / B, threadIdx.x % B) : 0.f;
}

// The per-row scales of an op with int8 weights (w = scale * code): its (L, ROWS) fp32 table.
template <int OP>
__device__ __forceinline__ const float* row_scales(const Params& p, int layer) {
  if constexpr (OP == OP_QKV) return p.w_qkv_scale + (size_t)layer * QKV;
  else if constexpr (OP == OP_OPROJ) return p.w_o_scale + (size_t)layer * H;
  else if constexpr (OP == OP_GATEUP) return p.w_gu_scale + (size_t)layer * 2 * ISIZE;
  else if constexpr (OP == OP_DOWN) return p.w_down_scale + (size_t)layer * H;
  else return nullptr;
}

// The scales of result row `r` (and r + 1, the up row of a gate/up pair) of the task's rows from f0 on, as
// the residuals: preloaded at the task's start for this thread's first epilogue element, so their round
// trip overlaps the weight stream; read where they lie for the later ones.
template <int OP, int RR>
__device__ __forceinline__ float2 preload_scales(const Params& p, const Task& t) {
  if constexpr (!Gemv<OP>::SCALED) return make_float2(1.f, 1.f);
  else {
    const float* s = row_scales<OP>(p, t.layer) + t.arg0;
    constexpr int PER = OP == OP_GATEUP ? 2 : 1;     // rows of one epilogue element
    const int r = (int)threadIdx.x / B * PER;
    if (r >= min(RR, t.arg1)) return make_float2(1.f, 1.f);
    return make_float2(__ldg(s + r), PER == 2 ? __ldg(s + r + 1) : 1.f);
  }
}

template <int OP>
__device__ __forceinline__ float2 scales_at(const Params& p, const Task& t, int f0, int r, int i, float2 pre) {
  if (f0 == 0 && i == (int)threadIdx.x) return pre;
  const float* s = row_scales<OP>(p, t.layer) + t.arg0 + f0 + r;
  return make_float2(__ldg(s), OP == OP_GATEUP ? __ldg(s + 1) : 1.f);
}

// Per-row results in the model dtype where the reference rounds, then the op's own epilogue.
template <int OP>
__device__ __forceinline__ void epilogue(const Params& p, const Task& t, int row, int b, float v, float resid) {
  const int l = t.layer;
  if constexpr (OP == OP_QKV) {
    if constexpr (HAS_QKV_BIAS) v += to_f(p.b_qkv[(size_t)l * QKV + row]);
    p.qkv[((size_t)l * B + b) * QKV + row] = from_f(v);
  } else if constexpr (OP == OP_OPROJ) {
    p.x_mid[((size_t)l * B + b) * H + row] = from_f(resid + rnd(v));
  } else if constexpr (OP == OP_DOWN) {
    p.x[((size_t)(l + 1) * B + b) * H + row] = from_f(resid + rnd(v));
  } else if constexpr (OP == OP_LMHEAD) {
    p.logits[(size_t)b * V + row] = rnd(v);
  }
}

// Gate/up rows alternate: act = rnd(rnd(silu(rnd(g))) * rnd(u)) for the pair starting at matrix row `row`.
__device__ __forceinline__ void gateup_epilogue(const Params& p, const Task& t, int row, int b, float g, float up) {
  p.act[((size_t)t.layer * B + b) * ISIZE + row / 2] = from_f(rnd(silu(rnd(g))) * rnd(up));
}

}  // namespace mk
