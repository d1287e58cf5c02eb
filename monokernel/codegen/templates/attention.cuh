// One flash-decoding task: sequence b, kv head kvh, split s of the keys [0, pos]. It prepares the
// group's queries and the new key (q/k RMSNorm, RoPE with the reference's rounding points), appends
// the new K/V to the cache if its split holds position pos, and writes an unnormalised partial
// (o, running max m, sum l) per query head; the last split to finish combines them.
namespace mk {

// Rounded rotary embedding of one head row held in `row` (float values of model-dtype numbers):
// out = rnd(rnd(x * cos) + rnd(rotate_half(x) * sin)), with cos/sin rounded as the reference does.
__device__ __forceinline__ void rope_row(const float* row, float* out, int pos, const float* inv_freq) {
  const int lane = threadIdx.x % 32;
  for (int d = lane; d < D; d += 32) {
    const int j = d % (D / 2);
    const float ang = static_cast<float>(pos) * inv_freq[j];
    const float c = rnd(cosf(ang)), s = rnd(sinf(ang));
    const float rot = d < D / 2 ? -row[d + D / 2] : row[d - D / 2];
    out[d] = rnd(rnd(row[d] * c) + rnd(rot * s));
  }
}

// Keys of an attention task: [lo, hi) of [0, pos]; [lo, old_hi) come from the cache (written by earlier
// steps), through the ring; row pos is this step's own. Producer and consumers compute the same range.
struct KeyRange {
  int lo, hi, old_hi, pos;
  __device__ KeyRange(const Params& p, const Task& t) {
    pos = __ldg(p.positions + t.arg0 / NKV);
    const int chunk = kv_chunk(pos + 1);
    lo = t.arg1 * chunk;
    hi = min(pos + 1, lo + chunk);
    old_hi = min(hi, pos);
  }
};

__device__ __forceinline__ size_t cache_row(const Task& t, int key) {
  const int b = t.arg0 / NKV, kvh = t.arg0 % NKV;
  return ((((size_t)t.layer * B + b) * NKV + kvh) * MAX_SEQ + key) * D;
}

// Online-softmax update of a warp's G query heads with up to KU keys (rows packed in registers): the
// KU x G scores are reduced across the warp independently of each other before the serial updates.
template <int KU>
__device__ __forceinline__ void attend_keys(const uint32_t (&kw)[KU][DW], const uint32_t (&vw)[KU][DW], int nk,
                                            const float* q, float* m, float* lsum, float (&acc)[G][DPL]) {
  const int lane = threadIdx.x % 32;
  float sc[KU][G];
#pragma unroll
  for (int u = 0; u < KU; ++u) {
    float kf[DPL];
    unpack_dims(kw[u], kf);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < DPL; ++j) s = fmaf(q[g * D + lane * DPL + j], kf[j], s);
      sc[u][g] = s;
    }
  }
#pragma unroll
  for (int u = 0; u < KU; ++u)
#pragma unroll
    for (int g = 0; g < G; ++g) sc[u][g] = warp_sum(sc[u][g]) * ATTN_SCALE;
#pragma unroll
  for (int u = 0; u < KU; ++u) {
    if (u >= nk) break;
    float vf[DPL];
    unpack_dims(vw[u], vf);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float mn = fmaxf(m[g], sc[u][g]);
      const float corr = expf(m[g] - mn), e = expf(sc[u][g] - mn);
      lsum[g] = lsum[g] * corr + e;
#pragma unroll
      for (int j = 0; j < DPL; ++j) acc[g][j] = acc[g][j] * corr + e * vf[j];
      m[g] = mn;
    }
  }
}

