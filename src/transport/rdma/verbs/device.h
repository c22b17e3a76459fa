// The verbs backend's device: which RDMA NIC and port a rank uses, its identity on the fabric (link layer, LID, GID
// index and GID, MTU, atomic limits), and the opened context with its protection domain. Memory registration is
// memory.h, QPs rc_qp.h.
//
// Contract
//   - rdma-core is reached through the loader's tables only (loader.h): Device::open takes an IbvApi (and an
//     Mlx5Api for the mlx5 check), so unit tests hand it a table of fakes (tests/unit/verbs_device_test.cc).
//   - The choices are pure functions on plain inputs, tested without a NIC:
//       NIC   NCCL_MOE_IB_HCA when set (NCCL's syntax, a subset: one device, "mlx5_0" or "mlx5_0:1", an optional
//             leading '=' (the match is always exact); lists ',' and exclusions '^' are refused); else the NIC
//             hwloc pairs with the GPU (topo::pairGpusWithNics: PCI distance); else, when the topology pairs none
//             or pairs one verbs does not list, the first device verbs lists (logged as such).
//       port  the override's port, which must be ACTIVE; else the first ACTIVE port.
//       GID   NCCL_MOE_IB_GID_INDEX, else NCCL_IB_GID_INDEX (-1 = choose); InfiniBand: index 0 (used only with a
//             GRH); RoCE: the first RoCE v2 GID holding an IPv4 address (::ffff:a.b.c.d), else the first RoCE v2
//             GID; none: an error asking for NCCL_MOE_IB_GID_INDEX. GID types come from sysfs
//             (<sysfs_root>/<dev>/ports/<port>/gid_attrs/types/<index>), as NCCL reads them.
//   - Every failing verbs call is an ncclSystemError whose message names the call, the device (and port) and the
//     errno text (verbsFailure below). Device::open frees what it created before returning an error.
//   - Teardown (destructor): the PD is deallocated, then the device closed. Everything registered or created on it
//     (MemoryRegion, RcQp) must be destroyed first; Device counts them and a destructor that finds some logs a
//     WARN and leaks the context rather than closing it under them.
#pragma once

#include <infiniband/verbs.h>
#include <nccl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "transport/rdma/conn_record.h"
#include "transport/rdma/verbs/gpu_mapping.h"
#include "transport/rdma/verbs/loader.h"
#include "transport/rdma/verbs/qp_attr.h"

namespace nccl_moe::topo {
struct Topology;
}

namespace nccl_moe::verbs {

// "<call> failed on <where>: <strerror(err)> (errno <err>)<detail>" recorded with setLastError; ncclSystemError.
ncclResult_t verbsFailure(const char* call, const std::string& where, int err, const std::string& detail = "");

// ---- NCCL_MOE_IB_HCA ----
struct HcaOverride {
  bool set = false;
  std::string device;  // exact verbs device name
  int port = 0;        // 0: any active port
};
// "" -> not set. Errors (ncclInvalidArgument) name the variable and the accepted syntax.
ncclResult_t parseIbHca(const std::string& text, HcaOverride* out);

// ---- NIC, port and GID choice (pure) ----
struct NicChoice {
  int device_idx = -1;  // into the verbs device list
  std::string name;
  int port = 0;        // from the override, else 0 (choose the first active)
  std::string reason;  // for the INFO line
};
// `devices`: the verbs device names in list order. `topology` may be null; `gpu_idx` indexes topology->gpus.
ncclResult_t chooseNic(const std::vector<std::string>& devices, const topo::Topology* topology, int gpu_idx,
                       const HcaOverride& hca, NicChoice* out);

// `ports[i]` is port i + 1. `wanted` 0: the first ACTIVE one.
ncclResult_t choosePort(const std::string& device, const std::vector<ibv_port_attr>& ports, int wanted, int* port);

struct GidEntry {
  uint8_t raw[16] = {};
  std::string type;  // sysfs text: "RoCE v2", "IB/RoCE v1"; "" unknown
};
// `table[i]` is GID index i of the port. *source names what decided ("NCCL_MOE_IB_GID_INDEX", "RoCE v2 IPv4", ...).
ncclResult_t chooseGidIndex(const std::string& device, int port, LinkLayer link_layer, const EnvLookup& env,
                            const std::vector<GidEntry>& table, int* index, std::string* source);

// What a rank's connection record says about its NIC and port, and what its QPs need.
struct PortIdentity {
  std::string name;
  uint64_t node_guid = 0;  // host order
  uint8_t port = 0;
  LinkLayer link_layer = LinkLayer::kInfiniBand;
  ibv_mtu active_mtu = IBV_MTU_4096;
  uint16_t lid = 0;
  uint8_t gid_index = 0;
  uint8_t gid[16] = {};
  uint8_t max_rd_atomic = 1;       // max_qp_init_rd_atom of the device (requester side), 1..255
  uint8_t max_dest_rd_atomic = 1;  // max_qp_rd_atom (responder side), 1..255
  uint32_t max_qp_wr = 0;
  int32_t max_cqe = 0;
};
// The NIC fields of a connection record (name, GUID, port, link layer, MTU, GID index, LID, GID).
void fillConnRecordIdentity(const PortIdentity& id, rdma::ConnRecord* record);

struct DeviceOptions {
  EnvLookup env = processEnvLookup;
  const topo::Topology* topology = nullptr;  // the GPU's pairing; null: the first device (or the override)
  int gpu_idx = -1;
  std::string sysfs_root = "/sys/class/infiniband";
  const CudaOps* cuda = nullptr;  // null: CudaOps::runtime()
  bool require_mlx5 = true;       // the GPU-initiated path needs mlx5 direct verbs
};

class Device {
 public:
  // Lists the devices, chooses one (above), opens it, checks it (mlx5, atomics), queries device and port, picks
  // the GID and allocates the PD. Logs the choice at INFO.
  static ncclResult_t open(const IbvApi& ibv, const Mlx5Api* mlx5, const DeviceOptions& options,
                           std::unique_ptr<Device>* out);
  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  const PortIdentity& identity() const { return id_; }
  const std::string& name() const { return id_.name; }
  std::string where() const;  // "mlx5_0 port 1" for messages
  const IbvApi& ibv() const { return api_; }
  const Mlx5Api* mlx5() const { return dv_; }
  const CudaOps& cuda() const { return *cuda_; }
  HostMapper& mapper() { return *mapper_; }
  ibv_context* context() const { return context_; }
  ibv_pd* pd() const { return pd_; }

  // Bookkeeping of objects created on this device (memory.h, rc_qp.h): the destructor refuses to close under them.
  void retain() { ++children_; }
  void release() { --children_; }

 private:
  Device(const IbvApi& ibv, const Mlx5Api* mlx5, const CudaOps& cuda);
  const IbvApi& api_;
  const Mlx5Api* dv_;
  const CudaOps* cuda_;
  std::unique_ptr<HostMapper> mapper_;
  ibv_context* context_ = nullptr;
  ibv_pd* pd_ = nullptr;
  PortIdentity id_;
  int children_ = 0;
};

}  // namespace nccl_moe::verbs
