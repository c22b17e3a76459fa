// Topology discovery (hwloc 2.x): NUMA nodes and their CPUs, the GPUs the caller names by PCI bus id, the RDMA
// NICs (hwloc OpenFabrics OS devices such as mlx5_0), and for every GPU the nearest NIC and the CPUs local to it.
//
// Contract
//   - Nothing here calls CUDA. The caller passes GPU PCI bus ids as strings (from cudaDeviceGetPCIBusId, any case,
//     4- or 8-digit domain, or no domain). A bus id hwloc does not list is reported as "not found", not an error.
//   - Every entry point returns an ncclResult_t; on failure the message is recorded with setLastError()
//     (src/core/error.h). Nothing aborts. A machine without GPUs or NICs is a normal result.
//   - The pairing rules (PCI distance, nearest NIC, tie-breaking) are pure functions on the plain structs below so
//     they can be tested with synthetic bus hierarchies; discover() only translates hwloc objects into them.
//   - PCI distance classes, nearest first (NCCL calls them PIX/PXB, PHB, NODE, SYS):
//       kSameSwitch     the two devices share at least one PCI-to-PCI bridge (a PCIe switch or one root port)
//       kSameHostBridge they share only the host bridge (root complex)
//       kSameNuma       different host bridges hanging off the same CPU-side locality (NUMA node)
//       kCrossNuma      different NUMA nodes (traffic crosses the CPU interconnect)
//     Inside one class fewer PCI hops (bridges crossed from one device to the other) is nearer; the remaining
//     ties go to the lower NIC index (the hwloc enumeration order, i.e. mlx5_0 before mlx5_1).
//   - cpusets are hwloc list strings ("0-15,32-47"); they only hold CPUs this process may use (hwloc drops
//     the others by default).
#pragma once

#include <nccl.h>

#include <cstdint>
#include <string>
#include <vector>

