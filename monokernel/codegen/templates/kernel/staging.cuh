#pragma once
#include "config.cuh"
#include "numerics.cuh"
#include "sync.cuh"

// Staging of a matrix-vector op's input vector (B x K, model dtype) into `in` (row stride `stride`):
// RMSNorm is recomputed by every block from the L2-resident residual rather than a grid-wide barrier.
// All consumer threads share the work with 16-byte loads: this runs once per (block, op, layer), on the
// critical path between a counter wait and the first use of the already-streamed weights.
namespace mk {

// Token ids and positions are read from the caller's own int32 or int64 tensors (Params.ids_i64), so a step
// needs no conversion kernel before it (two launches on the step's critical path: perf note 24).
__device__ __forceinline__ int input_id(const int* base, int i, bool wide) {
  return wide ? (int)__ldg(reinterpret_cast<const long long*>(base) + i) : __ldg(base + i);
}
__device__ __forceinline__ uint4 ld_act16(const T* p) { return __ldcg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ void unpack8(const uint4& u, float* f) {
  float2 a = pair_to_f2(u.x), b = pair_to_f2(u.y), c = pair_to_f2(u.z), d = pair_to_f2(u.w);
  f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y; f[4] = c.x; f[5] = c.y; f[6] = d.x; f[7] = d.y;
}

__device__ __forceinline__ uint4 pack8(const float* f) {
  uint4 u;
  T* t = reinterpret_cast<T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) t[i] = from_f(f[i]);
  return u;
}

// in[b][k] = w[k] * rnd(x[b][k] * rsqrt(mean(x[b]^2) + eps)), as the reference's RMSNorm, over the
// hidden size H. x is read from L2 once: the first pass keeps a raw copy in `in`, the second normalises it
// in place (each thread touches the same vectors in both passes). The norm weights do not depend on x:
// the first pass prefetches them into L1 (no registers held across the reduction), so the second pass
// does not start with an L2 round trip. `red` holds NCW x B floats of shared scratch.
__device__ void stage_rmsnorm(T* in, int stride, const T* x, const T* w, float* red) {
  constexpr int NVEC = H / 8;   // 16-byte vectors per row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float ss[B];
#pragma unroll
  for (int b = 0; b < B; ++b) ss[b] = 0.f;
  for (int v = threadIdx.x; v < NVEC; v += NCT) {
    asm volatile("prefetch.global.L1 [%0];" ::"l"(w + v * 8));
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const uint4 raw = ld_act16(x + (size_t)b * H + v * 8);
      float f[8];
      unpack8(raw, f);
#pragma unroll
      for (int i = 0; i < 8; ++i) ss[b] = fmaf(f[i], f[i], ss[b]);
      *reinterpret_cast<uint4*>(in + b * stride + v * 8) = raw;
    }
  }
#pragma unroll
  for (int b = 0; b < B; ++b) {
    const float s = warp_sum(ss[b]);
    if (lane == 0) red[warp * B + b] = s;
  }
  consumer_sync();
  float r[B];
#pragma unroll
  for (int b = 0; b < B; ++b) {
    float s = 0.f;
    for (int i = 0; i < NCW; ++i) s += red[i * B + b];
    r[b] = rsqrtf(s / H + EPS);
  }
  for (int v = threadIdx.x; v < NVEC; v += NCT) {
    float wf[8];
    unpack8(*reinterpret_cast<const uint4*>(w + v * 8), wf);
#pragma unroll
    for (int b = 0; b < B; ++b) {
      uint4* dst = reinterpret_cast<uint4*>(in + b * stride + v * 8);
      float f[8];
      unpack8(*dst, f);
#pragma unroll
      for (int i = 0; i < 8; ++i) f[i] = wf[i] * rnd(f[i] * r[b]);
      *dst = pack8(f);
    }
  }
}

__device__ void stage_copy(T* in, int stride, const T* src, int len) {
  const int nvec = len / 8;
  for (int i = threadIdx.x; i < B * nvec; i += NCT) {
    const int b = i / nvec, v = i % nvec;
    *reinterpret_cast<uint4*>(in + b * stride + v * 8) = ld_act16(src + (size_t)b * len + v * 8);
  }
}

// An op's input rows as the matrix-vector code reads them: staged in shared memory, staged in the block's
// global scratch (RMSNorm ops at large batch), or where other blocks wrote them (O and down projections
// at large batch; read through L2 after the counter wait, never through a possibly stale L1 line).
template <int OP>
__device__ __forceinline__ const T* input_rows(const Params& p, int l, const T* smem_in, const T* scratch_in) {
  if constexpr (Gemv<OP>::IN_SMEM) return smem_in;
  else if constexpr (OP == OP_OPROJ) return p.attn_out + (size_t)l * B * QSIZE;
  else if constexpr (OP == OP_DOWN) return p.act + (size_t)l * B * ISIZE;
  else return scratch_in;
}

template <int OP>
__device__ __forceinline__ uint4 ld_in(const T* ptr) {
  if constexpr (Gemv<OP>::IN_SMEM) return *reinterpret_cast<const uint4*>(ptr);
  else return __ldcg(reinterpret_cast<const uint4*>(ptr));
}

}  // namespace mk
