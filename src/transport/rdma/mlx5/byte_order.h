// Big-endian field types for the mlx5 work-queue and completion structures, and the MOE_HD qualifier that lets
// every header in src/transport/rdma/mlx5/ compile as CUDA device code (nvcc) and as plain C++ (g++, no CUDA).
//
// The NIC reads every multi-byte WQE/CQE field big-endian. Be16/Be32/Be64 hold the value in that memory order, so
// a field can only be written through to_be*() and read through from_be(): a host-order value assigned to a BE
// field does not compile. Hosts and GPUs this library runs on are little-endian (checked below).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__
#else
#define MOE_HD
#endif

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the mlx5 encoders assume a little-endian host");

namespace nccl_moe::mlx5 {

MOE_HD constexpr uint16_t byte_swap16(uint16_t v) { return static_cast<uint16_t>((v >> 8) | (v << 8)); }
MOE_HD constexpr uint32_t byte_swap32(uint32_t v) {
  return (v >> 24) | ((v >> 8) & 0x0000ff00u) | ((v << 8) & 0x00ff0000u) | (v << 24);
}
MOE_HD constexpr uint64_t byte_swap64(uint64_t v) {
  return (static_cast<uint64_t>(byte_swap32(static_cast<uint32_t>(v))) << 32) |
         byte_swap32(static_cast<uint32_t>(v >> 32));
}

// `raw` is what a little-endian load of the field's bytes returns; the NIC sees the value big-endian.
struct Be16 {
  uint16_t raw;
};
struct Be32 {
  uint32_t raw;
};
struct Be64 {
  uint64_t raw;
};
static_assert(sizeof(Be16) == 2 && alignof(Be16) == 2, "Be16 must have the layout of a uint16_t");
static_assert(sizeof(Be32) == 4 && alignof(Be32) == 4, "Be32 must have the layout of a uint32_t");
static_assert(sizeof(Be64) == 8 && alignof(Be64) == 8, "Be64 must have the layout of a uint64_t");

MOE_HD constexpr Be16 to_be16(uint16_t v) { return Be16{byte_swap16(v)}; }
MOE_HD constexpr Be32 to_be32(uint32_t v) { return Be32{byte_swap32(v)}; }
MOE_HD constexpr Be64 to_be64(uint64_t v) { return Be64{byte_swap64(v)}; }
MOE_HD constexpr uint16_t from_be(Be16 v) { return byte_swap16(v.raw); }
MOE_HD constexpr uint32_t from_be(Be32 v) { return byte_swap32(v.raw); }
MOE_HD constexpr uint64_t from_be(Be64 v) { return byte_swap64(v.raw); }

// Reads of fields that are not naturally aligned (bytes 9..10 of the control segment) or straight from bytes.
MOE_HD constexpr uint16_t load_be16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }
MOE_HD constexpr uint32_t load_be32(const uint8_t* p) {
  return (static_cast<uint32_t>(p[0]) << 24) | (static_cast<uint32_t>(p[1]) << 16) |
         (static_cast<uint32_t>(p[2]) << 8) | p[3];
}

}  // namespace nccl_moe::mlx5
