#pragma once
#include "config.cuh"
#include "gemv_epilogue.cuh"
#include "numerics.cuh"
#include "ring.cuh"
#include "staging.cuh"
#include "sync.cuh"

// Consumer side of a matrix-vector task: rows [t.arg0, t.arg0 + t.arg1) of one weight matrix arrive
// through the ring, CR rows per slot, in the order the producer issued them. Each warp takes one
// (row, K-segment) unit at a time; WPR warps share a row when a slot holds fewer rows than warps.
namespace mk {

template <int OP>
__device__ bool gemv_task(const Params& p, const Task& t, const T* in, RingReader& rd, float* res) {
  constexpr int K = Gemv<OP>::K, CR = Gemv<OP>::CR, WPR = Gemv<OP>::WPR, FC = Gemv<OP>::FC;
  constexpr int EPV = 16 / Gemv<OP>::WB;           // weights per 16-byte vector: 8 of 16 bits, 16 int8 codes
  constexpr int KV8 = K / EPV;                     // 16-byte vectors per row
  constexpr int SEG = (KV8 + WPR - 1) / WPR;       // vectors per K-segment
  constexpr int RR = CR * FC;                      // rows whose results one epilogue writes
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float pre = preload_residual<OP, RR>(p, t);
  const float2 pre_scale = preload_scales<OP, RR>(p, t);
  for (int f0 = 0; f0 < t.arg1; f0 += RR) {
    const int fr = min(RR, t.arg1 - f0);
    // No block barrier per chunk: each warp takes its units of a slot as soon as the slot is full and
    // releases it after its own reads, so warps drift apart by up to a slot and the ring drains at the
    // speed of the shared-memory reads, not of barrier round trips.
    for (int r0 = 0; r0 < fr; r0 += CR) {
      const int nr = min(CR, fr - r0);
      const uint4* w = reinterpret_cast<const uint4*>(rd.wait());
      for (int u = warp; u < nr * WPR; u += NCW) {
        const int row = u / WPR, seg = u % WPR;
        float acc[B];
#pragma unroll
        for (int b = 0; b < B; ++b) acc[b] = 0.f;
        const uint4* wr = w + (size_t)row * KV8;
        const int end = min(KV8, (seg + 1) * SEG);
#pragma unroll (B <= 2 ? 4 : 1)   // more loads in flight where registers allow
        for (int v = seg * SEG + lane; v < end; v += 32) {
          const uint4 wv = wr[v];
#pragma unroll
          for (int b = 0; b < B; ++b) {
            const T* x = in + (size_t)b * Gemv<OP>::IN_STRIDE + v * EPV;
            if constexpr (Gemv<OP>::WB == 1) acc[b] = dot16_i8(wv, ld_in<OP>(x), ld_in<OP>(x + 8), acc[b]);
            else acc[b] = dot8(wv, ld_in<OP>(x), acc[b]);
          }
        }
#pragma unroll
        for (int b = 0; b < B; ++b) {
          const float s = warp_sum(acc[b]);
          if (lane == 0) res[(seg * RR + r0 + row) * B + b] = s;
        }
      }
      rd.release();                  // every consumer thread releases the slot after its own last read
    }
    if (!rd.all_ok()) return false;   // also: every warp's results are in `res`
    if constexpr (OP == OP_GATEUP) {
      // rows alternate gate, up: act = rnd(rnd(silu(rnd(g))) * rnd(u))
      for (int i = threadIdx.x; i < (fr / 2) * B; i += NCT) {
        const int pr = i / B, b = i % B;
        float g = 0.f, up = 0.f;
#pragma unroll
        for (int s = 0; s < WPR; ++s) {
          g += res[(s * RR + 2 * pr) * B + b];
          up += res[(s * RR + 2 * pr + 1) * B + b];
        }
        if constexpr (Gemv<OP>::SCALED) {
          const float2 sc = scales_at<OP>(p, t, f0, 2 * pr, i, pre_scale);
          g *= sc.x;
          up *= sc.y;
        }
        gateup_epilogue(p, t, t.arg0 + f0 + 2 * pr, b, g, up);
      }
    } else {
      for (int i = threadIdx.x; i < fr * B; i += NCT) {
        const int row = i / B, b = i % B;
        float v = 0.f;
#pragma unroll
        for (int s = 0; s < WPR; ++s) v += res[(s * RR + row) * B + b];
        if constexpr (Gemv<OP>::SCALED) v *= scales_at<OP>(p, t, f0, row, i, pre_scale).x;
        epilogue<OP>(p, t, t.arg0 + f0 + row, b, v, residual_at<OP>(p, t, f0, i, pre));
      }
    }
    consumer_sync();                       // `res` is free again
  }
  return true;
}

}  // namespace mk