__device__ bool attention_task(const Params& p, const Task& t, const unsigned char* ring, uint64_t* full,
                               uint64_t* empty, uint32_t& it, float* sm, Deadline& dl) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = t.arg0 / NKV, kvh = t.arg0 % NKV, split = t.arg1, l = t.layer;
  const KeyRange kr(p, t);
  const int pos = kr.pos, n = pos + 1, chunk = kv_chunk(n), lo = kr.lo, hi = kr.hi;
  if (lo >= hi) return true;           // an inactive split: the combine never reads it
  float* q = sm;                       // G x D
  float* kn = q + G * D;               // D
  float* vn = kn + D;                  // D
  float* part = vn + D;                // NCW x G x (D + 2): per-warp o, m, l
  const T* qkv = p.qkv + ((size_t)l * B + b) * QKV;

  // rows 0..G-1: query heads of this group, G: the new key, G+1: the new value
  for (int row = warp; row < G + 2; row += NCW) {
    const T* src = row < G ? qkv + (kvh * G + row) * D
                 : row == G ? qkv + QSIZE + kvh * D : qkv + QSIZE + KVSIZE + kvh * D;
    float* tmp = part + warp * D;
    float vals[DPL];
#pragma unroll
    for (int j = 0; j < DPL; ++j) vals[j] = (lane + 32 * j < D) ? ld_act(src + lane + 32 * j) : 0.f;
    if (HAS_QK_NORM && row <= G) {
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
    if (row <= G) rope_row(tmp, dst, pos, p.inv_freq);
    __syncwarp();
  }
  consumer_sync();

  if (lo <= pos && pos < hi) {
    for (int d = threadIdx.x; d < D; d += NCT) {
      p.k_cache[cache_row(t, pos) + d] = from_f(kn[d]);
      p.v_cache[cache_row(t, pos) + d] = from_f(vn[d]);
    }
  }

  // The cached keys arrive through the ring, ATTN_KEYS a slot (K rows, then V rows). Each warp takes
  // every NCW-th key of a slot, KU at a time; lane l holds head dims [l * DPL, (l + 1) * DPL).
  constexpr int KU = 4;
  float m[G], lsum[G], acc[G][DPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY; lsum[g] = 0.f;
#pragma unroll
    for (int j = 0; j < DPL; ++j) acc[g][j] = 0.f;
  }
  uint32_t ok = 1;
  for (int k0 = lo; k0 < kr.old_hi; k0 += ATTN_KEYS) {
    const int nk = min(ATTN_KEYS, kr.old_hi - k0);
    const int slot = it % NST;
    if (ok) ok = wait_slot(&full[slot], (it / NST) & 1, dl);
    const T* ks = reinterpret_cast<const T*>(ring + (size_t)slot * SLOT_BYTES) + lane * DPL;
    const T* vs = ks + ATTN_KEYS * D;
    for (int j0 = warp; j0 < nk; j0 += NCW * KU) {
      uint32_t kw[KU][DW], vw[KU][DW];
#pragma unroll
      for (int u = 0; u < KU; ++u) {
        const int j = min(j0 + u * NCW, nk - 1);   // past the end: a valid row, never used
        ld_dims(ks + j * D, kw[u]);
        ld_dims(vs + j * D, vw[u]);
      }
      attend_keys<KU>(kw, vw, (nk - j0 + NCW - 1) / NCW, q, m, lsum, acc);
    }
    mbar_arrive(&empty[slot]);
    ++it;
  }
  if (lo <= pos && pos < hi && warp == (pos - lo) % NCW) {     // the new key, from shared memory
    uint32_t kw[1][DW], vw[1][DW];
    pack_dims(kn + lane * DPL, kw[0]);
    pack_dims(vn + lane * DPL, vw[0]);
    attend_keys<1>(kw, vw, 1, q, m, lsum, acc);
  }
  if (!consumer_all(ok)) return false;   // also: the prep rows in `part` are no longer read
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float* pw = part + (warp * G + g) * (D + 2);
#pragma unroll
    for (int j = 0; j < DPL; ++j) pw[lane * DPL + j] = acc[g][j];
    if (lane == 0) { pw[D] = m[g]; pw[D + 1] = lsum[g]; }
  }
  consumer_sync();
  const size_t slots = (((size_t)l * B + b) * NKV + kvh) * KV_SPLITS;   // this (layer, b, kv head)'s splits
  const size_t out = (slots + split) * G;
  for (int i = threadIdx.x; i < G * D; i += NCT) {
    const int g = i / D, d = i % D;
    float mx = -INFINITY;
    for (int w = 0; w < NCW; ++w) mx = fmaxf(mx, part[(w * G + g) * (D + 2) + D]);
    float o = 0.f, den = 0.f;
    if (mx != -INFINITY) {
      for (int w = 0; w < NCW; ++w) {
        const float* pw = part + (w * G + g) * (D + 2);
        if (pw[D] == -INFINITY) continue;
        const float c = expf(pw[D] - mx);
        o = fmaf(c, pw[d], o);
        den = fmaf(c, pw[D + 1], den);
      }
    }
    p.attn_o[(out + g) * D + d] = o;
    if (d == 0) { p.attn_m[out + g] = mx; p.attn_l[out + g] = den; }
  }

  // The last split of this (layer, b, kv head) to finish combines all of them (log-sum-exp) into the
  // attention output, so the O projection stages a plain vector instead of every block re-reading
  // every split's partials. atomicInc wraps the arrival count back to 0 for the next step.
  const int active = (n + chunk - 1) / chunk;
  volatile int* last = reinterpret_cast<volatile int*>(part);
  consumer_sync();                       // every partial store of this block precedes the fence below
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned old = atomicInc(p.attn_done + ((size_t)l * B + b) * NKV + kvh, (unsigned)(active - 1));
    __threadfence();
    *last = old == (unsigned)(active - 1);
  }
  consumer_sync();
  if (!*last) return true;
  // One warp per query head turns the splits' (m, l) into weights, lanes across splits (one L2 round
  // trip); then every output element sums its splits' partials, CU loads in flight at a time.
  float* cw = part + 1;                  // G x KV_SPLITS split weights, then G denominators
  float* den = cw + G * KV_SPLITS;
  for (int g = warp; g < G; g += NCW) {
    float ms[SPL], ls[SPL];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < SPL; ++j) {
      const int s = lane + 32 * j;
      ms[j] = s < active ? __ldcg(p.attn_m + (slots + s) * G + g) : -INFINITY;
      ls[j] = s < active ? __ldcg(p.attn_l + (slots + s) * G + g) : 0.f;
      mx = fmaxf(mx, ms[j]);
    }
    mx = warp_max(mx);
    float dsum = 0.f;
