#pragma once
#include "argmax.cuh"
#include "config.cuh"
#include "numerics.cuh"
#include "sampling.cuh"
#include "staging.cuh"

// Top-k / top-p sampling in the LM head; monokernel/gumbel.py defines the draw, schedule/candidates.py follows
// these steps in numpy. A row that asks for either keeps, per tile, its first TOP_CAND ranks as 64-bit keys
// (the logit's order-preserving bits above the complemented index: one unsigned comparison ranks by logit,
// then by the smaller index, and no key is 0, which means "none"). The final task merges the tiles' keys
// into the vocabulary's first TOP_CAND ranks (each of those ranks at least as high in its own tile, so its
// tile kept it), cuts top-k and top-p there and takes the Gumbel argmax over what is kept. What that cannot
// make exact (top_k > TOP_CAND, or top-p alone with a nucleus past TOP_CAND ranks) sets Params::host_draw,
// and the host draws the row from the logits.
namespace mk {

constexpr int KEEP_CAP = 2 * TOP_CAND;   // a warp's buffer: the kept TOP_CAND and room for a pass of 32 more
constexpr int KPL = KEEP_CAP / 32;       // keys a lane holds while the warp sorts the buffer
static_assert(TOP_CAND >= 32 && (KEEP_CAP & (KEEP_CAP - 1)) == 0, "TOP_CAND: 32 times a power of two");
static_assert(SCRATCH_OFFSET % 8 == 0 && SMEM_BYTES - SCRATCH_OFFSET >= NCW * KEEP_CAP * 8,
              "the scratch holds every warp's keys (schedule.layout)");

// The row's restriction: k 0 = no top-k (also for k >= V, which restricts nothing), p 1 = no top-p; `mass`:
// top-p over the whole vocabulary, which needs the tiles' exp sums for its normaliser.
struct Filter {
  int k;
  float p;
  bool mass;
};

__device__ __forceinline__ Filter make_filter(const uint32_t* words, int b) {
  const uint32_t flags = __ldg(words + SAMPLE_WORDS * b);
  const uint4 w = __ldg(reinterpret_cast<const uint4*>(words + SAMPLE_WORDS * b) + 1);   // top_k, top_p, 0, 0
  const int k = (flags & FLAG_TOP_K) && (int)w.x < V ? (int)w.x : 0;
  const float tp = (flags & FLAG_TOP_P) ? __uint_as_float(w.y) : 1.f;
  return {k, tp, k == 0 && tp < 1.f};
}

__device__ __forceinline__ uint64_t rank_key(float logit, int idx) {
  uint32_t u = __float_as_uint(logit == 0.f ? 0.f : logit);   // -0.0 ranks as 0.0, as the model compares
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (uint64_t)u << 32 | (uint32_t)~idx;
}

__device__ __forceinline__ float key_logit(uint64_t key) {
  const uint32_t u = (uint32_t)(key >> 32);
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

__device__ __forceinline__ int key_index(uint64_t key) { return (int)~(uint32_t)key; }

// Bitonic sort, descending, of the warp's 32 x N keys: element lane + 32 * s in k[s]. Strides of 32 and more
// pair a lane's own registers; shorter ones pair lanes through shuffles.
template <int N>
__device__ __forceinline__ void warp_sort_desc(uint64_t (&k)[N], int lane) {
#pragma unroll
  for (int size = 2; size <= 32 * N; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      if (stride >= 32) {
        const int ss = stride / 32;
#pragma unroll
        for (int s = 0; s < N; ++s) {
          if (s & ss) continue;
          const bool desc = ((32 * s) & size) == 0;   // lane < 32 <= stride < size: the slot decides
          const uint64_t a = k[s], c = k[s | ss];
          if (desc ? a < c : a > c) { k[s] = c; k[s | ss] = a; }
        }
      } else {
#pragma unroll
        for (int s = 0; s < N; ++s) {
          const uint64_t o = __shfl_xor_sync(0xffffffffu, k[s], stride);
          const bool desc = ((lane + 32 * s) & size) == 0, lower = (lane & stride) == 0;
          const bool take_max = lower == desc;
          k[s] = take_max ? (o > k[s] ? o : k[s]) : (o < k[s] ? o : k[s]);
        }
      }
    }
  }
}

// Sorts a warp's n buffered keys and keeps the first TOP_CAND; returns the TOP_CAND-th, the new threshold. Not
// inlined: a push's fast path (a ballot and an append) is unrolled many times over, the sort runs 2-3 times a row.
__device__ __noinline__ uint64_t shrink_keys(uint64_t* buf, int n, int lane);

// A warp's first TOP_CAND of the keys it pushes, in its shared-memory buffer: a key above `thr` (the TOP_CAND-th
// kept at the last shrink, 0 before any) is appended; a push that would overflow first sorts the buffer and
// keeps TOP_CAND. Which keys end up kept does not depend on the order they are pushed in (a key at or below
// `thr` has TOP_CAND keys above it), so callers push in whatever order their loads arrive. Warp-uniform calls.
struct Keep {
  uint64_t* buf;
  int n;
  uint64_t thr;