namespace nccl_moe::topo {

// One PCI address domain:bus:device.function.
struct PciBusId {
  uint32_t domain = 0;
  uint32_t bus = 0;
  uint32_t dev = 0;
  uint32_t func = 0;
  bool operator==(const PciBusId& o) const {
    return domain == o.domain && bus == o.bus && dev == o.dev && func == o.func;
  }
};

// Parses "0000:1b:00.0", "00000000:1B:00.0" (CUDA's form) or "1b:00.0" (domain 0). Returns false on anything else.
bool parsePciBusId(const std::string& text, PciBusId* out);
// Canonical lower-case form "0000:1b:00.0".
std::string formatPciBusId(const PciBusId& id);

// One bridge on the way from the CPU side down to a device.
struct PciBridge {
  uint64_t id = 0;           // unique per bridge in one topology (hwloc gp_index; any unique number in tests)
  bool host_bridge = false;  // the root complex (hwloc upstream type "host"); PCI-to-PCI bridges are false
};

// Where a PCI device sits: the CPU-side object it hangs off and the bridges from there down to its parent.
struct PciLocation {
  int numa_idx = -1;               // OS index of the NUMA node it is local to; -1 unknown or several
  uint64_t locality_id = 0;        // id of the CPU-side (non-I/O) ancestor; devices under one object share it
  std::vector<PciBridge> bridges;  // outermost (host bridge) first, the device's direct parent last
};

enum class PathType : int {
  kSameSwitch = 0,
  kSameHostBridge = 1,
  kSameNuma = 2,
  kCrossNuma = 3,
};
const char* pathTypeName(PathType type);  // "same PCIe switch", "same host bridge", "same NUMA node", "cross NUMA"

struct PciDistance {
  PathType type = PathType::kCrossNuma;
  int hops = 0;  // bridges on the path between the two devices (the common ancestors counted once)
  // Strict "nearer than": class first, then hops.
  bool operator<(const PciDistance& o) const {
    return type != o.type ? static_cast<int>(type) < static_cast<int>(o.type) : hops < o.hops;
  }
};

// Distance between two PCI devices (symmetric).
PciDistance pciDistance(const PciLocation& a, const PciLocation& b);

// Index of the nearest candidate to `from`, ties to the lower index; -1 when `candidates` is empty.
// `distance` (optional) receives the winner's distance.
int nearestIndex(const PciLocation& from, const std::vector<PciLocation>& candidates, PciDistance* distance);

struct NumaNode {
  int os_index = -1;
  std::string cpuset;  // CPUs of this node ("0-15"); empty for a CPU-less (memory-only) node
  int num_cpus = 0;
  uint64_t memory_bytes = 0;  // local memory hwloc reports (0 when unknown)
};

struct Nic {
  std::string name;    // verbs device name, e.g. "mlx5_0"
  std::string bus_id;  // canonical PCI bus id, empty when hwloc does not know it
  int num_ports = -1;  // ports hwloc reports (from its Port<N>State infos); -1 unknown
  PciLocation location;
  std::string cpuset;  // CPUs local to the NIC
};

struct Gpu {
  std::string bus_id;            // as given by the caller
  bool found = false;            // hwloc lists a PCI device with this bus id
  std::string canonical_bus_id;  // "0000:1b:00.0" when the input parsed, else empty
  uint16_t vendor_id = 0;        // from hwloc when found (0x10de for NVIDIA)
  uint16_t device_id = 0;
  uint16_t class_id = 0;  // 0x0302 3D controller, 0x0300 VGA
  PciLocation location;
  std::string cpuset;        // CPUs local to the GPU (its CPU-side ancestor's cpuset); empty when not found
  int nic_idx = -1;          // index into Topology::nics of the nearest NIC; -1 none
  PciDistance nic_distance;  // valid when nic_idx >= 0
};

struct Topology {
  std::string source;         // "this machine" or "xml"
  std::string hwloc_version;  // runtime library version, e.g. "2.9.0"
  int num_packages = 0;
  int num_cores = 0;
  int num_cpus = 0;    // processing units (hardware threads) this process may use
  std::string cpuset;  // all of them
  std::vector<NumaNode> numa_nodes;
  std::vector<Gpu> gpus;  // in the order of the bus ids passed to discover()
  std::vector<Nic> nics;  // RDMA NICs in hwloc order
};

// Sets nic_idx / nic_distance of every found GPU to its nearest NIC (pure; discover() calls it).
void pairGpusWithNics(Topology* topology);

// Discovers this machine. `gpu_bus_ids` may be empty. Fails only when hwloc itself fails.
ncclResult_t discover(const std::vector<std::string>& gpu_bus_ids, Topology* out);
// Same, from an hwloc 2.x XML description (what `lstopo --of xml` writes); used by tests to model machines.
ncclResult_t discoverFromXml(const std::string& xml, const std::vector<std::string>& gpu_bus_ids, Topology* out);

// A short human-readable block (ends with '\n'):
//   topology: 2 NUMA nodes, 64 CPUs, 2 GPUs, 0 RDMA NICs
//     numa 0 cpus 0-31
//     GPU 0000:1b:00.0 numa 0 cpus 0-31 nic none (no RDMA NIC found)
std::string formatTopology(const Topology& topology);

// Binds the calling thread to `cpuset` (hwloc list string). ncclInvalidArgument for an unparsable or empty set or
// one with no CPU this process may use; ncclSystemError when the OS refuses.
ncclResult_t bindCallingThread(const std::string& cpuset);
// Binds the calling thread to the CPUs local to topology.gpus[gpu_idx] (for the proxy thread).
// ncclInvalidArgument when the index is out of range or the GPU was not found.
ncclResult_t bindCallingThreadNearGpu(const Topology& topology, int gpu_idx);
// The calling thread's current CPU binding as a list string.
ncclResult_t callingThreadBinding(std::string* cpuset);

}  // namespace nccl_moe::topo
