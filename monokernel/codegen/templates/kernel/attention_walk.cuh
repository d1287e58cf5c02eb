#pragma once
#include "attention_layout.cuh"
#include "config.cuh"
#include "numerics.cuh"
#include "ring.cuh"

// The key walk of an attention task on CUDA cores, and the queries' shared-memory layout both walks read.
namespace mk {

// The key walk. Scores first: the lanes of a warp form KPW groups of LPK lanes, one key per group, and
// lane (kg, sub) holds the 8-element chunks sub + LPK * c (c < NCH) of the query heads and of its key, so
// a key's dot products need log2(LPK) shuffles and the 16-byte key loads of an 8-lane phase hit distinct
// banks. Then one online-softmax update per batch of AKU * KPW keys (one max, one correction), and P.V
// with lanes across head dims (DPL each), the probabilities broadcast from their key's group.
constexpr int LPK = ATTN_LPK;
constexpr int KPW = 32 / LPK;
constexpr int NCH = D / (8 * LPK);
constexpr int AKU = ATTN_KEY_BATCH;
constexpr int KSTRIDE = NCW * KPW;          // keys between two key groups of one warp
// Where element d of a query head sits in shared memory: lane sub reads its chunks' elements as 16-byte
// vectors (c, half hh) that the 8 lanes of a phase find side by side, so the loads hit distinct banks.
__host__ __device__ constexpr int q_slot(int d) {
  return (((d / 8 / LPK) * 2 + d % 8 / 4) * LPK + d / 8 % LPK) * 4 + d % 4;
}
constexpr bool q_slot_is_a_permutation() {
  for (int d = 0; d < D; ++d) {
    if (q_slot(d) < 0 || q_slot(d) >= D) return false;
    for (int e = 0; e < d; ++e)
      if (q_slot(e) == q_slot(d)) return false;
  }
  return true;
}
static_assert(D % (8 * LPK) == 0, "a key group must cover a head in 16-byte chunks");
static_assert(q_slot_is_a_permutation(), "the queries' shared-memory order must hold every head dim once");

struct AttnAcc {
  float m[G], lsum[G], acc[G][DPL];   // lsum: this lane's key group's share, summed at the end
};

// Keys 0..nk-1 of rows ks (K) and vs (V), each row D elements; every warp calls it, warp w takes the
// keys w * KPW + kg (+ multiples of KSTRIDE).
__device__ __forceinline__ void attend_rows(const T* ks, const T* vs, int nk, const float* q,
                                            AttnAcc& a) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, kg = lane / LPK, sub = lane % LPK;
  for (int j0 = warp * KPW; j0 < nk; j0 += KSTRIDE * AKU) {
    float s[AKU][G];
#pragma unroll
    for (int u = 0; u < AKU; ++u)
#pragma unroll
      for (int g = 0; g < G; ++g) s[u][g] = 0.f;
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      uint4 kv[AKU];
#pragma unroll
      for (int u = 0; u < AKU; ++u)
        kv[u] = reinterpret_cast<const uint4*>(ks + (size_t)min(j0 + u * KSTRIDE + kg, nk - 1) * D)[sub + LPK * c];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float4 qf = reinterpret_cast<const float4*>(q + g * D)[(c * 2 + hh) * LPK + sub];
#pragma unroll
          for (int u = 0; u < AKU; ++u) {
            const float2 k0 = pair_to_f2((&kv[u].x)[2 * hh]), k1 = pair_to_f2((&kv[u].x)[2 * hh + 1]);
            s[u][g] = fmaf(qf.x, k0.x, s[u][g]);
            s[u][g] = fmaf(qf.y, k0.y, s[u][g]);
            s[u][g] = fmaf(qf.z, k1.x, s[u][g]);
            s[u][g] = fmaf(qf.w, k1.y, s[u][g]);
          }
        }
      }
    }
    float mx[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      mx[g] = -INFINITY;
#pragma unroll
      for (int u = 0; u < AKU; ++u) {
#pragma unroll
        for (int o = 1; o < LPK; o <<= 1) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o);
        s[u][g] = j0 + u * KSTRIDE + kg < nk ? s[u][g] * ATTN_SCALE : -INFINITY;
        mx[g] = fmaxf(mx[g], s[u][g]);
      }
