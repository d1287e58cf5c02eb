#pragma once
#include "attention_layout.cuh"
#include "attention_walk.cuh"
#include "config.cuh"
#include "mma.cuh"
#include "numerics.cuh"
#include "ring.cuh"
#include "staging.cuh"

namespace mk {

// The key walk on tensor cores (ATTN_MMA), a warp step per 8 keys. Scores S (the G query heads padded to 16
// rows x 8 keys) = Q K^T by m16n8k16 over the head dims: lane (g, c) loads 16 bytes of key g's row at chunk
// 4j + c, and the same chunk of query head g, and feeds elements 0-3 to one mma and 4-7 to another (a dot
// product does not care which dims meet in which mma). The score fragment (head g, keys 2c, 2c+1) is then,
// as probabilities in the model dtype, the B fragment of O^T (head dims x heads) += V^T P^T by m16n8k8 with
// the 8 keys as K. V^T's A fragments come from the same 16-byte row loads transposed in registers
// (movmatrix): ldmatrix.trans would read 8 key rows 256 bytes apart, all in the same banks.
constexpr int NJ = D / 32;   // 32-dim steps of a head: lanes c = 0..3 take chunks 4j + c
static_assert(!ATTN_MMA || G <= 8, "tensor-core attention: at most 8 query heads per kv head (the mma's N)");

// O^T fragment rows: in tile (j, w / 2) of the walk, row g (w even) or g + 8 (w odd) is head dim mma_dim(j, w, g):
// word w of lane c's chunk 4j + c, transposed, puts dims 8 (4j + c) + 2w, +1 on rows 2c, 2c + 1.
__device__ __forceinline__ int mma_dim(int j, int w, int g) { return 8 * (4 * j + g / 2) + 2 * w + g % 2; }

struct AttnMma {
  uint4 q[NJ];          // query head g's chunks 4j + c (zero for g >= G)
  float m, l;           // head g's running max (the group's four lanes agree) and this lane's share of its sum
  float o[NJ][2][4];    // O^T tiles: rows head dims (mma_dim), columns heads 2c, 2c + 1
};

__device__ __forceinline__ uint32_t pack2(float a, float b) {
  const T two[2] = {from_f(a), from_f(b)};
  return *reinterpret_cast<const uint32_t*>(two);
}

__device__ __forceinline__ void attn_mma_init(AttnMma& a, const float* q) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    float f[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = g < G ? q[g * D + q_slot(8 * (4 * j + c) + e)] : 0.f;
    a.q[j] = pack8(f);
  }
  a.m = -INFINITY;
  a.l = 0.f;
#pragma unroll
  for (int j = 0; j < NJ; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < 4; ++i) a.o[j][h][i] = 0.f;
}

// Keys 0..nk-1 of rows ks (K) and vs (V); warp `warp` takes keys 8 warp .. (+ multiples of 8 NCW). Rows past
// nk are read as row nk - 1 (real numbers, weighed 0), so no load leaves the slot.
__device__ __forceinline__ void attend_rows_mma(const T* ks, const T* vs, int nk, AttnMma& a, int warp) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  for (int k0 = warp * 8; k0 < nk; k0 += NCW * 8) {
    const int key = min(k0 + g, nk - 1);
    const uint4* kr = reinterpret_cast<const uint4*>(ks + (size_t)key * D);
    const uint4* vr = reinterpret_cast<const uint4*>(vs + (size_t)key * D);
    float s[4] = {0.f, 0.f, 0.f, 0.f}, s2[4] = {0.f, 0.f, 0.f, 0.f};   // two chains: half the mma latency
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const uint4 kv = kr[4 * j + c];
      mma_bf16_16816(s, a.q[j].x, 0u, a.q[j].y, 0u, kv.x, kv.y);
      mma_bf16_16816(s2, a.q[j].z, 0u, a.q[j].w, 0u, kv.z, kv.w);
    }
    uint4 vv[NJ];
#pragma unroll
    for (int j = 0; j < NJ; ++j) vv[j] = vr[4 * j + c];
    // head g's scores of keys k0 + 2c, k0 + 2c + 1; key k0 is valid, so the group's max is finite
    const float x0 = k0 + 2 * c < nk ? (s[0] + s2[0]) * ATTN_SCALE : -INFINITY;
    const float x1 = k0 + 2 * c + 1 < nk ? (s[1] + s2[1]) * ATTN_SCALE : -INFINITY;
    float mx = fmaxf(x0, x1);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mn = fmaxf(a.m, mx);
    const float corr = expf(a.m - mn);
    a.m = mn;
    const float p0 = g < G ? expf(x0 - mn) : 0.f, p1 = g < G ? expf(x1 - mn) : 0.f;   // padding heads weigh 0
    a.l = a.l * corr + p0 + p1;
    // the O^T columns of this lane are heads 2c and 2c + 1, whose corrections the groups 2c, 2c + 1 hold
    const float ca = __shfl_sync(0xffffffffu, corr, 8 * c), cb = __shfl_sync(0xffffffffu, corr, 8 * c + 4);
    const uint32_t pb = pack2(p0, p1);
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float* o = a.o[j][h];
        o[0] *= ca; o[1] *= cb; o[2] *= ca; o[3] *= cb;
        mma_16808(o, movmatrix_trans((&vv[j].x)[2 * h]), movmatrix_trans((&vv[j].x)[2 * h + 1]), pb);
      }
    }
  }
}

// This warp's partial (o, m, l per head) into `part` in the layout the cross-warp combine reads.
__device__ __forceinline__ void attn_mma_partial(AttnMma& a, float* part, int warp) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  a.l += __shfl_xor_sync(0xffffffffu, a.l, 1);
  a.l += __shfl_xor_sync(0xffffffffu, a.l, 2);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int head = 2 * c + hh;
    if (head >= G) continue;
    float* pw = part + (warp * G + head) * (D + 2);
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        pw[mma_dim(j, 2 * h, g)] = a.o[j][h][hh];
        pw[mma_dim(j, 2 * h + 1, g)] = a.o[j][h][2 + hh];
      }
  }
  if (c == 0 && g < G) {
    float* pw = part + (warp * G + g) * (D + 2);
    pw[D] = a.m;
    pw[D + 1] = a.l;
  }
}

// All of a task's keys on tensor cores into `a`, as attend_keys: this warp's partial into the scratch; false
// if a ring wait gave up.
__device__ __forceinline__ bool attend_keys_mma(AttnMma& a, const KeyRange& kr, bool own, int warp, RingReader& rd,
                                                float* sm) {
  const float* q = sm + ATTN_Q;
  float* part = sm + ATTN_PART;
  const T* knt = reinterpret_cast<const T*>(part);
  attn_mma_init(a, q);
  for (int k0 = kr.lo; k0 < kr.old_hi; k0 += ATTN_KEYS) {
    const T* ks = reinterpret_cast<const T*>(rd.wait());
    attend_rows_mma(ks, ks + ATTN_KEYS * D, min(ATTN_KEYS, kr.old_hi - k0), a, warp);
    rd.release();
  }
  if (own) attend_rows_mma(knt, knt + (VT == 1 ? 1 : kr.nnew) * D, VT == 1 ? 1 : kr.nnew, a, 0);   // nnew <= 8: one pass
  if (!rd.all_ok()) return false;   // also: the prep rows in `part` are no longer read
  attn_mma_partial(a, part, warp);
  return true;
}

}  // namespace mk
