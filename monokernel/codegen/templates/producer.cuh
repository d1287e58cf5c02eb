// The producer warp's side of the decode step: it walks its block's tasks in the consumers' order and
// streams everything they read from HBM through the ring, weight chunks of the matrix-vector tasks and
// the K/V cache rows of the attention tasks (up to ATTN_KEYS keys a slot, K rows then V rows), held back
// only by free slots, never by activations.
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

// One ring chunk: n pieces of len bytes, piece i from global address src + i * src_stride to slot offset
// i * dst_stride (addresses as integers: the K and V pieces of a key range lie in different buffers).
struct Chunk {
  uint64_t src;
  int64_t src_stride;
  uint32_t dst_stride, len;
  int n;
  __device__ const void* piece(int i) const { return reinterpret_cast<const void*>(src + i * src_stride); }
};

// The block's ring chunks in the consumers' order. The producer runs two: one issues the copies, the
// other the L2 prefetches ahead of them.
struct ChunkWalk {
  const Params& p;
  int ti, t1, j = 0, nj = 0;
  uint32_t count = 0;                     // chunks returned so far
  Task t;
  const unsigned char* rows = nullptr;    // matrix-vector task: its first weight row
  uint32_t row_bytes = 0, seg_bytes = 0;
  int cr = 1, nseg = 1, lo = 0, old_hi = 0;
  __device__ ChunkWalk(const Params& p_, int t0, int t1_) : p(p_), ti(t0 - 1), t1(t1_) {}

  __device__ void start(const Task& task) {
    t = task;
    j = 0;
    nj = 0;
    if (t.op == OP_ATTN) {
      const KeyRange kr(p, t);
      lo = kr.lo;
      old_hi = kr.old_hi;
      if (old_hi > lo) nj = (old_hi - lo + ATTN_KEYS - 1) / ATTN_KEYS;
    } else if (is_gemv(t.op)) {
      rows = weight_rows(p, t, row_bytes, cr);
      if constexpr (MMA) {   // up to 8 rows x one K segment, each row its own copy into a row of the slot
        seg_bytes = min((uint32_t)MMA_KSEG * (uint32_t)sizeof(T), row_bytes);
        nseg = (row_bytes + seg_bytes - 1) / seg_bytes;
        nj = (t.arg1 + 7) / 8 * nseg;
      } else {
        nj = (t.arg1 + cr - 1) / cr;
      }
    }
  }

  __device__ bool next(Chunk& c) {
    while (j >= nj) {
      if (++ti >= t1) return false;
      start(p.tasks[ti]);
    }
    if (t.op == OP_ATTN) {
      const int k0 = lo + j * ATTN_KEYS;
      c.len = min(ATTN_KEYS, old_hi - k0) * D * (uint32_t)sizeof(T);
      c.n = 2;
      c.src = reinterpret_cast<uint64_t>(p.k_cache + cache_row(t, k0));
      c.src_stride = (int64_t)(reinterpret_cast<uint64_t>(p.v_cache) - reinterpret_cast<uint64_t>(p.k_cache));
      c.dst_stride = ATTN_KEYS * D * sizeof(T);
    } else if constexpr (MMA) {
      const int g0 = j / nseg * 8;
      const uint32_t k0 = j % nseg * seg_bytes;
      c.len = min(seg_bytes, row_bytes - k0);
      c.n = min(8, t.arg1 - g0);
      c.src = reinterpret_cast<uint64_t>(rows + (size_t)g0 * row_bytes + k0);
      c.src_stride = row_bytes;
      c.dst_stride = MMA_RSTRIDE;
    } else {
      const int r = j * cr;
      c.len = min(cr, t.arg1 - r) * row_bytes;
      c.n = 1;
      c.src = reinterpret_cast<uint64_t>(rows + (size_t)r * row_bytes);
      c.src_stride = 0;
      c.dst_stride = 0;
    }
    ++j;
    ++count;
    return true;
  }
};

__device__ __forceinline__ void prefetch_l2(const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}

// While the ring is full and the consumers wait at a counter (a phase boundary: HBM would idle), the
// chunks after the ring's are prefetched into L2, up to PREFETCH_AHEAD of them, so the copies that follow
// read L2. Only then: prefetching in the steady stream, where the producer is always waiting for a slot,
// cost bandwidth (perf note 5).
__device__ void producer(const Params& p, int t0, int t1, unsigned char* ring, uint64_t* full, uint64_t* empty,
                         const volatile int* consumers_waiting) {
  RingWriter rw(p, ring, full, empty);
  ChunkWalk fetch(p, t0, t1), ahead(p, t0, t1);
  Chunk c, a;
  while (fetch.next(c)) {
    unsigned char* dst = rw.claim(c.n * c.len, [&] {
      if constexpr (PREFETCH_AHEAD > 0) {
        if (!*consumers_waiting) return;
        while (ahead.count < fetch.count)                        // chunks already copied: skip
          if (!ahead.next(a)) return;
        while (ahead.count < fetch.count + PREFETCH_AHEAD && ahead.next(a))
          for (int i = 0; i < a.n; ++i) prefetch_l2(a.piece(i), a.len);
      }
    });
    if (!dst) return;
    for (int i = 0; i < c.n; ++i) rw.copy(dst + i * c.dst_stride, c.piece(i), c.len);
    rw.next();
  }
}

}  // namespace mk