  __device__ __forceinline__ void sorted(uint64_t (&k)[KPL], int lane) const {
    __syncwarp();   // the lanes' appends are visible
#pragma unroll
    for (int s = 0; s < KPL; ++s) k[s] = lane + 32 * s < n ? buf[lane + 32 * s] : 0ull;
    warp_sort_desc(k, lane);
  }

  // One key a lane (0: none); true when any lane's key was kept.
  __device__ __forceinline__ bool push(uint64_t key, int lane) {
    unsigned m = __ballot_sync(0xffffffffu, key > thr);
    if (!m) return false;
    if (n + __popc(m) > KEEP_CAP) {
      thr = shrink_keys(buf, n, lane);
      n = TOP_CAND;
      m = __ballot_sync(0xffffffffu, key > thr);
    }
    if (key > thr) buf[n + __popc(m & ((1u << lane) - 1u))] = key;
    n += __popc(m);
    return m != 0;
  }
};

__device__ __noinline__ uint64_t shrink_keys(uint64_t* buf, int n, int lane) {
  uint64_t k[KPL];
  Keep{buf, n, 0ull}.sorted(k, lane);
  __syncwarp();   // every lane read the buffer before any lane overwrites it
#pragma unroll
  for (int s = 0; s < KPL / 2; ++s) buf[lane + 32 * s] = k[s];
  return __shfl_sync(0xffffffffu, k[KPL / 2 - 1], 31);
}

// Loads a round issues before it pushes any of them. Each load that waits for the one before costs an L2 round
// trip, and at the end of a step those are slow: the other blocks are streaming the LM head or the next step's
// weights (perf note 38). Tile side: logits a lane loads at once (8: four rounds for a 972-row tile, against 31
// before). Final side: tiles a lane loads at once (5: the 132 tiles of one LM-head tile a block in one round),
// each MERGE_DEPTHS consecutive ranks in one 16-byte load (16-byte aligned: j is even, a list is 512 bytes).
// More of either costs the kernel registers around the calls: 4 ranks spilled 48 bytes at 1B batch 3 under 8
// warps' 168, 16 logits left none spare there (168 of 168).
constexpr int KEEP_LOADS = 8;
constexpr int MERGE_TILES = 5;
constexpr int MERGE_DEPTHS = 2;
static_assert(TOP_CAND % MERGE_DEPTHS == 0 && MERGE_DEPTHS % 2 == 0, "ranks are loaded in pairs, whole rounds");

// Tile side, for row b of a top-k/top-p sequence and the tile's rows [row0, row0 + rows): its first TOP_CAND keys
// into Params::lm_cand and, for top-p alone, its sum of exp((logit - tile max) / T) into lm_sum. One warp;
// `buf`: its KEEP_CAP keys. Not inlined, nor final_filtered: inlined, the kernel spilled at 3B batch 8 and 8B
// batch 1 (88 and 8 bytes under the 168-register cap); as calls they take their own registers, and only a
// row that asks for top-k/top-p pays the call.
__device__ __noinline__ void lm_tile_keep(const Params& p, int row0, int rows, int tile, int b, float inv_t,
                                          uint64_t* buf) {
  const int lane = threadIdx.x % 32;
  const float* row = p.logits + (size_t)b * V + row0;
  __syncwarp();   // the warp's last reads of the buffer (a row before) precede these appends
  Keep kp{buf, 0, 0ull};
  for (int r0 = 0; r0 < rows; r0 += 32 * KEEP_LOADS) {
    float v[KEEP_LOADS];
#pragma unroll
    for (int g = 0; g < KEEP_LOADS; ++g) {
      const int r = r0 + 32 * g + lane;
      v[g] = r < rows ? row[r] : 0.f;
    }
#pragma unroll
    for (int g = 0; g < KEEP_LOADS; ++g) {
      const int r = r0 + 32 * g + lane;
      if (r0 + 32 * g < rows) kp.push(r < rows ? rank_key(v[g], row0 + r) : 0ull, lane);   // warp-uniform
    }
  }
  uint64_t k[KPL];
  kp.sorted(k, lane);
  uint64_t* out = p.lm_cand + ((size_t)tile * B + b) * TOP_CAND;
#pragma unroll
  for (int s = 0; s < KPL / 2; ++s) out[lane + 32 * s] = k[s];
  if (make_filter(p.sampling, b).mass) {
    const float top = key_logit(__shfl_sync(0xffffffffu, k[0], 0));
    float sum = 0.f;
    for (int r = lane; r < rows; r += 32) sum += __expf((row[r] - top) * inv_t);
    sum = warp_sum(sum);
    if (lane == 0) p.lm_sum[tile * B + b] = sum;
  }
}

// Final side, for row b: merge, cut, draw; writes the token and the host_draw flag. One warp.
__device__ __noinline__ void final_filtered(const Params& p, int num_tiles, int b, uint64_t* buf) {
  const int lane = threadIdx.x % 32;
  const Sampler sp = make_sampler(p.sampling, b, input_id(p.positions, b, p.ids_i64 & 2));
  const Filter f = make_filter(p.sampling, b);
  const uint64_t* cand = p.lm_cand + (size_t)b * TOP_CAND;   // tile t's depth j at [(t * B) * TOP_CAND + j]
  // top-p alone: the vocabulary's normaliser from the tiles' (max, sum), rescaled to the largest max (the
  // top logit) as it goes; first, so its registers are free before the merge's
  float zmax = -INFINITY, z = 0.f;
  if (f.mass) {
#pragma unroll 1
    for (int tile = lane; tile < num_tiles; tile += 32) {
      const float m = key_logit(__ldcg(cand + (size_t)tile * B * TOP_CAND)), sum = __ldcg(p.lm_sum + tile * B + b);
      if (m > zmax) { z = z * __expf((zmax - m) * sp.inv_t) + sum; zmax = m; }
      else z += sum * __expf((m - zmax) * sp.inv_t);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float om = __shfl_xor_sync(0xffffffffu, zmax, o), oz = __shfl_xor_sync(0xffffffffu, z, o);
      const float hi = fmaxf(zmax, om);
      z = (zmax == -INFINITY ? 0.f : z * __expf((zmax - hi) * sp.inv_t)) +
          (om == -INFINITY ? 0.f : oz * __expf((om - hi) * sp.inv_t));
      zmax = hi;
    }
  }
  __syncwarp();
  // Rounds of MERGE_DEPTHS ranks of every tile, all loaded before any is pushed. Each tile's keys descend, so a
  // tile whose last key of a round was not kept has nothing deeper to offer, and once no tile's was, nothing
  // deeper beats what is kept (the threshold only rises).
  Keep kp{buf, 0, 0ull};
  for (int j = 0; j < TOP_CAND; j += MERGE_DEPTHS) {
    bool deeper = false;
    for (int t0 = 0; t0 < num_tiles; t0 += 32 * MERGE_TILES) {
      uint64_t key[MERGE_TILES][MERGE_DEPTHS];
#pragma unroll
      for (int u = 0; u < MERGE_TILES; ++u) {
        const int tile = t0 + 32 * u + lane;
        const ulonglong2* src = reinterpret_cast<const ulonglong2*>(cand + (size_t)tile * B * TOP_CAND + j);
#pragma unroll
        for (int d = 0; d < MERGE_DEPTHS; d += 2) {
          const ulonglong2 two = tile < num_tiles ? __ldcg(src + d / 2) : make_ulonglong2(0ull, 0ull);
          key[u][d] = two.x;
          key[u][d + 1] = two.y;
        }
      }
#pragma unroll
      for (int d = 0; d < MERGE_DEPTHS; ++d) {
#pragma unroll
        for (int u = 0; u < MERGE_TILES; ++u) {
          if (t0 + 32 * u >= num_tiles) continue;   // warp-uniform: no lane has such a tile
          const bool kept = kp.push(key[u][d], lane);
          if (d == MERGE_DEPTHS - 1) deeper |= kept;
        }
      }
    }
    if (!deeper) break;
  }
  constexpr int NR = KPL / 2;   // ranks a lane holds: rank lane + 32 * s in k[s]
  uint64_t k[KPL];
  kp.sorted(k, lane);
  const float top = key_logit(__shfl_sync(0xffffffffu, k[0], 0));
  float before[NR], total = 0.f;   // each rank's mass before it; the mass of the ranks kept by top-k
#pragma unroll
  for (int s = 0; s < NR; ++s) {
    const int r = lane + 32 * s;
    float e = k[s] && (f.k == 0 || r < f.k) ? __expf((key_logit(k[s]) - top) * sp.inv_t) : 0.f;
    float incl = e;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float x = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += x;
    }
    const float excl = __shfl_up_sync(0xffffffffu, incl, 1);
    before[s] = total + (lane ? excl : 0.f);
    total += __shfl_sync(0xffffffffu, incl, 31);
  }
  // top-k (with or without top-p): the kept top-k ranks are the normaliser; top-p alone: z, relative to zmax,
  // the largest tile maximum, which is `top`
  const float cut = f.p * (f.mass ? z : total);
  float best = -INFINITY;
  int idx = 0x7fffffff;
#pragma unroll
  for (int s = 0; s < NR; ++s) {
    const int r = lane + 32 * s;
    if (k[s] && (f.k == 0 || r < f.k) && (f.p >= 1.f || before[s] < cut)) {
      const int i = key_index(k[s]);
      const float v = gumbel_score(sp, key_logit(k[s]), i);
      if (v > best || (v == best && i < idx)) { best = v; idx = i; }
    }
  }
  const int token = warp_argmax(idx, best).idx;
  // top_k > TOP_CAND, a nucleus past the candidates, or flags that restrict nothing (top_k >= V): the host draws
  const bool host = f.k > TOP_CAND || (f.k == 0 && V > TOP_CAND && (f.p >= 1.f || total < cut));
  if (lane == 0) {
    p.out_tokens[b] = token;
    p.host_draw[b] = host ? 1 : 0;
  }
}

}  // namespace mk
