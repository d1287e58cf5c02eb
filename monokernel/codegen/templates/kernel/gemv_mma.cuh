#pragma once
#include "config.cuh"
#include "gemv_epilogue.cuh"
#include "mma.cuh"
#include "ring.cuh"
#include "staging.cuh"
#include "sync.cuh"

// Matrix-vector tasks on tensor cores (MMA): the ring's chunks are 8 weight rows x one K segment.
namespace mk {

// The results of rows f0 .. f0 + fr of a tensor-core task (res: row-major rows x B) through the op's epilogue.
// int8 rows are scaled here (their scale table, as on CUDA cores); grouped formats were scaled in the mma loop.
template <int OP>
__device__ __forceinline__ void mma_epilogue(const Params& p, const Task& t, int f0, int fr, const float* res, float pre,
                                             float2 pre_scale) {
  if constexpr (OP == OP_GATEUP) {
    for (int i = threadIdx.x; i < (fr / 2) * B; i += NCT) {
      const int pr = i / B, b = i % B;
      float g = res[2 * pr * B + b], up = res[(2 * pr + 1) * B + b];
      if constexpr (Gemv<OP>::SCALED) {
        const float2 sc = scales_at<OP>(p, t, f0, 2 * pr, i, pre_scale);
        g *= sc.x;
        up *= sc.y;
      }
      gateup_epilogue(p, t, t.arg0 + f0 + 2 * pr, b, g, up);
    }
  } else {
    for (int i = threadIdx.x; i < fr * B; i += NCT) {
      float v = res[i];
      if constexpr (Gemv<OP>::SCALED) v *= scales_at<OP>(p, t, f0, i / B, i, pre_scale).x;
      epilogue<OP>(p, t, t.arg0 + f0 + i / B, i % B, v, residual_at<OP>(p, t, f0, i, pre));
    }
  }
}

// One K segment (klen elements) of a quantised chunk through the tensor cores, for lane (g, c) of a warp
// whose first step is `first` (then every NCW-th):
// row g's codes times the inputs of sequences g and g + 8 (ldx(k): the two 8-element input vectors at
// segment offset k) into d (sequences g, g + 8 x chunk rows 2c, 2c + 1), as the dense loop below, but
// with the codes turned into operand pairs first (numerics.cuh). A warp step covers SBLOCK of K: each lane
// loads SBLOCK / 8 (int4) or / 4 (int8) bytes of codes in one load (mma_tiles.py's lane order). Grouped
// formats (int4, GGUF Q8_0) go by 32-wide windows of K, so each mma sums one group's products, and fold each
// group's sums into d times the group's scales of rows 2c and 2c + 1, which follow the segment's codes in
// each row (then row g's zero points, or the rows' float mins, where the format has them); int8 and fp8 rows
// with a scale a row take it in the epilogue.
// GGUF Q4_1 (w = d q + m) adds m times the group's input sum: an mma of the same inputs against ones gives
// that sum for sequences g and g + 8 in the accumulator layout (2 mma a group, no shuffles; perf note 31).
// row0: the matrix row of the chunk's first row, whose parity and neighbours key MMA_SCALE_SWIZZLE's tables.
template <int OP, class LoadX>
__device__ __forceinline__ void mma_codes_segment(float* d, float* e, const unsigned char* slot, int klen, int first,
                                                  int g, int c, int row0, const LoadX& ldx) {
  using GV = Gemv<OP>;
  constexpr int SB = GV::SBLOCK, LB = SB * GV::CODE_BITS / 32;   // K a warp step, bytes a lane loads
  constexpr int NW = LB / 4;                                     // words a lane loads
  const unsigned char* wr = slot + g * GV::RSTRIDE;
  // Swizzled tables (mma_tiles.py swizzle_pieces): group j of matrix row r at element j ^ (key(r) x 16 bytes);
  // the 4 rows 2c of the lanes c sit 128-byte multiples apart and get 4 keys, so 4 banks, not one.
  constexpr int SWE = 16 / (int)sizeof(ST);                      // table elements a 16-byte piece
  constexpr int TPAD = MMA_SCALE_SWIZZLE ? 64 : 16;              // a table's bytes round up to this
  const int x0 = MMA_SCALE_SWIZZLE ? ((row0 + 2 * c) >> 1 & 3) * SWE : 0;
  const int x1 = MMA_SCALE_SWIZZLE ? ((row0 + 2 * c + 1) >> 1 & 3) * SWE : 0;
#pragma unroll (MMA_CODE_UNROLL)   // several steps' loads and mma chains in flight: one alone is latency-bound
  for (int sb = first; sb < klen / SB; sb += NCW) {
    uint32_t wv[NW];
    const unsigned char* src = wr + sb * (SB * GV::CODE_BITS / 8) + c * LB;
    if constexpr (NW == 4) {
      const uint4 u = *reinterpret_cast<const uint4*>(src);
      wv[0] = u.x; wv[1] = u.y; wv[2] = u.z; wv[3] = u.w;
    } else if constexpr (NW == 2) {
      const uint2 u = *reinterpret_cast<const uint2*>(src);
      wv[0] = u.x; wv[1] = u.y;
    } else {
      wv[0] = *reinterpret_cast<const uint32_t*>(src);
    }
    if constexpr (GV::GROUP > 0) {
      // window q: the 8 codes at K sb * SB + 32 q + 8 c .. + 7, in word q (int4) or words 2q, 2q + 1 (int8)
      constexpr int WPW = GV::CODE_BITS / 4;                   // words a window
      constexpr int GW = GV::GROUP / 32;                       // windows a group
      static_assert(GV::GROUP % 32 == 0 && SB % GV::GROUP == 0, "a warp step holds whole groups");
      const int codes = GV::CODE_BITS == 4 ? klen / 2 : klen;  // bytes of the segment's codes
      const ST* s0 = reinterpret_cast<const ST*>(slot + 2 * c * GV::RSTRIDE + codes);
      const ST* s1 = reinterpret_cast<const ST*>(slot + (2 * c + 1) * GV::RSTRIDE + codes);
      // zero points (GPTQ asym, AWQ): row g's, two a byte, after the segment's scales (padded to 16 bytes);
      // mins (GGUF Q4_1): rows 2c and 2c + 1's, one a group in the scales' type, at the same place
      const unsigned char* zr = wr + codes + ((klen / GV::GROUP) * (int)sizeof(ST) + TPAD - 1) / TPAD * TPAD;
      // a step's groups lie inside one 16-byte piece: the XOR of its first group serves all of them
      static_assert(!MMA_SCALE_SWIZZLE || SB / GV::GROUP <= SWE, "a warp step's scales within one piece");
      const int sw0 = ((sb * SB) / GV::GROUP) ^ x0, sw1 = ((sb * SB) / GV::GROUP) ^ x1;
#pragma unroll
      for (int gi = 0; gi < NW / (GW * WPW); ++gi) {
        float u[4] = {0.f, 0.f, 0.f, 0.f}, v[4] = {0.f, 0.f, 0.f, 0.f}, sx[4] = {0.f, 0.f, 0.f, 0.f};
        const int grp = (sb * SB) / GV::GROUP + gi;
        uint32_t zero = i4_zero_pair(GV::MINS ? 0 : 8);
        if constexpr (GV::ZERO_POINTS) zero = i4_zero_pair((zr[grp / 2] >> (4 * (grp % 2))) & 0xFu);
#pragma unroll
        for (int q = gi * GW; q < (gi + 1) * GW; ++q) {
          uint32_t b[4];
          if constexpr (GV::CODE_BITS == 4) {
            i4x8_to_pairs(wv[q], b, zero);
          } else {
            i8x4_to_pairs(wv[WPW * q], b);
            i8x4_to_pairs(wv[WPW * q + 1], b + 2);
          }
          uint4 a0, a1;
          ldx(sb * SB + 32 * q + 8 * c, a0, a1);
          mma_bf16_16816(u, a0.x, a1.x, a0.y, a1.y, b[0], b[1]);
          mma_bf16_16816(v, a0.z, a1.z, a0.w, a1.w, b[2], b[3]);
          if constexpr (GV::MINS) {
            mma_bf16_16816(sx, a0.x, a1.x, a0.y, a1.y, ONE_PAIR, ONE_PAIR);
            mma_bf16_16816(sx, a0.z, a1.z, a0.w, a1.w, ONE_PAIR, ONE_PAIR);
          }
        }
        const int i0 = MMA_SCALE_SWIZZLE ? sw0 + gi : grp, i1 = MMA_SCALE_SWIZZLE ? sw1 + gi : grp;
        const float c0 = to_f(s0[i0]), c1 = to_f(s1[i1]);
        if constexpr (GV::MINS) {   // sx[0] = sx[1]: sequence g's sum over the group, sx[2] = sx[3]: g + 8's
          const ST* m0 = reinterpret_cast<const ST*>(zr + (2 * c - g) * GV::RSTRIDE);
          const ST* m1 = reinterpret_cast<const ST*>(zr + (2 * c + 1 - g) * GV::RSTRIDE);
          const float n0 = to_f(m0[i0]), n1 = to_f(m1[i1]);
          d[0] = fmaf(sx[0], n0, fmaf(u[0] + v[0], c0, d[0]));
          d[1] = fmaf(sx[1], n1, fmaf(u[1] + v[1], c1, d[1]));
          d[2] = fmaf(sx[2], n0, fmaf(u[2] + v[2], c0, d[2]));
          d[3] = fmaf(sx[3], n1, fmaf(u[3] + v[3], c1, d[3]));
        } else {
          d[0] = fmaf(u[0] + v[0], c0, d[0]);
          d[1] = fmaf(u[1] + v[1], c1, d[1]);
          d[2] = fmaf(u[2] + v[2], c0, d[2]);
          d[3] = fmaf(u[3] + v[3], c1, d[3]);
        }
      }
    } else {
      // word j: the 4 codes at K sb * SB + c * SB / 4 + 4 j .. + 3; two words a vector of 8 inputs
#pragma unroll
      for (int j = 0; j < NW; j += 2) {
        uint32_t b[4];
        if constexpr (GV::FP8) {
          e4m3x4_to_pairs(wv[j], b);
          e4m3x4_to_pairs(wv[j + 1], b + 2);
        } else {
          i8x4_to_pairs(wv[j], b);
          i8x4_to_pairs(wv[j + 1], b + 2);
        }
        uint4 a0, a1;
        ldx(sb * SB + c * (SB / 4) + 4 * j, a0, a1);
        mma_bf16_16816(d, a0.x, a1.x, a0.y, a1.y, b[0], b[1]);
        mma_bf16_16816(e, a0.z, a1.z, a0.w, a1.w, b[2], b[3]);
      }
    }
  }
}

// Tensor-core matrix-vector task: D (16 sequences x 8 weight rows) += In (16 x 16 of K) x W^T per mma, the
// batch padded to 16 on the M side. A dot product does not care which K positions meet in which mma, so
// lane (g = lane / 4, c = lane % 4) loads 8 consecutive elements (16 bytes) at K offset 32 j + 8 c of weight
// row g and of sequences g and g + 8, and feeds elements 0-3 to one mma and 4-7 to the next: the mma's
// K slots {2c, 2c+1, 2c+8, 2c+9} then hold the same K positions in both operands. Warps split a chunk's
// K range; their accumulators meet in shared memory once per row group.
template <int OP>
__device__ bool gemv_mma_task(const Params& p, const Task& t, const T* in, RingReader& rd, float* sm) {
  constexpr int K = Gemv<OP>::K;
  constexpr int KSEG = Gemv<OP>::KSEG;
  constexpr int NSEG = (K + KSEG - 1) / KSEG;
  static_assert(Gemv<OP>::CODE_BITS == 16, "quantised ops stream segment-major (gemv_mma_flush_task)");
  constexpr int RR = 8 * Gemv<OP>::FC;             // rows whose results one epilogue writes
  float* part = sm;                                // 2 x NCW x 16 x 8: accumulators, alternate groups
  float* res = sm + 2 * NCW * 128;                 // RR x B
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const float pre = preload_residual<OP, RR>(p, t);
  const float2 pre_scale = preload_scales<OP, RR>(p, t);
  int group = 0;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int f0 = 0; f0 < t.arg1; f0 += RR) {
    const int fr = min(RR, t.arg1 - f0);
    for (int g0 = 0; g0 < fr; g0 += 8, ++group) {
      float d[4] = {0.f, 0.f, 0.f, 0.f}, e[4] = {0.f, 0.f, 0.f, 0.f};   // two chains: half the mma latency
#pragma unroll 1
      for (int seg = 0; seg < NSEG; ++seg) {
        const int k0 = seg * KSEG, klen = min(KSEG, K - k0);
        const unsigned char* slot = rd.wait();
        const T* x0 = in + (size_t)g * Gemv<OP>::IN_STRIDE + k0;
        const T* x1 = in + (size_t)(g + 8) * Gemv<OP>::IN_STRIDE + k0;
        const unsigned char* w = slot + g * Gemv<OP>::RSTRIDE;
#pragma unroll 4
        for (int kb = warp * 32 + c * 8; kb < klen + c * 8; kb += NCW * 32) {
          const bool kin = kb < klen;            // K tails are multiples of 8: whole lanes drop out
          const uint4 wv = kin ? *reinterpret_cast<const uint4*>(w + kb * sizeof(T)) : zero;
          const uint4 a0 = kin && g < B ? ld_in<OP>(x0 + kb) : zero;
          const uint4 a1 = B > 8 && kin && g + 8 < B ? ld_in<OP>(x1 + kb) : zero;
          mma_bf16_16816(d, a0.x, a1.x, a0.y, a1.y, wv.x, wv.y);
          mma_bf16_16816(e, a0.z, a1.z, a0.w, a1.w, wv.z, wv.w);
        }
        rd.release();
      }
      // d0, d1: sequence g, rows 2c, 2c+1; d2, d3: sequence g + 8
#pragma unroll
      for (int j = 0; j < 4; ++j) d[j] += e[j];
      float* pw = part + ((group & 1) * NCW + warp) * 128;
      pw[g * 8 + 2 * c] = d[0];
      pw[g * 8 + 2 * c + 1] = d[1];
      pw[(g + 8) * 8 + 2 * c] = d[2];
      pw[(g + 8) * 8 + 2 * c + 1] = d[3];
      if (!rd.all_ok()) return false;
      // The buffer just written is read below; the next group writes the other one, and the group after
      // that only starts once every thread has passed the next group's barrier, i.e. finished reading.
      const float* pb = part + (group & 1) * NCW * 128;
      for (int i = threadIdx.x; i < 8 * B; i += NCT) {
        const int r = i / B, b = i % B;
        float v = 0.f;
#pragma unroll
        for (int w2 = 0; w2 < NCW; ++w2) v += pb[w2 * 128 + b * 8 + r];
        res[(g0 + r) * B + b] = v;
      }
    }
    consumer_sync();                       // `res` complete
    mma_epilogue<OP>(p, t, f0, fr, res, pre, pre_scale);
    consumer_sync();                       // `res` is free again
  }
  return true;
}

