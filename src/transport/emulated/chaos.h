// Chaos mode of the software NIC: every adversarial decision (how a WRITE is split, which chunk lands next,
// when the source is read, which QP runs, delays) is drawn from ONE seeded generator, so a failing schedule is
// reproduced by its seed. NCCL_MOE_EMU_CHAOS=<seed> turns it on (0 or unset: off; docs/environment.md).
//
// Determinism: in step() mode, the same seed and the same sequence of inputs (doorbells between the same steps,
// the same WQE bytes) give the same decisions and the same trace. With the executor thread, decisions are still
// drawn in a seeded order, but where the doorbells fall between steps depends on timing.
#pragma once

#include <cstdint>

namespace nccl_moe::emulated {

// splitmix64: tiny, fast, and the same sequence on every platform and standard library (unlike std::*_distribution).
class ChaosRng {
 public:
  explicit ChaosRng(uint64_t seed = 0) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n), n > 0 (the modulo bias is irrelevant for scheduling).
  uint64_t below(uint64_t n) { return next() % n; }
  // True with probability num / den.
  bool chance(uint32_t num, uint32_t den) { return below(den) < num; }

 private:
  uint64_t state_;
};

struct ChaosOptions {
  uint64_t seed = 0;              // 0 = chaos off: in-order execution, whole WRITEs, round-robin over QPs
  uint32_t max_chunks = 8;        // a WRITE is split into 1..max_chunks pieces (more when it exceeds the staging cap)
  uint32_t tail_first_pct = 30;   // % of multi-byte WRITEs whose last 1..8 bytes land before everything else
  uint32_t stall_pct = 5;         // % of actions after which the QP is stalled for a while
  uint32_t max_stall_steps = 16;  // step() mode: a stalled QP sits out up to this many steps
  uint32_t max_sleep_us = 20;     // executor thread: a stall also sleeps up to this long
};

// The seed NCCL_MOE_EMU_CHAOS asks for (0 = off; a malformed value warns and means off).
uint64_t chaosSeedFromEnvironment();

}  // namespace nccl_moe::emulated
