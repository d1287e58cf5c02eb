#pragma once
#include "attention_combine.cuh"
#include "attention_layout.cuh"
#include "attention_mma.cuh"
#include "attention_walk.cuh"
#include "config.cuh"
#include "numerics.cuh"
#include "ring.cuh"
#include "sync.cuh"

// One flash-decoding task: sequence b, kv head kvh, split s of the keys [0, pos]. It prepares the
// group's queries and the new key (q/k RMSNorm, RoPE with the reference's rounding points), appends
// the new K/V to the cache if its split holds position pos, and writes an unnormalised partial
// (o, running max m, sum l) per query head; the last split to finish combines them (a split that holds
// all of the sequence's keys writes the output itself). The key walk runs on CUDA cores (attention_walk.cuh)
// or, where a kv head has at most 8 query heads, on tensor cores (attention_mma.cuh).
namespace mk {

// The rotary cosine and sine of head dim d at position pos, rounded as the reference rounds them.
__device__ __forceinline__ void rope_angle(const Params& p, int pos, int d, float& c, float& s) {
  const float ang = static_cast<float>(pos) * __ldg(p.inv_freq + d % (D / 2));
  c = rnd(cosf(ang));
  s = rnd(sinf(ang));
}

// What an attention task needs of its inputs but not of this step's results: the key range and, for each
// of this lane's head dims d = lane + 32 j, the rotary cosine and sine at the position, rounded as the
// reference rounds them. Computed before the task's wait on the QKV counter, so the position load and the
// sincos leave the QKV -> attention critical path.
struct AttnPrologue {
  KeyRange kr;
  float cs[DPL], sn[DPL];
  AttnPrologue() = default;
  __device__ AttnPrologue(const Params& p, const Task& t) : kr(p, t) {
    if constexpr (ATTN_PROLOGUE_EARLY) {   // otherwise rope_row computes them (fewer registers held)
#pragma unroll
      for (int j = 0; j < DPL; ++j) rope_angle(p, kr.pos, threadIdx.x % 32 + 32 * j, cs[j], sn[j]);
    }
  }
};

// Head dim d of a rotated row: rnd(rnd(x * cos) + rnd(rotate_half(x) * sin)), rounded as the reference rounds it.
__device__ __forceinline__ float rope_dim(const float* row, int d, float c, float s) {
  const float rot = d < D / 2 ? -row[d + D / 2] : row[d - D / 2];
  return rnd(rnd(row[d] * c) + rnd(rot * s));
}

// Rounded rotary embedding of one head row held in `row` (float values of model-dtype numbers), at the task's
// position.
template <bool QUERY>
__device__ __forceinline__ void rope_row(const Params& p, const float* row, float* out, const AttnPrologue& ap) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int d = lane + 32 * j;
    if (d >= D) break;
    float c, s;
    if constexpr (ATTN_PROLOGUE_EARLY) {
      c = ap.cs[j];
      s = ap.sn[j];
    } else {
      rope_angle(p, ap.kr.pos, d, c, s);
    }
    out[QUERY ? q_slot(d) : d] = rope_dim(row, d, c, s);
  }
}

// q/k RMSNorm of one head row (DPL values a lane), rounded as the reference rounds it; `norm` is q_norm or k_norm.
__device__ __forceinline__ void qk_norm_row(const Params& p, float* vals, const T* norm, int l, int lane) {
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < DPL; ++j) ss = fmaf(vals[j], vals[j], ss);
  const float r = rsqrtf(warp_sum(ss) / D + EPS);
  const T* w = norm + (size_t)l * D;
#pragma unroll
  for (int j = 0; j < DPL; ++j)
    if (lane + 32 * j < D) vals[j] = rnd(to_f(w[lane + 32 * j]) * rnd(vals[j] * r));
}

// The rounded rotary embedding of a new key row at position `pos` (a verify step's keys of the rows before
// this one; the task's own position has its angles in the prologue).
__device__ __forceinline__ void rope_key_at(const Params& p, const float* row, float* out, int pos) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < DPL; ++j) {
    const int d = lane + 32 * j;
    if (d >= D) break;
    float c, s;
    rope_angle(p, pos, d, c, s);
    out[d] = rope_dim(row, d, c, s);
  }
}

// The cache row of a task's sequence (a verify step's VT rows share one) at `key`.
__device__ __forceinline__ size_t cache_row(const Task& t, int key) {
  const int s = TASK_SEQ(t) / VT, kvh = TASK_KV_HEAD(t);
  return ((((size_t)t.layer * SEQS + s) * NKV + kvh) * MAX_SEQ + key) * D;
}

