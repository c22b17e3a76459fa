// Receive teams of the low-latency dispatch (dispatch.cu): which receive indices receive, and how a team shares
// one local expert's copy. Pure arithmetic, host and device (unit-tested in tests/unit/ll_teams_test.cc). A receive
// index is a block's place in the receive roles (dispatch.cu receive_index: counted from the grid's last block in
// a kernel that also sends, from block 0 in a receive-only kernel).
//
// When the grid has at least two receive indices per local expert (few local experts: 4 or more ranks at 288
// experts), local expert j is received by indices j + k * E_l, k < team <= kMaxTeam. Index j waits for the token
// counts, scans and places as it would alone, waits for the rows, then publishes the placement (expert_ready[j],
// after src_info is written); the other members wait on that local word only (not on the peers' counters: extra
// pollers there were measured slower), and member k's warp w copies the (row, piece) items k * kWarps + w,
// + team * kWarps, ... Otherwise (team 1) index b receives local experts b, b + grid, ... Every receiving index
// acks (its share of `receivers`).
#pragma once

#include <cuda_runtime.h>  // __host__ __device__ for host compilers too

namespace nccl_moe {
namespace ll {

constexpr int kMaxTeam = 8;

struct ReceiveTeams {
  int team;       // receive indices per local expert (1: no teams)
  int receivers;  // receive indices that receive and ack: [0, receivers)
};

__host__ __device__ __forceinline__ ReceiveTeams receive_teams(int num_local_experts, int grid) {
  const int E_l = num_local_experts;
  int team = E_l > 0 ? grid / E_l : 1;
  team = team < 2 ? 1 : (team > kMaxTeam ? kMaxTeam : team);
  ReceiveTeams t;
  t.team = team;
  t.receivers = team > 1 ? team * E_l : (E_l < grid ? (E_l > 0 ? E_l : 1) : grid);
  return t;
}

}  // namespace ll
}  // namespace nccl_moe
