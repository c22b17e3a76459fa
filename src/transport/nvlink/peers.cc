#include "transport/nvlink/peers.h"

#include <unistd.h>

#include <mutex>
#include <set>
#include <utility>

#include "core/error.h"

namespace nccl_moe {
namespace {

// Peer access is a property of the device's context, shared by every communicator of the process: enable each
// (device, peer) pair once, so repeated inits neither fail nor leave "already enabled" errors behind (which
// compute-sanitizer and cudaGetLastError users would see).
ncclResult_t enablePeerAccessOnce(int device, int peer_dev) {
  static std::mutex mutex;
  static std::set<std::pair<int, int>> enabled;
  std::lock_guard<std::mutex> lock(mutex);
  if (enabled.count({device, peer_dev}) != 0) return ncclSuccess;
  cudaError_t err = cudaDeviceEnablePeerAccess(peer_dev, 0);
  if (err == cudaErrorPeerAccessAlreadyEnabled) {
    cudaGetLastError();  // enabled by someone else (NCCL, the application): fine
  } else if (err != cudaSuccess) {
    return setLastError(ncclUnhandledCudaError, "cudaDeviceEnablePeerAccess(%d) on device %d failed: %s", peer_dev,
                        device, cudaGetErrorString(err));
  }
  enabled.insert({device, peer_dev});
  return ncclSuccess;
}

}  // namespace

ncclResult_t mapNvlinkPeers(int device, const NvlinkBufferRecord* records, int num_local, int self, uint8_t* own,
                            NvlinkPeers* peers) {
  peers->num_local = num_local;
  const int pid = getpid();
  for (int i = 0; i < num_local; ++i) {
    const NvlinkBufferRecord& rec = records[i];
    if (i == self) {
      peers->buffer[i] = own;
    } else if (rec.pid == pid) {
      int peer_dev = -1;
      MOE_CUDA_CHECK(cudaDeviceGetByPCIBusId(&peer_dev, rec.bus_id));
      if (peer_dev != device) {
        int can = 0;
        MOE_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, device, peer_dev));
        if (!can) {
          return setLastError(ncclSystemError,
                              "ncclMoeCommInit: device %d cannot access peer device %d (local rank %d) over "
                              "NVLink/PCIe peer-to-peer",
                              device, peer_dev, i);
        }
        MOE_CHECK(enablePeerAccessOnce(device, peer_dev));
      }
      peers->buffer[i] = reinterpret_cast<uint8_t*>(rec.addr);
    } else {
      void* ptr = nullptr;
      const cudaError_t err = cudaIpcOpenMemHandle(&ptr, rec.ipc, cudaIpcMemLazyEnablePeerAccess);
      if (err != cudaSuccess) {
        return setLastError(ncclUnhandledCudaError,
                            "ncclMoeCommInit: cudaIpcOpenMemHandle of local rank %d's buffer (pid %d) failed: %s", i,
                            rec.pid, cudaGetErrorString(err));
      }
      peers->buffer[i] = static_cast<uint8_t*>(ptr);
      peers->via_ipc[i] = true;
    }
  }
  return ncclSuccess;
}

void unmapNvlinkPeers(NvlinkPeers* peers) {
  for (int i = 0; i < kMaxNvlPeers; ++i) {
    if (peers->via_ipc[i] && peers->buffer[i] != nullptr) cudaIpcCloseMemHandle(peers->buffer[i]);
    peers->buffer[i] = nullptr;
    peers->via_ipc[i] = false;
  }
  peers->num_local = 0;
}

}  // namespace nccl_moe
