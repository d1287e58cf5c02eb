#include "config.cuh"
#include "sync.cuh"
#include "step_check.cuh"
#include "ring.cuh"
#include "staging.cuh"
#include "gemv.cuh"
#include "gemv_mma.cuh"
#include "lm_head.cuh"
#include "attention.cuh"

// The whole decode step in one launch. Block i runs tasks [task_offsets[i], task_offsets[i+1]) of the
// table in order. Warp NCW is the producer: it walks the same tasks and streams every weight tile
// (and every attention task's KV rows) through the shared-memory ring, held back only by free slots,
// so the next op's (and the next layer's) bytes are in flight while the consumers still wait.
namespace mk {

__device__ __forceinline__ bool is_gemv(int op) {
  return op == OP_QKV || op == OP_OPROJ || op == OP_GATEUP || op == OP_DOWN || op == OP_LMHEAD;
}

template <int OP>
__device__ __forceinline__ void gemv_shape(int& chunk_rows, int& mma_pass) {
  chunk_rows = Gemv<OP>::CR;
  mma_pass = Gemv<OP>::SEG_MAJOR ? MMA_ROWS * Gemv<OP>::FC : MMA_ROWS;   // rows one pass over K covers (tensor cores)
}

// Weight rows of a task as one contiguous byte range (matrices are row-major, stacked over layers), and how
// the producer cuts them: rows per chunk; on the tensor-core path rows per pass over K, the stored bytes of a
// K segment and the row stride in the slot; for int4 on CUDA cores the rows' group scales (`srow` bytes a
// row, padded to 16; 0 for the others), which follow each chunk's codes in its slot (on tensor cores they
// ride inside each stored segment).
struct RowCut {
  const unsigned char* src;
  const unsigned char* scales;
  uint32_t row_bytes, srow, seg_bytes, rstride;
  int chunk_rows, mma_pass;
};

template <int OP>
__device__ __forceinline__ RowCut op_rows(const void* w, const ST* sc, const Task& t) {
  using G = Gemv<OP>;
  RowCut rc;
  gemv_shape<OP>(rc.chunk_rows, rc.mma_pass);
  rc.row_bytes = G::ROW_BYTES;
  rc.srow = G::SROW;
  rc.seg_bytes = G::SEG_BYTES;
  rc.rstride = G::RSTRIDE;
  const size_t first = (size_t)(OP == OP_LMHEAD ? 0 : t.layer) * G::ROWS + t.arg0;
  rc.scales = G::SROW ? reinterpret_cast<const unsigned char*>(sc) + first * G::SROW : nullptr;
  rc.src = reinterpret_cast<const unsigned char*>(w) + first * G::ROW_BYTES;
  return rc;
}

__device__ __forceinline__ RowCut weight_rows(const Params& p, const Task& t) {
  switch (t.op) {
    case OP_QKV: return op_rows<OP_QKV>(p.w_qkv, p.w_qkv_scale, t);
    case OP_OPROJ: return op_rows<OP_OPROJ>(p.w_o, p.w_o_scale, t);
    case OP_GATEUP: return op_rows<OP_GATEUP>(p.w_gu, p.w_gu_scale, t);
    case OP_DOWN: return op_rows<OP_DOWN>(p.w_down, p.w_down_scale, t);
    default: return op_rows<OP_LMHEAD>(p.lm_head, nullptr, t);
  }
}

// Walks the block's tasks in the consumers' order and streams everything they read from HBM through the
// ring: weight chunks of the matrix-vector tasks and the K/V cache rows of the attention tasks (up to
// ATTN_KEYS keys a slot, K rows then V rows). It is held back only by free slots, never by activations.
__device__ void producer(const Params& p, int t0, int t1, RingWriter& rw) {
  for (int ti = t0; ti < t1; ++ti) {
    const Task t = p.tasks[ti];
    if (t.op == OP_ATTN) {
      const KeyRange kr(p, t);
      for (int k0 = kr.lo; k0 < kr.old_hi; k0 += ATTN_KEYS, rw.next()) {
        const uint32_t bytes = min(ATTN_KEYS, kr.old_hi - k0) * D * (uint32_t)sizeof(T);
        unsigned char* dst = rw.claim(2 * bytes);
        if (!dst) return;
        rw.copy(dst, p.k_cache + cache_row(t, k0), bytes);
        rw.copy(dst + ATTN_KEYS * D * sizeof(T), p.v_cache + cache_row(t, k0), bytes);
      }
      continue;
    }
    if (!is_gemv(t.op)) continue;
    const RowCut rc = weight_rows(p, t);
    const uint32_t row_bytes = rc.row_bytes, srow = rc.srow;
    const int cr = rc.chunk_rows, pass = rc.mma_pass;
    const unsigned char* scales = rc.scales;
    const unsigned char* src = rc.src;
    if (MMA && (LMHEAD_MMA || t.op != OP_LMHEAD)) {
      // a chunk is up to 8 rows x one K segment, each row its own copy into a row of the slot; each pass of
      // `pass` rows walks K, segment by segment, over its row groups
      const uint32_t seg_bytes = rc.seg_bytes;
      for (int f0 = 0; f0 < t.arg1; f0 += pass) {
        const int f1 = min(f0 + pass, t.arg1);
        for (uint32_t k0 = 0; k0 < row_bytes; k0 += seg_bytes) {
          const uint32_t len = min(seg_bytes, row_bytes - k0);
          for (int g0 = f0; g0 < f1; g0 += MMA_ROWS, rw.next()) {
            const int nv = min(MMA_ROWS, f1 - g0);
            unsigned char* dst = rw.claim(nv * len);
            if (!dst) return;
            if (len == row_bytes && rc.rstride == row_bytes)   // the rows lie back to back in both: one copy
              rw.copy(dst, src + (size_t)g0 * row_bytes, nv * len);
            else
              for (int r = 0; r < nv; ++r) rw.copy(dst + r * rc.rstride, src + (size_t)(g0 + r) * row_bytes + k0, len);
          }
        }
      }
    } else {
      for (int r = 0; r < t.arg1; r += cr, rw.next()) {
        const int nr = min(cr, t.arg1 - r);
        const uint32_t bytes = nr * row_bytes;
        unsigned char* dst = rw.claim(bytes + nr * srow);
        if (!dst) return;
        rw.copy(dst, src + (size_t)r * row_bytes, bytes);
        if (srow) rw.copy(dst + cr * row_bytes, scales + (size_t)r * srow, nr * srow);   // int4: the group scales
      }
    }
  }
}

// Rows [LOOKAHEAD_SKIP_ROWS, + LOOKAHEAD_ROWS) of each gate/up tile in [arg0, arg0 + arg1) of the layer into
// L2 while the chain runs (a helper block's PREFETCH task), so the ring refills those tiles from L2 after it.
// Pieces taken tiles round-robin: if the issue runs late, every tile has its first pieces.
__device__ __forceinline__ void l2_lookahead(const Params& p, const Task& t) {
  using GU = Gemv<OP_GATEUP>;
  constexpr size_t RB = Gemv<OP_GATEUP>::ROW_BYTES;
  constexpr int PIECE = PREFETCH_PIECE, PIECES = (LOOKAHEAD_ROWS * RB + PIECE - 1) / PIECE;
  const unsigned char* w = reinterpret_cast<const unsigned char*>(p.w_gu) + (size_t)t.layer * GU::ROWS * RB;
  for (int i = threadIdx.x; i < PIECES * t.arg1; i += NCT) {
    const int r0 = (t.arg0 + i % t.arg1) * GU::TILE, n = min(GU::TILE, GU::ROWS - r0);
    const size_t lo = (r0 + min(n, LOOKAHEAD_SKIP_ROWS)) * RB + (size_t)(i / t.arg1) * PIECE;
    const size_t hi = (r0 + min(n, LOOKAHEAD_SKIP_ROWS + LOOKAHEAD_ROWS)) * RB;
    if (lo < hi) bulk_prefetch_l2(w + lo, (uint32_t)min((size_t)PIECE, hi - lo));
  }
}

// After a block's last LM-head tile, the weights of its first matrix-vector task of the next step (a layer-0
// QKV tile) into L2: the argmax, the launch gap and the embedding copy leave HBM idle, and the next step's
// first phase then reads L2 instead of waiting on HBM from a cold start. A lookahead helper, whose first task
// is a PREFETCH, prefetches nothing here.
__device__ __forceinline__ void next_step_lookahead(const Params& p, int t0, int t1) {
  for (int ti = t0; ti < t1; ++ti) {
    const Task t = p.tasks[ti];
    if (t.op == OP_EMBED) continue;
    if (!is_gemv(t.op)) return;
    const RowCut rc = weight_rows(p, t);
    const unsigned char* src = rc.src;
    const uint32_t bytes = rc.row_bytes * (uint32_t)t.arg1;
    for (uint32_t a = threadIdx.x * PREFETCH_PIECE; a < bytes; a += NCT * PREFETCH_PIECE)
      bulk_prefetch_l2(src + a, min(PREFETCH_PIECE, bytes - a));
    return;
  }
}

// The op's matrix-vector path, fixed when the kernel is generated.
template <int OP>
__device__ __forceinline__ bool gemv(const Params& p, const Task& t, const T* in, T* in_smem, RingReader& rd,
                                     float* sm) {
  if constexpr (Gemv<OP>::SEG_MAJOR) return gemv_mma_flush_task<OP>(p, t, in, in_smem, rd, sm);
  else if constexpr (MMA && (LMHEAD_MMA || OP != OP_LMHEAD)) return gemv_mma_task<OP>(p, t, in, rd, sm);
  else return gemv_task<OP>(p, t, in, rd, sm);
}

__device__ void consumer(const Params& p, int t0, int t1, unsigned char* smem, uint64_t* full, uint64_t* empty) {
  Deadline dl(p);
  RingReader rd(smem + RING_OFFSET, full, empty, dl);
  T* in_smem = reinterpret_cast<T*>(smem + INPUT_OFFSET);
  T* in_scratch = p.scratch + (size_t)blockIdx.x * B * SCRATCH_LEN;
  float* sm = reinterpret_cast<float*>(smem + SCRATCH_OFFSET);
  volatile int* abort_flag = reinterpret_cast<volatile int*>(smem + ABORT_FLAG_OFFSET);
  int staged = -1;                       // which (op, layer) input `in` holds
  if (p.profile && threadIdx.x == 0) {   // after the stamps: which SM ran this block
    uint32_t sm_id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm_id));
    p.profile[(size_t)p.task_offsets[gridDim.x] * PROFILE_STAMPS + blockIdx.x] = sm_id;
  }
  for (int ti = t0; ti < t1; ++ti) {
    const Task t = p.tasks[ti];
    uint64_t* prof = p.profile ? p.profile + (size_t)ti * PROFILE_STAMPS : nullptr;
    if (prof && threadIdx.x == 0) prof[0] = global_ns();
    AttnPrologue ap;   // needs no result of this step: before the wait where registers allow
    if (ATTN_PROLOGUE_EARLY && t.op == OP_ATTN) ap = AttnPrologue(p, t);
    if (t.wait_counter >= 0) {
      if (threadIdx.x == 0) {
        const bool ok = wait_counter(p.counters + t.wait_counter, p.epoch * (uint32_t)t.wait_count, dl);
        *abort_flag = ok ? 0 : 1;
      }
      consumer_sync();
      if (*abort_flag) return;
    }
    if (prof && threadIdx.x == 0) prof[1] = global_ns();
    if (!ATTN_PROLOGUE_EARLY && t.op == OP_ATTN) ap = AttnPrologue(p, t);
    const int l = t.layer;
    const int tag = t.op * (L + 1) + l;
    if (is_gemv(t.op) && tag != staged) {
      // RMSNorm ops share one placement (same K); a copy op that does not fit is read in place
      T* norm_in = Gemv<OP_QKV>::IN_SMEM ? in_smem : in_scratch;
      constexpr int NS = Gemv<OP_QKV>::IN_STRIDE;
      switch (t.op) {
        case OP_QKV: stage_rmsnorm(norm_in, NS, p.x + (size_t)l * B * H, p.attn_norm + (size_t)l * H, sm); break;
        case OP_OPROJ:
          if (Gemv<OP_OPROJ>::IN_SMEM) stage_copy(in_smem, INPUT_LEN, p.attn_out + (size_t)l * B * QSIZE, QSIZE);
          break;
        case OP_GATEUP: stage_rmsnorm(norm_in, NS, p.x_mid + (size_t)l * B * H, p.mlp_norm + (size_t)l * H, sm); break;
        case OP_DOWN:
          if (Gemv<OP_DOWN>::IN_SMEM) stage_copy(in_smem, INPUT_LEN, p.act + (size_t)l * B * ISIZE, ISIZE);
          break;
        default: stage_rmsnorm(norm_in, NS, p.x + (size_t)L * B * H, p.final_norm, sm); break;
      }
      staged = tag;
      consumer_sync();
    }
    bool ok = true;
    switch (t.op) {
      case OP_EMBED: {   // 16-byte vectors: an element per thread took B x H / NCT dependent round trips
        constexpr int NV = H / 8;
        for (int i = threadIdx.x; i < B * NV; i += NCT)
          reinterpret_cast<uint4*>(p.x)[i] = __ldg(reinterpret_cast<const uint4*>(p.embed + (size_t)input_id(p.tokens, i / NV, p.ids_i64 & 1) * H) + i % NV);
        break;
      }
      case OP_QKV: ok = gemv<OP_QKV>(p, t, input_rows<OP_QKV>(p, l, in_smem, in_scratch), in_smem, rd, sm); break;
      case OP_ATTN: ok = attention_task(p, t, ap, rd, sm); break;
      case OP_OPROJ: ok = gemv<OP_OPROJ>(p, t, input_rows<OP_OPROJ>(p, l, in_smem, in_scratch), in_smem, rd, sm); break;
      case OP_GATEUP: ok = gemv<OP_GATEUP>(p, t, input_rows<OP_GATEUP>(p, l, in_smem, in_scratch), in_smem, rd, sm); break;
      case OP_DOWN: ok = gemv<OP_DOWN>(p, t, input_rows<OP_DOWN>(p, l, in_smem, in_scratch), in_smem, rd, sm); break;
      case OP_LMHEAD:
        ok = gemv<OP_LMHEAD>(p, t, input_rows<OP_LMHEAD>(p, l, in_smem, in_scratch), in_smem, rd, sm);
        if (ok) lm_tile_max(p, t, sm);
        if (NEXT_STEP_LOOKAHEAD && ok && (ti + 1 == t1 || p.tasks[ti + 1].op != OP_LMHEAD)) next_step_lookahead(p, t0, t1);
        break;
      case OP_ARGMAX: final_argmax(p, t.wait_count, sm); break;
      case OP_PREFETCH: l2_lookahead(p, t); break;
    }
    if (!ok) return;   // all consumer threads see the same failed wait on the ring
    consumer_sync();   // every thread's writes of this task precede the signal
    if (threadIdx.x == 0 && t.signal_counter >= 0) red_release(p.counters + t.signal_counter, 1u);
    if (prof && threadIdx.x == 0) prof[2] = global_ns();
  }
}

}  // namespace mk

extern "C" __global__ void __launch_bounds__(mk::THREADS, 1) MK_KERNEL_NAME(const __grid_constant__ mk::Params p) {
  using namespace mk;
  extern __shared__ __align__(1024) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + FULL_BAR_OFFSET);
  uint64_t* empty = reinterpret_cast<uint64_t*>(smem + EMPTY_BAR_OFFSET);
  if (!step_may_run(p)) return;
  if (threadIdx.x == 0) {
    for (int s = 0; s < NST; ++s) { mbar_init(&full[s], 1); mbar_init(&empty[s], NCT); }
    mbar_init_fence();
  }
  __syncthreads();
  const int t0 = p.task_offsets[blockIdx.x], t1 = p.task_offsets[blockIdx.x + 1];
  if (threadIdx.x / 32 == NCW) {
    if (threadIdx.x % 32 == 0) {
      RingWriter rw(p, smem + RING_OFFSET, full, empty);
      producer(p, t0, t1, rw);
      rw.drain();   // a block that stopped early must not exit under copies still landing in its memory
    }
    return;
  }
  consumer(p, t0, t1, smem, full, empty);
}