// Where 16-byte vector j of row b of a staged input segment sits: odd rows swap the two 64-byte halves of
// each 128 bytes, so the two rows an 8-lane phase of mma operand loads touches fall in different banks.
// Rows are whole 128-byte groups apart, so a swapped vector stays in its row.
template <int KSEG>
__device__ __forceinline__ int seg_vec(int b, int j) {
  constexpr int SEG_ROW_VECS = (KSEG / 8 + 7) / 8 * 8;
  return b * SEG_ROW_VECS + (j ^ ((b & 1) << 2));
}

// Issues the copies of input segment [k0, k0 + klen) into `dst` (seg_vec's layout; asynchronous, L2 -> shared);
// the caller waits for them (cp_async_wait_all, then a consumer barrier) before reading.
template <int OP>
__device__ __forceinline__ void stage_segment(T* dst, const T* in, int k0, int klen) {
  constexpr int KSEG = Gemv<OP>::KSEG;
  for (int i = threadIdx.x; i < B * (klen / 8); i += NCT) {
    const int b = i / (klen / 8), j = i % (klen / 8);
    cp_async16(dst + seg_vec<KSEG>(b, j) * 8, in + (size_t)b * Gemv<OP>::IN_STRIDE + k0 + j * 8);
  }
}

// A tensor-core task whose chunks stream segment-major over a flush: the ring brings K segment by K segment
// every row group of the flush, and per-warp accumulators of every row group collect in `part` across the
// segments, reduced across warps once a flush (one barrier a flush, not one a row group: the warps drift
// apart by up to the ring, as on CUDA cores). Two kinds of op: those whose input lives in global memory (the
// down projection at batch > 2), each input segment (B x KSEG) staged once into the shared-memory input
// area (one L2 round trip, all copies in flight) so the mma loop reads only shared memory (loading it from
// L2 inside the loop cost a round trip or two per slot, more than the slot's HBM time at batch 8); and every
// op of a quantised kernel, whose short chunks (16 KB of int4) made a barrier each the bound (perf note 30).
// Their warp steps rotate over the chunks so no warp takes the odd step of each.
template <int OP>
__device__ bool gemv_mma_flush_task(const Params& p, const Task& t, const T* in, T* seg_in, RingReader& rd,
                                    float* sm) {
  constexpr int K = Gemv<OP>::K, KSEG = Gemv<OP>::KSEG, NSEG = (K + KSEG - 1) / KSEG;
  constexpr int RR = 8 * Gemv<OP>::FC;
  constexpr bool STAGE = Gemv<OP>::SEG_STAGED;
  static_assert(!STAGE || (KSEG / 8 + 7) / 8 * 64 <= INPUT_LEN, "a staged segment must fit the input area");
  // Double-buffered staging: segment s + 1's copies go out once segment s's have landed, and land while
  // segment s's chunks run, so a segment's start waits for no L2 round trip (the task's first still does).
  constexpr bool PREFETCH = STAGE && SEG_PREFETCH;
  constexpr int SEG_ROW = (KSEG / 8 + 7) / 8 * 64;   // seg_vec's row stride in elements
  static_assert(!PREFETCH || 2 * SEG_ROW <= INPUT_LEN, "two staged segments must fit the input area");
  int xoff = 0;                          // PREFETCH: vectors from seg_in to the current segment's buffer
  float* part = sm;                                // FC x NCW x 16 x 8
  float* res = sm + Gemv<OP>::FC * NCW * 128;      // RR x B
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const float pre = preload_residual<OP, RR>(p, t);
  const float2 pre_scale = preload_scales<OP, RR>(p, t);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const uint4* xs = reinterpret_cast<const uint4*>(seg_in);
  int chunk = 0;                         // chunks of the task so far: the codes' warp steps rotate with it
  for (int f0 = 0; f0 < t.arg1; f0 += RR) {
    const int fr = min(RR, t.arg1 - f0);
#pragma unroll 1
    for (int seg = 0; seg < NSEG; ++seg) {
      const int k0 = seg * KSEG, klen = min(KSEG, K - k0);
      if constexpr (PREFETCH) {
        if (f0 == 0 && seg == 0) stage_segment<OP>(seg_in, in, 0, klen);   // the task's first: nothing before it
        cp_async_wait_all();                 // this thread's copies of this segment
        consumer_sync();                     // everyone's; and the other buffer's readers (last segment) are done
        const bool more = seg + 1 < NSEG || f0 + RR < t.arg1;   // the next segment, or the next flush's first
        const int nk0 = seg + 1 < NSEG ? k0 + KSEG : 0;
        if (more) stage_segment<OP>(seg_in + (xoff ^ B * SEG_ROW / 8) * 8, in, nk0, min(KSEG, K - nk0));
      } else if constexpr (STAGE) {
        consumer_sync();                     // the previous segment's readers are done
        // asynchronous copies (L2 -> shared, no registers): the whole segment in flight, one round trip
        stage_segment<OP>(seg_in, in, k0, klen);
        cp_async_wait_all();
        consumer_sync();
      }
      const T* x0 = in + (size_t)g * Gemv<OP>::IN_STRIDE + k0;
      const T* x1 = in + (size_t)(g + 8) * Gemv<OP>::IN_STRIDE + k0;
      // the 8 inputs at segment offset k (a multiple of 8) of sequences g and g + 8
      auto ldx = [&](int k, bool kin, uint4& a0, uint4& a1) {
        if constexpr (STAGE) {               // xoff stays 0 without PREFETCH
          a0 = kin && g < B ? xs[xoff + seg_vec<KSEG>(g, (unsigned)k / 8)] : zero;
          a1 = B > 8 && kin && g + 8 < B ? xs[xoff + seg_vec<KSEG>(g + 8, (unsigned)k / 8)] : zero;
        } else {
          a0 = kin && g < B ? ld_in<OP>(x0 + k) : zero;
          a1 = B > 8 && kin && g + 8 < B ? ld_in<OP>(x1 + k) : zero;
        }
      };
      for (int g0 = 0; g0 < fr; g0 += 8, ++chunk) {
        float d[4] = {0.f, 0.f, 0.f, 0.f}, e[4] = {0.f, 0.f, 0.f, 0.f};
        const unsigned char* slot = rd.wait();
        if constexpr (Gemv<OP>::CODE_BITS < 16) {
          constexpr int SB = Gemv<OP>::SBLOCK;
          const int first = ((warp - chunk * (klen / SB)) % NCW + NCW) % NCW;
          mma_codes_segment<OP>(d, e, slot, klen, first, g, c, t.arg0 + f0 + g0,
                                [&](int k, uint4& a0, uint4& a1) { ldx(k, true, a0, a1); });
        } else {
          const unsigned char* w = slot + g * Gemv<OP>::RSTRIDE;
#pragma unroll (B > 8 ? 2 : 4)   // both operand halves' loads in flight cost registers at batch > 8
          for (int kb = warp * 32 + c * 8; kb < klen + c * 8; kb += NCW * 32) {
            const bool kin = kb < klen;
            const uint4 wv = kin ? *reinterpret_cast<const uint4*>(w + kb * sizeof(T)) : zero;
            uint4 a0, a1;
            ldx(kb, kin, a0, a1);
            mma_bf16_16816(d, a0.x, a1.x, a0.y, a1.y, wv.x, wv.y);
            mma_bf16_16816(e, a0.z, a1.z, a0.w, a1.w, wv.z, wv.w);
          }
        }
        rd.release();
        // d0, d1: sequence g, rows 2c, 2c+1; d2, d3: sequence g + 8; each lane adds to its own four floats
        float* pw = part + ((g0 / 8) * NCW + warp) * 128;
        const int o[4] = {g * 8 + 2 * c, g * 8 + 2 * c + 1, (g + 8) * 8 + 2 * c, (g + 8) * 8 + 2 * c + 1};
#pragma unroll
        for (int j = 0; j < 4; ++j) pw[o[j]] = (seg ? pw[o[j]] : 0.f) + (d[j] + e[j]);
      }
      if constexpr (PREFETCH) xoff ^= B * SEG_ROW / 8;
    }
    if (!rd.all_ok()) {                    // also: every warp's accumulators are in `part`
      if constexpr (PREFETCH) cp_async_wait_all();   // no copy may land after the block has left
      return false;
    }
    for (int i = threadIdx.x; i < fr * B; i += NCT) {
      const int r = i / B, b = i % B;
      const float* pb = part + (r / 8) * NCW * 128;
      float v = 0.f;
#pragma unroll
      for (int w2 = 0; w2 < NCW; ++w2) v += pb[w2 * 128 + b * 8 + r % 8];
      res[r * B + b] = v;
    }
    consumer_sync();                       // `res` complete
    mma_epilogue<OP>(p, t, f0, fr, res, pre, pre_scale);
    consumer_sync();                       // `res` and `part` are free again
  }
  return true;
}

}  // namespace mk
