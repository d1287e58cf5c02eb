// The whole decode step in one launch. Block i runs tasks [task_offsets[i], task_offsets[i+1]) of the
// table in order. Warp NCW is the producer: it walks the same tasks and streams every weight tile
// through the shared-memory ring, held back only by free slots, so the next op's (and the next
// layer's) weights are in flight while the consumers still wait on activations.
namespace mk {

__device__ __forceinline__ bool is_gemv(int op) {
  return op == OP_QKV || op == OP_OPROJ || op == OP_GATEUP || op == OP_DOWN || op == OP_LMHEAD;
}

// Weight rows of a task as one contiguous byte range (matrices are row-major, stacked over layers).
__device__ __forceinline__ const unsigned char* weight_rows(const Params& p, const Task& t, uint32_t& row_bytes, int& chunk_rows) {
  const T* base;
  int k;
  switch (t.op) {
    case OP_QKV: base = p.w_qkv + (size_t)t.layer * QKV * H; k = H; chunk_rows = Gemv<OP_QKV>::CR; break;
    case OP_OPROJ: base = p.w_o + (size_t)t.layer * H * QSIZE; k = QSIZE; chunk_rows = Gemv<OP_OPROJ>::CR; break;
    case OP_GATEUP: base = p.w_gu + (size_t)t.layer * 2 * ISIZE * H; k = H; chunk_rows = Gemv<OP_GATEUP>::CR; break;
    case OP_DOWN: base = p.w_down + (size_t)t.layer * H * ISIZE; k = ISIZE; chunk_rows = Gemv<OP_DOWN>::CR; break;
    default: base = p.lm_head; k = H; chunk_rows = Gemv<OP_LMHEAD>::CR; break;
  }
  row_bytes = k * sizeof(T);
  return reinterpret_cast<const unsigned char*>(base) + (size_t)t.arg0 * row_bytes;
}

// Walks a block's tasks in the order the consumers read them, one byte range at a time: every ring
// chunk of weight rows and, for an L2 prefetch only, the K and V cache rows of each attention task.
struct ChunkCursor {
  int ti, t1, part = 0;       // part: rows already walked of a matrix task, or K/V of an attention task
  __device__ ChunkCursor(int t0, int t1_) : ti(t0), t1(t1_) {}
  // false once the task list is exhausted; to_ring: weights for the ring, else KV rows to prefetch
  __device__ bool next(const Params& p, const unsigned char*& src, uint32_t& bytes, bool& to_ring) {
    for (; ti < t1; ++ti, part = 0) {
      const Task t = p.tasks[ti];
      if (is_gemv(t.op) && part < t.arg1) {
        uint32_t row_bytes;
        int cr;
        src = weight_rows(p, t, row_bytes, cr) + (size_t)part * row_bytes;
        bytes = min(cr, t.arg1 - part) * row_bytes;
        part += cr;
        to_ring = true;
        return true;
      }
      if (t.op == OP_ATTN && part < 2) {
        const int b = t.arg0 / NKV, kvh = t.arg0 % NKV;
        const int pos = __ldg(p.positions + b);     // the cache holds rows [0, pos); row pos is this step's
        const int chunk = kv_chunk(pos + 1), lo = t.arg1 * chunk, hi = min(pos, lo + chunk);
        const T* cache = part++ == 0 ? p.k_cache : p.v_cache;
        if (lo < hi) {
          src = reinterpret_cast<const unsigned char*>(cache + ((((size_t)t.layer * B + b) * NKV + kvh) * MAX_SEQ + lo) * D);
          bytes = (hi - lo) * D * sizeof(T);
          to_ring = false;
          return true;
        }
      }
    }
    return false;
  }
};

// Tensor-core path: a chunk is up to MMA_ROWS rows x one K segment, each row its own bulk copy into a
// row of the slot (MMA_RSTRIDE apart); the consumers walk row groups, then segments, in the same order.
__device__ void producer_mma(const Params& p, int t0, int t1, unsigned char* ring, uint64_t* full, uint64_t* empty) {
  Deadline dl(p);
  uint32_t it = 0;
  for (int ti = t0; ti < t1; ++ti) {
    const Task t = p.tasks[ti];
    if (!is_gemv(t.op)) continue;
    uint32_t row_bytes;
    int cr;
    const unsigned char* src = weight_rows(p, t, row_bytes, cr);
    const uint32_t seg_bytes = min((uint32_t)MMA_KSEG * (uint32_t)sizeof(T), row_bytes);
    for (int g0 = 0; g0 < t.arg1; g0 += 8) {
      const int nv = min(8, t.arg1 - g0);
      for (uint32_t k0 = 0; k0 < row_bytes; k0 += seg_bytes, ++it) {
        const uint32_t len = min(seg_bytes, row_bytes - k0);
        const int slot = it % NST;
        while (!mbar_try_wait(&empty[slot], ((it / NST) & 1) ^ 1))
          if (!dl.alive(ERR_RING_TIMEOUT)) return;
        mbar_arrive_expect_tx(&full[slot], nv * len);
        for (int r = 0; r < nv; ++r)
          bulk_copy_g2s(ring + (size_t)slot * SLOT_BYTES + r * MMA_RSTRIDE, src + (size_t)(g0 + r) * row_bytes + k0, len, &full[slot]);
      }
    }
  }
}

__device__ void producer(const Params& p, int t0, int t1, unsigned char* ring, uint64_t* full, uint64_t* empty) {
  if constexpr (MMA) { producer_mma(p, t0, t1, ring, full, empty); return; }
  Deadline dl(p);
  ChunkCursor cur(t0, t1);
  uint32_t it = 0;
  const unsigned char* src;
  uint32_t bytes;
  bool to_ring;
  while (cur.next(p, src, bytes, to_ring)) {
    if (!to_ring) {
      // KV rows of an attention task this block reaches once the ring's chunks before it are consumed:
      // warming L2 now turns the task's dependent loads into L2 hits.
      if (PREFETCH_KV) l2_prefetch(src, bytes);
      continue;
    }
    const int slot = it % NST;
    // the slot's previous contents (use it - NST) must have been released by every consumer thread
    while (!mbar_try_wait(&empty[slot], ((it / NST) & 1) ^ 1))
      if (!dl.alive(ERR_RING_TIMEOUT)) return;
    mbar_arrive_expect_tx(&full[slot], bytes);
    bulk_copy_g2s(ring + (size_t)slot * SLOT_BYTES, src, bytes, &full[slot]);
    ++it;
  }
}

__device__ void consumer(const Params& p, int t0, int t1, unsigned char* smem, uint64_t* full, uint64_t* empty) {
  Deadline dl(p);
  const unsigned char* ring = smem + RING_OFFSET;
  T* in_smem = reinterpret_cast<T*>(smem + INPUT_OFFSET);
  T* in_scratch = p.scratch + (size_t)blockIdx.x * B * SCRATCH_LEN;
  float* sm = reinterpret_cast<float*>(smem + SCRATCH_OFFSET);
  volatile int* abort_flag = reinterpret_cast<volatile int*>(smem + 512);
  uint32_t it = 0;
  int staged = -1;                       // which (op, layer) input `in` holds
  for (int ti = t0; ti < t1; ++ti) {
    const Task t = p.tasks[ti];
    uint64_t* prof = p.profile ? p.profile + (size_t)ti * 3 : nullptr;
    if (prof && threadIdx.x == 0) prof[0] = global_ns();
    if (t.wait_counter >= 0) {
      if (threadIdx.x == 0) {
        const bool ok = wait_counter(p.counters + t.wait_counter, p.epoch * (uint32_t)t.wait_count, dl);
        __threadfence();
        *abort_flag = ok ? 0 : 1;
      }
      consumer_sync();
      if (*abort_flag) return;
    }
    if (prof && threadIdx.x == 0) prof[1] = global_ns();
    const int l = t.layer;
    const int tag = t.op * (L + 1) + l;
    if (is_gemv(t.op) && tag != staged) {
      // RMSNorm ops share one placement (same K); a copy op that does not fit is read in place
      T* norm_in = Gemv<OP_QKV>::IN_SMEM ? in_smem : in_scratch;
      constexpr int NS = Gemv<OP_QKV>::IN_STRIDE;
      switch (t.op) {
        case OP_QKV: stage_rmsnorm(norm_in, NS, p.x + (size_t)l * B * H, p.attn_norm + (size_t)l * H, H, sm); break;
        case OP_OPROJ:
          if (Gemv<OP_OPROJ>::IN_SMEM) stage_copy(in_smem, INPUT_LEN, p.attn_out + (size_t)l * B * QSIZE, QSIZE);
          break;
        case OP_GATEUP: stage_rmsnorm(norm_in, NS, p.x_mid + (size_t)l * B * H, p.mlp_norm + (size_t)l * H, H, sm); break;
        case OP_DOWN:
          if (Gemv<OP_DOWN>::IN_SMEM) stage_copy(in_smem, INPUT_LEN, p.act + (size_t)l * B * ISIZE, ISIZE);
          break;
        default: stage_rmsnorm(norm_in, NS, p.x + (size_t)L * B * H, p.final_norm, H, sm); break;
      }
      staged = tag;
      consumer_sync();
    }
    bool ok = true;
    switch (t.op) {
      case OP_EMBED:
        for (int i = threadIdx.x; i < B * H; i += NCT)
          p.x[i] = p.embed[(size_t)p.tokens[i / H] * H + i % H];
        break;
      case OP_QKV: ok = gemv<OP_QKV>(p, t, input_rows<OP_QKV>(p, l, in_smem, in_scratch), ring, full, empty, it, sm, dl); break;
      case OP_ATTN: ok = attention_task(p, t, sm); break;
      case OP_OPROJ: ok = gemv<OP_OPROJ>(p, t, input_rows<OP_OPROJ>(p, l, in_smem, in_scratch), ring, full, empty, it, sm, dl); break;
      case OP_GATEUP: ok = gemv<OP_GATEUP>(p, t, input_rows<OP_GATEUP>(p, l, in_smem, in_scratch), ring, full, empty, it, sm, dl); break;
      case OP_DOWN: ok = gemv<OP_DOWN>(p, t, input_rows<OP_DOWN>(p, l, in_smem, in_scratch), ring, full, empty, it, sm, dl); break;
      case OP_LMHEAD:
        ok = gemv<OP_LMHEAD>(p, t, input_rows<OP_LMHEAD>(p, l, in_smem, in_scratch), ring, full, empty, it, sm, dl);
        if (ok) lm_tile_max(p, t);
        break;
      case OP_ARGMAX: final_argmax(p, t.wait_count); break;
    }
    if (!ok) return;   // all consumer threads see the same failed wait on the ring
    consumer_sync();   // every thread's writes of this task precede the signal
    if (threadIdx.x == 0 && t.signal_counter >= 0) {
      __threadfence();
      red_release(p.counters + t.signal_counter, 1u);
    }
    if (prof && threadIdx.x == 0) prof[2] = global_ns();
  }
}

}  // namespace mk

extern "C" __global__ void __launch_bounds__(mk::THREADS, 1) monokernel_decode_step(const __grid_constant__ mk::Params p) {
  using namespace mk;
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem);
  uint64_t* empty = full + NST;
  if (threadIdx.x == 0) {
    for (int s = 0; s < NST; ++s) { mbar_init(&full[s], 1); mbar_init(&empty[s], NCT); }
    mbar_init_fence();
  }
  __syncthreads();
  const int t0 = p.task_offsets[blockIdx.x], t1 = p.task_offsets[blockIdx.x + 1];
  if (threadIdx.x / 32 == NCW) {
    if (threadIdx.x % 32 == 0) producer(p, t0, t1, smem + RING_OFFSET, full, empty);
    return;
  }
  consumer(p, t0, t1, smem, full, empty);
}