// The new keys and values as cache rows: the task's own (the last of the nn) into the cache where this split
// holds its position, and for warp 0 (the one that attends to them, after the cached keys) all nn into `part`
// (K rows, then V rows), which nobody else touches before the key walk's rd.all_ok(). warp and lane come
// from the caller: recomputed here, they changed the PTX.
__device__ __forceinline__ void append_new_kv(const Params& p, const Task& t, int pos, bool holds_pos, int nn, int warp,
                                              int lane, float* sm) {
  const float* kn = sm + ATTN_KN;
  const float* vn = sm + ATTN_VN;
  T* knt = reinterpret_cast<T*>(sm + ATTN_PART);
  if (holds_pos) {
    for (int d = threadIdx.x; d < D; d += NCT) {
      p.k_cache[cache_row(t, pos) + d] = from_f(kn[(nn - 1) * D + d]);
      p.v_cache[cache_row(t, pos) + d] = from_f(vn[(nn - 1) * D + d]);
    }
  }
  if (warp == 0) {
    for (int d = lane; d < nn * D; d += 32) { knt[d] = from_f(kn[d]); knt[nn * D + d] = from_f(vn[d]); }
    __syncwarp();
  }
}

// The row preparation and the combine over splits stay inline: as functions of their own (their locals
// then live elsewhere) they changed the PTX of the key walk, which the fingerprints forbid.
__device__ bool attention_task(const Params& p, const Task& t, const AttnPrologue& ap, RingReader& rd, float* sm) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = TASK_SEQ(t), kvh = TASK_KV_HEAD(t), split = TASK_SPLIT(t), l = t.layer;
  const KeyRange& kr = ap.kr;
  const int pos = kr.pos, n = pos + 1, lo = kr.lo, hi = kr.hi;
  if (lo >= hi) return true;           // an inactive split: the combine never reads it
  float* q = sm + ATTN_Q;              // G x D
  float* kn = sm + ATTN_KN;            // D
  float* vn = sm + ATTN_VN;            // D
  float* part = sm + ATTN_PART;        // NCW x G x (D + 2): per-warp o, m, l
  const T* qkv = p.qkv + ((size_t)l * B + b) * QKV;

  const int nn = VT == 1 ? 1 : kr.nnew;
  if constexpr (VT == 1) {
    // rows 0..G-1: query heads of this group, G: the new key, G+1: the new value
    for (int row = warp; row < G + 2; row += NCW) {
      const T* src = row < G ? qkv + (kvh * G + row) * D
                   : row == G ? qkv + QSIZE + kvh * D : qkv + QSIZE + KVSIZE + kvh * D;
      float* tmp = part + warp * D;
      float vals[DPL];
#pragma unroll
      for (int j = 0; j < DPL; ++j) vals[j] = (lane + 32 * j < D) ? ld_act(src + lane + 32 * j) : 0.f;
      if (HAS_QK_NORM && row <= G) {   // qk_norm_row, written out: the call moved a parameter load in the PTX
        float ss = 0.f;
#pragma unroll
        for (int j = 0; j < DPL; ++j) ss = fmaf(vals[j], vals[j], ss);
        const float r = rsqrtf(warp_sum(ss) / D + EPS);
        const T* w = (row < G ? p.q_norm : p.k_norm) + (size_t)l * D;
#pragma unroll
        for (int j = 0; j < DPL; ++j)
          if (lane + 32 * j < D) vals[j] = rnd(to_f(w[lane + 32 * j]) * rnd(vals[j] * r));
      }
      float* dst = row < G ? q + row * D : row == G ? kn : vn;
#pragma unroll
      for (int j = 0; j < DPL; ++j)
        if (lane + 32 * j < D) (row <= G ? tmp : dst)[lane + 32 * j] = vals[j];
      __syncwarp();
      if (row < G) rope_row<true>(p, tmp, dst, ap);
      else if (row == G) rope_row<false>(p, tmp, dst, ap);
      __syncwarp();
    }
  } else {
    // rows 0..G-1: query heads, then per new key i of this split its key (G + 2i) and value (G + 2i + 1): key
    // new_lo + i, of row b + new_lo + i - pos of the same sequence (its rows hold consecutive positions)
    for (int row = warp; row < G + 2 * nn; row += NCW) {
      const int ni = (row - G) / 2, key = kr.new_lo + ni;
      const bool is_k = row >= G && (row - G) % 2 == 0;
      const T* nsrc = qkv + (ptrdiff_t)(key - pos) * QKV;
      const T* src = row < G ? qkv + (kvh * G + row) * D
                   : is_k ? nsrc + QSIZE + kvh * D : nsrc + QSIZE + KVSIZE + kvh * D;
      float* tmp = part + warp * D;
      float vals[DPL];
#pragma unroll
      for (int j = 0; j < DPL; ++j) vals[j] = (lane + 32 * j < D) ? ld_act(src + lane + 32 * j) : 0.f;
      if (HAS_QK_NORM && (row < G || is_k)) qk_norm_row(p, vals, row < G ? p.q_norm : p.k_norm, l, lane);
      float* dst = row < G ? q + row * D : is_k ? kn + ni * D : vn + ni * D;
#pragma unroll
      for (int j = 0; j < DPL; ++j)
        if (lane + 32 * j < D) (row < G || is_k ? tmp : dst)[lane + 32 * j] = vals[j];
      __syncwarp();
      if (row < G) rope_row<true>(p, tmp, dst, ap);
      else if (is_k && key == pos) rope_row<false>(p, tmp, dst, ap);
      else if (is_k) rope_key_at(p, tmp, dst, key);
      __syncwarp();
    }
  }
  consumer_sync();
  const bool holds_pos = lo <= pos && pos < hi;
  const bool has_new = VT == 1 ? holds_pos : nn > 0;
  if (has_new) append_new_kv(p, t, pos, holds_pos, nn, warp, lane, sm);

  // The cached keys arrive through the ring, ATTN_KEYS a slot (K rows, then V rows); the new keys and
  // values follow from shared memory, rounded to the model dtype like the cache copy.
  const bool own = has_new && warp == 0;
  if constexpr (ATTN_MMA) {
    AttnMma a;
    if (!attend_keys_mma(a, kr, own, warp, rd, sm)) return false;
  } else {
    AttnAcc a;
    if (!attend_keys(a, kr, own, warp, lane, rd, sm)) return false;
  }
  consumer_sync();
  const size_t slots = (((size_t)l * B + b) * NKV + kvh) * KV_SPLITS;   // this (layer, b, kv head)'s splits
  const size_t out = (slots + split) * G;
  // A sequence whose keys all fall in this split (short contexts, or one split a kv head) needs no combine:
  // its output is written here, and the arrival count, which wraps at `active`, stays 0.
  const int active = (n + kr.chunk - 1) / kr.chunk;
  T* dst = p.attn_out + ((size_t)l * B + b) * QSIZE + kvh * G * D;
  combine_warps(p, sm, out, active, dst);
  if (active == 1) return true;
  if (!last_split(p, ((size_t)l * B + b) * NKV + kvh, active, part)) return true;
  // Every output element weighs its splits' partials by exp(m_s - max) (log-sum-exp). All of a chunk's
  // (m, l, o) loads are in flight at once with a running max, so at up to CU splits the combine is one
  // L2 round trip and needs no block barrier.
  constexpr int CU = KV_SPLITS < 16 ? KV_SPLITS : 16;
  for (int i = threadIdx.x; i < G * D; i += NCT) {
    const int g = i / D, d = i % D;
    float mx = -INFINITY, num = 0.f, den = 0.f;
    for (int s0 = 0; s0 < active; s0 += CU) {
      float ms[CU], ls[CU], os[CU];
#pragma unroll
      for (int u = 0; u < CU; ++u) {
        const bool in = s0 + u < active;
        const size_t j = (slots + s0 + u) * G + g;
        ms[u] = in ? __ldcg(p.attn_m + j) : -INFINITY;
        ls[u] = in ? __ldcg(p.attn_l + j) : 0.f;
        os[u] = in ? __ldcg(p.attn_o + j * D + d) : 0.f;
      }
      float cm = mx;
#pragma unroll
      for (int u = 0; u < CU; ++u) cm = fmaxf(cm, ms[u]);
      if (cm == -INFINITY) continue;     // no split with keys yet
      const float c = expf(mx - cm);     // 0 before the first split with keys
      num *= c;
      den *= c;
#pragma unroll
      for (int u = 0; u < CU; ++u) {
        const float w = ms[u] == -INFINITY ? 0.f : expf(ms[u] - cm);   // a split with no keys weighs nothing
        num = fmaf(w, os[u], num);
        den = fmaf(w, ls[u], den);
      }
      mx = cm;
    }
    dst[i] = from_f(num / den);
  }
  return true;
}

}  // namespace mk
