#pragma once
#include "config.cuh"

// Synchronisation primitives: mbarriers and bulk async copies for the weight ring (within a block),
// acquire/release counters for dependencies between blocks, and a timeout that turns a would-be hang
// into an error code the host reports.
namespace mk {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
  return done != 0;
}

// One contiguous global -> shared copy by the bulk copy engine, completing on `bar`.
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}

// Bytes global -> L2 by the bulk copy engine, nothing waits on it: a hint that fills idle HBM time. Callers
// issue PREFETCH_PIECE bytes at a time, so that many threads share a long range.
constexpr uint32_t PREFETCH_PIECE = 16384;
__device__ __forceinline__ void bulk_prefetch_l2(const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}

// 16 bytes global -> shared without a register round trip (cached in L2 only: the source was written by
// other blocks this step), and the wait for all of this thread's such copies.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;" ::: "memory");
}

__device__ __forceinline__ uint32_t ld_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// A block's writes reach other blocks through one of these: the writing threads meet at a block barrier,
// then one thread releases (barriers order memory among the block's threads, and a release at gpu scope
// carries what its thread has observed), and the reader's one thread acquires before its block barrier.
// No separate fence is needed on either side.
__device__ __forceinline__ void red_release(uint32_t* p, uint32_t v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// atomicInc (wraps to 0 past `limit`) with acquire and release at gpu scope: the arrival that publishes
// this block's partial results is also the one that sees every earlier arrival's.
__device__ __forceinline__ uint32_t atom_inc_acq_rel(uint32_t* p, uint32_t limit) {
  uint32_t old;
  asm volatile("atom.acq_rel.gpu.global.inc.u32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(limit) : "memory");
  return old;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Spin guard: true while waiting may go on. Past the deadline, or once another block has failed,
// it records the error and tells the caller to give up, so every block drains and the launch ends.
struct Deadline {
  uint64_t end;
  int* error;
  uint32_t polls = 0;
  __device__ Deadline(const Params& p) : end(p.timeout_ns ? global_ns() + p.timeout_ns : ~0ull), error(p.error) {}
  __device__ __forceinline__ bool alive(int code) {
    if ((++polls & 63u) != 0) return true;
    if (*reinterpret_cast<volatile int*>(error) != ERR_NONE) return false;
    if (global_ns() > end) { atomicCAS(error, ERR_NONE, code); return false; }
    return true;
  }
};

__device__ __forceinline__ void consumer_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(NCT) : "memory");
}

// One consumer thread waits for a ring slot to fill; false if it gave up (see consumer_all).
__device__ __forceinline__ bool wait_slot(uint64_t* bar, uint32_t parity, Deadline& dl) {
  while (!mbar_try_wait(bar, parity))
    if (!dl.alive(ERR_RING_TIMEOUT)) return false;
  return true;
}

// Consumer barrier that also ANDs `ok` over all consumer threads: after a timed-out wait every thread
// agrees to stop, so none is left at a barrier that the others have left.
__device__ __forceinline__ bool consumer_all(uint32_t ok) {
  uint32_t all;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.u32 p, %1, 0;\n bar.red.and.pred p, 1, %2, p;\n selp.u32 %0, 1, 0, p;\n}"
      : "=r"(all) : "r"(ok), "n"(NCT) : "memory");
  return all != 0;
}

// Counters count up across steps: a wait for `count` signals in step `epoch` waits for epoch * count.
// The signed difference keeps the comparison right when the 32-bit counter wraps.
__device__ __forceinline__ bool wait_counter(const uint32_t* ctr, uint32_t target, Deadline& dl) {
  while (static_cast<int32_t>(ld_acquire(ctr) - target) < 0) {
    __nanosleep(64);
    if (!dl.alive(ERR_COUNTER_TIMEOUT)) return false;
  }
  return true;
}

}  // namespace mk