#pragma unroll
    for (int j = 0; j < SPL; ++j) {
      const float cs = ms[j] == -INFINITY ? 0.f : expf(ms[j] - mx);   // a split with no keys weighs nothing
      if (lane + 32 * j < KV_SPLITS) cw[g * KV_SPLITS + lane + 32 * j] = cs;
      dsum = fmaf(cs, ls[j], dsum);
    }
    dsum = warp_sum(dsum);
    if (lane == 0) den[g] = dsum;
  }
  consumer_sync();
  constexpr int CU = 8;
  T* dst = p.attn_out + ((size_t)l * B + b) * QSIZE + kvh * G * D;
  for (int i = threadIdx.x; i < G * D; i += NCT) {
    const int g = i / D, d = i % D;
    float num = 0.f;
    for (int s0 = 0; s0 < active; s0 += CU) {
      float o[CU];
#pragma unroll
      for (int u = 0; u < CU; ++u)
        o[u] = s0 + u < active ? __ldcg(p.attn_o + ((slots + s0 + u) * G + g) * D + d) : 0.f;
#pragma unroll
      for (int u = 0; u < CU; ++u) num = fmaf(cw[g * KV_SPLITS + min(s0 + u, KV_SPLITS - 1)], o[u], num);
    }
    dst[i] = from_f(num / den[g]);
  }
  return true;
}

}  // namespace mk
