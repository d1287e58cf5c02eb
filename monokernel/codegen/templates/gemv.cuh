// Consumer side of a matrix-vector task: rows [t.arg0, t.arg0 + t.arg1) of one weight matrix arrive
// through the ring, CR rows per slot, in the order the producer issued them. Each warp takes one
// (row, K-segment) unit at a time; WPR warps share a row when a slot holds fewer rows than warps.
namespace mk {

// Per-row results in the model dtype where the reference rounds, then the op's own epilogue.
template <int OP>
__device__ __forceinline__ void epilogue(const Params& p, const Task& t, int row, int b, const float* res_row, int stride) {
  constexpr int WPR = Gemv<OP>::WPR;
  float v = 0.f;
#pragma unroll
  for (int s = 0; s < WPR; ++s) v += res_row[s * stride];
  const int l = t.layer;
  if constexpr (OP == OP_QKV) {
    if constexpr (HAS_QKV_BIAS) v += to_f(p.b_qkv[(size_t)l * QKV + row]);
    p.qkv[((size_t)l * B + b) * QKV + row] = from_f(v);
  } else if constexpr (OP == OP_OPROJ) {
    const size_t i = ((size_t)l * B + b) * H + row;
    p.x_mid[i] = from_f(ld_act(p.x + i) + rnd(v));
  } else if constexpr (OP == OP_DOWN) {
    const size_t i = ((size_t)l * B + b) * H + row;
    p.x[i + (size_t)B * H] = from_f(ld_act(p.x_mid + i) + rnd(v));
  } else if constexpr (OP == OP_LMHEAD) {
    p.logits[(size_t)b * V + row] = rnd(v);
  }
}

template <int OP>
__device__ bool gemv_task(const Params& p, const Task& t, const T* in, const unsigned char* ring,
                          uint64_t* full, uint64_t* empty, uint32_t& it, float* res, Deadline& dl) {
  constexpr int K = Gemv<OP>::K, CR = Gemv<OP>::CR, WPR = Gemv<OP>::WPR, FC = Gemv<OP>::FC;
  constexpr int KV8 = K / 8;                       // 16-byte vectors per row
  constexpr int SEG = (KV8 + WPR - 1) / WPR;       // vectors per K-segment
  constexpr int RR = CR * FC;                      // rows whose results one epilogue writes
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t ok = 1;
  for (int f0 = 0; f0 < t.arg1; f0 += RR) {
    const int fr = min(RR, t.arg1 - f0);
    // No block barrier per chunk: each warp takes its units of a slot as soon as the slot is full and
    // releases it after its own reads, so warps drift apart by up to a slot and the ring drains at the
    // speed of the shared-memory reads, not of barrier round trips.
    for (int r0 = 0; r0 < fr; r0 += CR) {
      const int nr = min(CR, fr - r0);
      const int slot = it % NST;
      if (ok) ok = wait_slot(&full[slot], (it / NST) & 1, dl);
      const uint4* w = reinterpret_cast<const uint4*>(ring + (size_t)slot * SLOT_BYTES);
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
          for (int b = 0; b < B; ++b)
            acc[b] = dot8(wv, reinterpret_cast<const uint4*>(in + b * INPUT_LEN)[v], acc[b]);
        }
#pragma unroll
        for (int b = 0; b < B; ++b) {
          const float s = warp_sum(acc[b]);
          if (lane == 0) res[(seg * RR + r0 + row) * B + b] = s;
        }
      }
      mbar_arrive(&empty[slot]);     // every consumer thread releases the slot after its own last read
      ++it;
    }
    if (!consumer_all(ok)) return false;   // also: every warp's results are in `res`
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
        const int row = (t.arg0 + f0) / 2 + pr;
        p.act[((size_t)t.layer * B + b) * ISIZE + row] = from_f(rnd(silu(rnd(g))) * rnd(up));
      }
    } else {
      for (int i = threadIdx.x; i < fr * B; i += NCT) {
        const int row = i / B, b = i % B;
        epilogue<OP>(p, t, t.arg0 + f0 + row, b, res + row * B + b, RR * B);
      }
    }
    consumer_sync();                       // `res` is free again
  }
  return true;
}

// Per-tile (max, first index) of the logits this block just wrote, one warp per sequence.
__device__ void lm_tile_max(const Params& p, const Task& t) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b = warp; b < B; b += NCW) {
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int r = lane; r < t.arg1; r += 32) {
      const float v = p.logits[(size_t)b * V + t.arg0 + r];
      if (v > best) { best = v; idx = t.arg0 + r; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
      if (ob > best || (ob == best && oi < idx)) { best = ob; idx = oi; }
    }
    if (lane == 0) {
      p.lm_max[t.tile * B + b] = best;
      p.lm_idx[t.tile * B + b] = idx;
    }
  }
}

// Final argmax over the tiles' maxima; ties go to the smallest vocabulary index, as torch.argmax.
__device__ void final_argmax(const Params& p, int num_tiles) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b = warp; b < B; b += NCW) {
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = lane; i < num_tiles; i += 32) {
      const float v = __ldcg(p.lm_max + i * B + b);
      const int vi = __ldcg(p.lm_idx + i * B + b);
      if (v > best || (v == best && vi < idx)) { best = v; idx = vi; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
      if (ob > best || (ob == best && oi < idx)) { best = ob; idx = oi; }
    }
    if (lane == 0) p.out_tokens[b] = idx;
  }
}

}  // namespace mk
