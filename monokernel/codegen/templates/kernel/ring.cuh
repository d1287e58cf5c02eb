#pragma once
#include "config.cuh"
#include "sync.cuh"

// The weight ring between a block's producer warp and its consumer warps: NST shared-memory slots, each
// with a full and an empty mbarrier.
namespace mk {

// The producer's side of the ring: claims the next slot once every consumer thread has released its
// previous contents (use it - NST), announces the bytes, and issues the bulk copies into it.
struct RingWriter {
  unsigned char* ring;
  uint64_t* full;
  uint64_t* empty;
  uint32_t it = 0;
  Deadline dl;
  __device__ RingWriter(const Params& p, unsigned char* r, uint64_t* f, uint64_t* e) : ring(r), full(f), empty(e), dl(p) {}
  // the claimed slot's address, or null after a timeout
  __device__ unsigned char* claim(uint32_t bytes) {
    const int slot = it % NST;
    while (!mbar_try_wait(&empty[slot], ((it / NST) & 1) ^ 1))
      if (!dl.alive(ERR_RING_TIMEOUT)) return nullptr;
    mbar_arrive_expect_tx(&full[slot], bytes);
    return ring + (size_t)slot * SLOT_BYTES;
  }
  __device__ void copy(unsigned char* dst, const void* src, uint32_t bytes) { bulk_copy_g2s(dst, src, bytes, &full[it % NST]); }
  __device__ void next() { ++it; }
  // Waits until every copy issued lands: the fills of the last NST slots (older ones were consumed). Copies
  // of valid addresses always complete, so this needs no deadline.
  __device__ void drain() {
    for (uint32_t j = it > NST ? it - NST : 0; j < it; ++j)
      while (!mbar_try_wait(&full[j % NST], (j / NST) & 1)) {}
  }
};

// The consumers' side of the ring: every consumer thread waits for the slot it reads next and releases it
// after its own last read (the slot's empty barrier counts NCT arrivals). After a timed-out wait `ok` is
// 0 for good; a task then ends at its next all_ok(), where every consumer thread agrees to stop.
struct RingReader {
  const unsigned char* ring;
  uint64_t* full;
  uint64_t* empty;
  Deadline* dl;
  uint32_t it = 0;
  uint32_t ok = 1;
  __device__ RingReader(const unsigned char* r, uint64_t* f, uint64_t* e, Deadline& d) : ring(r), full(f), empty(e), dl(&d) {}
  __device__ const unsigned char* wait() {
    const uint32_t slot = it % NST;
    if (ok) ok = wait_slot(&full[slot], (it / NST) & 1, *dl);
    return ring + (size_t)slot * SLOT_BYTES;
  }
  __device__ void release() {
    mbar_arrive(&empty[it % NST]);
    ++it;
  }
  __device__ bool all_ok() { return consumer_all(ok); }   // also a consumer barrier
};

}  // namespace mk
