// One flash-decoding task: sequence b, kv head kvh, split s of the keys [0, pos]. It prepares the
// group's queries and the new key (q/k RMSNorm, RoPE with the reference's rounding points), appends
// the new K/V to the cache if its split holds position pos, and writes an unnormalised partial
// (o, running max m, sum l) per query head; the last split to finish combines them (a split that holds
// all of the sequence's keys writes the output itself). The key walk runs on CUDA cores (attend_rows)
// or, where a kv head has at most 8 query heads, on tensor cores (attend_rows_mma).
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


// Keys of an attention task: [lo, hi) of [0, pos]; [lo, old_hi) come from the cache (written by earlier
// steps), through the ring; row pos is this step's own. Producer and consumers compute the same range.
struct KeyRange {
  int lo, hi, old_hi, pos, chunk;
  KeyRange() = default;
  __device__ KeyRange(const Params& p, const Task& t) {
    pos = input_id(p.positions, t.arg0 / NKV, p.ids_i64 & 2);
    chunk = kv_chunk(pos + 1);
    lo = t.arg1 * chunk;
    hi = min(pos + 1, lo + chunk);
    old_hi = min(hi, pos);
  }
};

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

// Rounded rotary embedding of one head row held in `row` (float values of model-dtype numbers):
// out = rnd(rnd(x * cos) + rnd(rotate_half(x) * sin)).
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
    const float rot = d < D / 2 ? -row[d + D / 2] : row[d - D / 2];
    out[QUERY ? q_slot(d) : d] = rnd(rnd(row[d] * c) + rnd(rot * s));
  }
}

__device__ __forceinline__ size_t cache_row(const Task& t, int key) {
  const int b = t.arg0 / NKV, kvh = t.arg0 % NKV;
  return ((((size_t)t.layer * B + b) * NKV + kvh) * MAX_SEQ + key) * D;
}

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

__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ void mma_16808(float* d, uint32_t a0, uint32_t a1, uint32_t b0) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(b0));
  } else {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(b0));
  }
}

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

__device__ bool attention_task(const Params& p, const Task& t, const AttnPrologue& ap, RingReader& rd, float* sm) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = t.arg0 / NKV, kvh = t.arg0 % NKV, split = t.arg1, l = t.layer;
  const KeyRange& kr = ap.kr;
  const int pos = kr.pos, n = pos + 1, lo = kr.lo, hi = kr.hi;
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
    if (row < G) rope_row<true>(p, tmp, dst, ap);
    else if (row == G) rope_row<false>(p, tmp, dst, ap);
    __syncwarp();
  }
  consumer_sync();

  // The new key and value as cache rows: into the cache, and for warp 0 (the one that attends to them,
  // after the cached keys) into `part`, which nobody else touches before rd.all_ok() below.
  T* knt = reinterpret_cast<T*>(part);
  if (lo <= pos && pos < hi) {
    for (int d = threadIdx.x; d < D; d += NCT) {
      p.k_cache[cache_row(t, pos) + d] = from_f(kn[d]);
      p.v_cache[cache_row(t, pos) + d] = from_f(vn[d]);
    }
    if (warp == 0) {
      for (int d = lane; d < D; d += 32) { knt[d] = from_f(kn[d]); knt[D + d] = from_f(vn[d]); }
      __syncwarp();
    }
  }

  // The cached keys arrive through the ring, ATTN_KEYS a slot (K rows, then V rows); the new key and
  // value follow from shared memory, rounded to the model dtype like the cache copy.
  const bool own = lo <= pos && pos < hi && warp == 0;
  if constexpr (ATTN_MMA) {
    AttnMma a;
    attn_mma_init(a, q);
    for (int k0 = lo; k0 < kr.old_hi; k0 += ATTN_KEYS) {
      const T* ks = reinterpret_cast<const T*>(rd.wait());
      attend_rows_mma(ks, ks + ATTN_KEYS * D, min(ATTN_KEYS, kr.old_hi - k0), a, warp);
      rd.release();
    }
    if (own) attend_rows_mma(knt, knt + D, 1, a, 0);
    if (!rd.all_ok()) return false;   // also: the prep rows in `part` are no longer read
    attn_mma_partial(a, part, warp);
  } else {
    AttnAcc a;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      a.m[g] = -INFINITY; a.lsum[g] = 0.f;
#pragma unroll
      for (int j = 0; j < DPL; ++j) a.acc[g][j] = 0.f;
    }
    for (int k0 = lo; k0 < kr.old_hi; k0 += ATTN_KEYS) {
      const T* ks = reinterpret_cast<const T*>(rd.wait());
      attend_rows(ks, ks + ATTN_KEYS * D, min(ATTN_KEYS, kr.old_hi - k0), q, a);
      rd.release();
    }
    if (own) attend_rows(knt, knt + D, 1, q, a);
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
  }
  consumer_sync();
  const size_t slots = (((size_t)l * B + b) * NKV + kvh) * KV_SPLITS;   // this (layer, b, kv head)'s splits
  const size_t out = (slots + split) * G;
  // A sequence whose keys all fall in this split (short contexts, or one split a kv head) needs no combine:
  // its output is written here, and the arrival count, which wraps at `active`, stays 0.
  const int active = (n + kr.chunk - 1) / kr.chunk;
  T* dst = p.attn_out + ((size_t)l * B + b) * QSIZE + kvh * G * D;
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
    if (active == 1) {
      dst[i] = from_f(o / den);
      continue;
    }
    p.attn_o[(out + g) * D + d] = o;
    if (d == 0) { p.attn_m[out + g] = mx; p.attn_l[out + g] = den; }
  }
  if (active == 1) return true;

  // The last split of this (layer, b, kv head) to finish combines all of them (log-sum-exp) into the
  // attention output, so the O projection stages a plain vector instead of every block re-reading
  // every split's partials. The increment wraps the arrival count back to 0 for the next step.
  volatile int* last = reinterpret_cast<volatile int*>(part);
  consumer_sync();                       // every partial store of this block precedes the release below
  if (threadIdx.x == 0)
    *last = atom_inc_acq_rel(p.attn_done + ((size_t)l * B + b) * NKV + kvh, active - 1) == (uint32_t)(active - 1);
  consumer_sync();
  if (!*last) return true;
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
