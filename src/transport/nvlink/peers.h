// The nvlink transport's host side: maps the communication buffer of every rank of the own node into this
// process, by local index. How depends on where the peer is:
//   same process, same GPU     its pointer as is (ranks sharing a GPU in an ncclMoeCommInitAll world)
//   same process, other GPU    its pointer, after peer access is enabled (once per device pair and process)
//   other process              CUDA IPC (cudaIpcOpenMemHandle; also for another process on the same GPU)
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>

#include "device/limits.h"

namespace nccl_moe {

// What every rank publishes about its buffer (all-gathered at init).
struct NvlinkBufferRecord {
  int pid;
  int device;
  char bus_id[32];
  cudaIpcMemHandle_t ipc;
  uint64_t addr;  // the buffer's address in its own process
};

struct NvlinkPeers {
  int num_local = 0;
  uint8_t* buffer[kMaxNvlPeers] = {};  // [local index] the peer's buffer as mapped here (own included)
  bool via_ipc[kMaxNvlPeers] = {};     // opened with cudaIpcOpenMemHandle (closed by unmapNvlinkPeers)
};

// Maps the buffers of the node's ranks (records[i] = local rank i; `self` = this rank's local index, its own
// buffer `own`) on `device`. On failure, what was mapped stays recorded for unmapNvlinkPeers.
ncclResult_t mapNvlinkPeers(int device, const NvlinkBufferRecord* records, int num_local, int self, uint8_t* own,
                            NvlinkPeers* peers);
void unmapNvlinkPeers(NvlinkPeers* peers);

}  // namespace nccl_moe