#pragma unroll
      for (int o = LPK; o < 32; o <<= 1) mx[g] = fmaxf(mx[g], __shfl_xor_sync(0xffffffffu, mx[g], o));
      const float mn = fmaxf(a.m[g], mx[g]);   // finite: key j0 of group 0 is valid
      const float corr = expf(a.m[g] - mn);
      a.m[g] = mn;
      a.lsum[g] *= corr;
#pragma unroll
      for (int u = 0; u < AKU; ++u) {
        s[u][g] = expf(s[u][g] - mn);          // masked keys: exp(-inf) = 0
        a.lsum[g] += s[u][g];
      }
#pragma unroll
      for (int j = 0; j < DPL; ++j) a.acc[g][j] *= corr;
    }
#pragma unroll
    for (int u = 0; u < AKU; ++u) {
#pragma unroll ATTN_PV_UNROLL
      for (int k = 0; k < KPW; ++k) {
        const int j = j0 + u * KSTRIDE + k;
        if (j >= nk) break;
        uint32_t vw[DW];
        float vf[DPL];
        ld_dims(vs + (size_t)j * D + lane * DPL, vw);
        unpack_dims(vw, vf);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float e = __shfl_sync(0xffffffffu, s[u][g], k * LPK);
#pragma unroll
          for (int d = 0; d < DPL; ++d) a.acc[g][d] = fmaf(e, vf[d], a.acc[g][d]);
        }
      }
    }
  }
}

// All of a task's keys on CUDA cores into `a`: the cached keys [kr.lo, kr.old_hi) slot by slot from the
// ring, then, if `own`, the new key and value; this warp's partial (o, m, l per head) into the scratch's
// partials. False if a ring wait gave up. `a` is the caller's (declared in here, the accumulators came out
// in another register order in the PTX), and warp, lane and the key range come in whole for the same reason.
__device__ __forceinline__ bool attend_keys(AttnAcc& a, const KeyRange& kr, bool own, int warp, int lane, RingReader& rd,
                                            float* sm) {
  const float* q = sm + ATTN_Q;
  float* part = sm + ATTN_PART;
  const T* knt = reinterpret_cast<const T*>(part);
#pragma unroll
  for (int g = 0; g < G; ++g) {
    a.m[g] = -INFINITY; a.lsum[g] = 0.f;
#pragma unroll
    for (int j = 0; j < DPL; ++j) a.acc[g][j] = 0.f;
  }
  for (int k0 = kr.lo; k0 < kr.old_hi; k0 += ATTN_KEYS) {
    const T* ks = reinterpret_cast<const T*>(rd.wait());
    attend_rows(ks, ks + ATTN_KEYS * D, min(ATTN_KEYS, kr.old_hi - k0), q, a);
    rd.release();
  }
  if constexpr (VT == 1) {
    if (own) attend_rows(knt, knt + D, 1, q, a);
  } else if (own) {   // warp 0 alone: KPW keys a call
    for (int j = 0; j < kr.nnew; j += KPW) attend_rows(knt + j * D, knt + (kr.nnew + j) * D, min(KPW, kr.nnew - j), q, a);
  }
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int o = LPK; o < 32; o <<= 1) a.lsum[g] += __shfl_xor_sync(0xffffffffu, a.lsum[g], o);
  if (!rd.all_ok()) return false;   // also: the prep rows in `part` are no longer read
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float* pw = part + (warp * G + g) * (D + 2);
#pragma unroll
    for (int j = 0; j < DPL; ++j) pw[lane * DPL + j] = a.acc[g][j];
    if (lane == 0) { pw[D] = a.m[g]; pw[D + 1] = a.lsum[g]; }
  }
  return true;
}

}  // namespace mk
