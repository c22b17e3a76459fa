// Topology discovery with hwloc 2.x and the GPU<->NIC pairing rules (contract in topo.h).
//
// hwloc objects are translated into the plain structs of topo.h right after hwloc_topology_load(); the hwloc
// topology never outlives a call. I/O discovery is enabled with HWLOC_TYPE_FILTER_KEEP_IMPORTANT, which keeps
// GPUs, NICs and the bridges above them. GPUs are matched by PCI bus id only: on our GPU machines hwloc has no
// CUDA/NVML OS devices, so the PCI device object is all there is.
#include "topo/topo.h"

#include <hwloc.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/error.h"

// Evaluates an hwloc call returning an int (< 0 on failure, errno set); on failure records
// "<call> failed: <errno text> at file:line" and returns ncclSystemError from the enclosing function.
#define TOPO_HWLOC_CHECK(call)                                                                                      \
  do {                                                                                                              \
    if ((call) < 0) {                                                                                               \
      int topo_errno_ = errno;                                                                                      \
      return ::nccl_moe::setLastError(ncclSystemError, "%s failed: %s at %s:%d", #call, std::strerror(topo_errno_), \
                                      __FILE__, __LINE__);                                                          \
    }                                                                                                               \
  } while (0)

namespace nccl_moe::topo {

// ------------------------------------------------------------------------------------------------
// Pure part: bus ids, distances, pairing, formatting
// ------------------------------------------------------------------------------------------------

bool parsePciBusId(const std::string& text, PciBusId* out) {
  unsigned domain = 0, bus = 0, dev = 0, func = 0;
  int consumed = 0;
  const char* s = text.c_str();
  // The domain-less form is tried first: "%x:%x:%x.%x" would otherwise swallow it partially.
  if (std::sscanf(s, "%x:%x.%x%n", &bus, &dev, &func, &consumed) == 3 && s[consumed] == '\0') {
    domain = 0;
  } else if (std::sscanf(s, "%x:%x:%x.%x%n", &domain, &bus, &dev, &func, &consumed) == 4 && s[consumed] == '\0') {
  } else {
    return false;
  }
  // sscanf %x accepts a sign and "0x"; a bus id has neither.
  for (const char* c = s; *c; ++c) {
    if (!(std::isxdigit(static_cast<unsigned char>(*c)) || *c == ':' || *c == '.')) return false;
  }
  if (bus > 0xff || dev > 0x1f || func > 0x7) return false;
  if (out) *out = PciBusId{domain, bus, dev, func};
  return true;
}

std::string formatPciBusId(const PciBusId& id) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%04x:%02x:%02x.%x", id.domain, id.bus, id.dev, id.func);
  return buf;
}

const char* pathTypeName(PathType type) {
  switch (type) {
    case PathType::kSameSwitch:
      return "same PCIe switch";
    case PathType::kSameHostBridge:
      return "same host bridge";
    case PathType::kSameNuma:
      return "same NUMA node";
    case PathType::kCrossNuma:
      return "cross NUMA";
  }
  return "unknown";
}

PciDistance pciDistance(const PciLocation& a, const PciLocation& b) {
  size_t common = 0;
  while (common < a.bridges.size() && common < b.bridges.size() && a.bridges[common].id == b.bridges[common].id) {
    ++common;
  }
  bool shares_pci_bridge = false;
  for (size_t i = 0; i < common; ++i) shares_pci_bridge |= !a.bridges[i].host_bridge;
  PciDistance d;
  if (common > 0) {
    // Up from a to the deepest common bridge, then down to b: that bridge is crossed once.
    d.hops = static_cast<int>(a.bridges.size() + b.bridges.size() - 2 * common + 1);
  } else {
    // Through the CPU side: every bridge of both paths.
    d.hops = static_cast<int>(a.bridges.size() + b.bridges.size());
  }
  if (shares_pci_bridge) {
    d.type = PathType::kSameSwitch;
  } else if (common > 0) {
    d.type = PathType::kSameHostBridge;  // only host bridges in common
  } else if (a.locality_id == b.locality_id || (a.numa_idx >= 0 && b.numa_idx >= 0 && a.numa_idx == b.numa_idx)) {
    d.type = PathType::kSameNuma;
  } else {
    d.type = PathType::kCrossNuma;
  }
  return d;
}

int nearestIndex(const PciLocation& from, const std::vector<PciLocation>& candidates, PciDistance* distance) {
  int best = -1;
  PciDistance best_distance;
  for (size_t i = 0; i < candidates.size(); ++i) {
    PciDistance d = pciDistance(from, candidates[i]);
    // Strictly nearer only: an equal distance keeps the earlier (lower) index.
    if (best < 0 || d < best_distance) {
      best = static_cast<int>(i);
      best_distance = d;
    }
  }
  if (distance && best >= 0) *distance = best_distance;
  return best;
}

void pairGpusWithNics(Topology* topology) {
  if (!topology) return;
  std::vector<PciLocation> nic_locations;
  nic_locations.reserve(topology->nics.size());
  for (const Nic& nic : topology->nics) nic_locations.push_back(nic.location);
  for (Gpu& gpu : topology->gpus) {
    gpu.nic_idx = -1;
    gpu.nic_distance = PciDistance{};
    if (!gpu.found) continue;
    gpu.nic_idx = nearestIndex(gpu.location, nic_locations, &gpu.nic_distance);
  }
}

namespace {

std::string plural(int n, const char* one, const char* many) { return std::to_string(n) + " " + (n == 1 ? one : many); }

std::string numaText(int numa_idx) { return numa_idx >= 0 ? std::to_string(numa_idx) : std::string("?"); }

std::string orDash(const std::string& s) { return s.empty() ? std::string("-") : s; }

}  // namespace

std::string formatTopology(const Topology& t) {
  std::string out = "topology: " + plural(static_cast<int>(t.numa_nodes.size()), "NUMA node", "NUMA nodes") + ", " +
                    plural(t.num_cpus, "CPU", "CPUs") + ", " + plural(static_cast<int>(t.gpus.size()), "GPU", "GPUs") +
                    ", " + plural(static_cast<int>(t.nics.size()), "RDMA NIC", "RDMA NICs");
  if (t.source != "this machine" && !t.source.empty()) out += " (from " + t.source + ")";
  out += "\n";
  for (const NumaNode& n : t.numa_nodes) {
    out += "  numa " + std::to_string(n.os_index) + " cpus " + orDash(n.cpuset);
    if (n.memory_bytes) {
      char mem[32];
      std::snprintf(mem, sizeof(mem), " mem %.1f GiB", static_cast<double>(n.memory_bytes) / (1ull << 30));
      out += mem;
    }
    out += "\n";
  }
  for (const Gpu& g : t.gpus) {
    out += "  GPU " + (g.canonical_bus_id.empty() ? g.bus_id : g.canonical_bus_id);
    if (!g.found) {
      out += g.canonical_bus_id.empty() ? " not found (not a PCI bus id)\n" : " not found\n";
      continue;
    }
    out += " numa " + numaText(g.location.numa_idx) + " cpus " + orDash(g.cpuset) + " nic ";
    if (g.nic_idx >= 0 && g.nic_idx < static_cast<int>(t.nics.size())) {
      out += t.nics[g.nic_idx].name + " (" + pathTypeName(g.nic_distance.type) + ", " +
             plural(g.nic_distance.hops, "hop", "hops") + ")";
    } else {
      out += "none (no RDMA NIC found)";
    }
    out += "\n";
  }
  for (const Nic& n : t.nics) {
    out += "  NIC " + n.name + " " + orDash(n.bus_id) + " ports " +
           (n.num_ports >= 0 ? std::to_string(n.num_ports) : std::string("?")) + " numa " +
           numaText(n.location.numa_idx) + " cpus " + orDash(n.cpuset) + "\n";
  }
  if (t.nics.empty()) out += "  no RDMA NIC found\n";
  return out;
}

// ------------------------------------------------------------------------------------------------
// hwloc part
// ------------------------------------------------------------------------------------------------

namespace {

// Owns one hwloc topology for the duration of a call.
struct HwlocTopology {
  hwloc_topology_t t = nullptr;
  HwlocTopology() = default;
  HwlocTopology(const HwlocTopology&) = delete;
  HwlocTopology& operator=(const HwlocTopology&) = delete;
  ~HwlocTopology() {
    if (t) hwloc_topology_destroy(t);
  }
};

struct HwlocBitmap {
  hwloc_bitmap_t b = hwloc_bitmap_alloc();
  HwlocBitmap() = default;
  HwlocBitmap(const HwlocBitmap&) = delete;
  HwlocBitmap& operator=(const HwlocBitmap&) = delete;
  ~HwlocBitmap() {
    if (b) hwloc_bitmap_free(b);
  }
};

// Initialises `topo` for this machine or an XML description. The discovery components that talk to GPU runtimes
// (OpenCL, CUDA, NVML, ROCm SMI, Level Zero) and to the X server are blacklisted: we match GPUs by PCI bus id, and
// the OpenCL one would initialise the NVIDIA driver (contexts on every GPU, seconds of start-up) inside a process
// that is about to use CUDA itself. PCI and the Linux sysfs I/O discovery (which lists verbs devices) remain.
ncclResult_t initTopology(HwlocTopology* topo, bool with_io) {
  TOPO_HWLOC_CHECK(hwloc_topology_init(&topo->t));
  for (const char* component : {"opencl", "cuda", "nvml", "rsmi", "levelzero", "gl"}) {
    // Best effort: a component this hwloc build lacks is not an error worth failing discovery for.
    (void)hwloc_topology_set_components(topo->t, HWLOC_TOPOLOGY_COMPONENTS_FLAG_BLACKLIST, component);
  }
  if (with_io) TOPO_HWLOC_CHECK(hwloc_topology_set_io_types_filter(topo->t, HWLOC_TYPE_FILTER_KEEP_IMPORTANT));
  return ncclSuccess;
}

std::string listString(hwloc_const_bitmap_t set) {
  if (!set) return "";
  char* s = nullptr;
  if (hwloc_bitmap_list_asprintf(&s, set) < 0 || !s) return "";
  std::string out(s);
  std::free(s);
  return out;
}

// Bridges from the CPU side down to `obj`'s parent, plus the CPU-side ancestor's identity.
PciLocation locationOf(hwloc_obj_t obj, std::string* cpuset) {
  PciLocation loc;
  hwloc_obj_t p = obj ? obj->parent : nullptr;
  while (p && !p->cpuset) {
    if (p->type == HWLOC_OBJ_BRIDGE) {
      loc.bridges.push_back(PciBridge{p->gp_index, p->attr->bridge.upstream_type == HWLOC_OBJ_BRIDGE_HOST});
    }
    p = p->parent;
  }
  std::reverse(loc.bridges.begin(), loc.bridges.end());
  if (p) {
    loc.locality_id = p->gp_index;
    if (p->nodeset && hwloc_bitmap_weight(p->nodeset) == 1) loc.numa_idx = hwloc_bitmap_first(p->nodeset);
    if (cpuset) *cpuset = listString(p->cpuset);
  }
  return loc;
}

// Number of ports of an OpenFabrics OS device: hwloc's Linux backend adds "Port<N>State" per port.
int countPorts(hwloc_obj_t osdev) {
  int ports = 0;
  for (unsigned i = 0; i < osdev->infos_count; ++i) {
    const char* name = osdev->infos[i].name;
    unsigned port = 0;
    int consumed = 0;
    if (name && std::sscanf(name, "Port%uState%n", &port, &consumed) == 1 && name[consumed] == '\0') ++ports;
  }
  return ports > 0 ? ports : -1;
}

ncclResult_t fillFromHwloc(hwloc_topology_t t, const std::vector<std::string>& gpu_bus_ids, Topology* out) {
  hwloc_obj_t root = hwloc_get_root_obj(t);
  const char* version = root ? hwloc_obj_get_info_by_name(root, "hwlocVersion") : nullptr;
  if (version) {
    out->hwloc_version = version;
  } else {
    unsigned api = hwloc_get_api_version();
    out->hwloc_version = std::to_string(api >> 16) + "." + std::to_string((api >> 8) & 0xff) + " (API)";
  }
  out->num_packages = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_PACKAGE);
  out->num_cores = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_CORE);
  out->num_cpus = hwloc_get_nbobjs_by_type(t, HWLOC_OBJ_PU);
  out->cpuset = listString(hwloc_topology_get_topology_cpuset(t));

  for (hwloc_obj_t n = nullptr; (n = hwloc_get_next_obj_by_type(t, HWLOC_OBJ_NUMANODE, n)) != nullptr;) {
    NumaNode node;
    node.os_index = static_cast<int>(n->os_index);
    node.cpuset = listString(n->cpuset);
    node.num_cpus = n->cpuset ? hwloc_bitmap_weight(n->cpuset) : 0;
    node.memory_bytes = n->attr ? n->attr->numanode.local_memory : 0;
    out->numa_nodes.push_back(node);
  }

  for (hwloc_obj_t o = nullptr; (o = hwloc_get_next_osdev(t, o)) != nullptr;) {
    if (o->attr->osdev.type != HWLOC_OBJ_OSDEV_OPENFABRICS) continue;
    Nic nic;
    nic.name = o->name ? o->name : "";
    nic.num_ports = countPorts(o);
    // The PCI function the verbs device belongs to; the OS device hangs below it.
    hwloc_obj_t pci = o->parent;
    while (pci && pci->type != HWLOC_OBJ_PCI_DEVICE && !pci->cpuset) pci = pci->parent;
    if (pci && pci->type == HWLOC_OBJ_PCI_DEVICE) {
      const auto& a = pci->attr->pcidev;
      nic.bus_id = formatPciBusId(PciBusId{a.domain, a.bus, a.dev, a.func});
      nic.location = locationOf(pci, &nic.cpuset);
    } else {
      nic.location = locationOf(o, &nic.cpuset);  // no PCI parent (e.g. a software device)
    }
    out->nics.push_back(nic);
  }

  for (const std::string& text : gpu_bus_ids) {
    Gpu gpu;
    gpu.bus_id = text;
    PciBusId id;
    if (parsePciBusId(text, &id)) {
      gpu.canonical_bus_id = formatPciBusId(id);
      hwloc_obj_t pci = hwloc_get_pcidev_by_busid(t, id.domain, id.bus, id.dev, id.func);
      if (pci) {
        gpu.found = true;
        gpu.vendor_id = pci->attr->pcidev.vendor_id;
        gpu.device_id = pci->attr->pcidev.device_id;
        gpu.class_id = pci->attr->pcidev.class_id;
        gpu.location = locationOf(pci, &gpu.cpuset);
      }
    }
    out->gpus.push_back(gpu);
  }

  pairGpusWithNics(out);
  return ncclSuccess;
}

ncclResult_t discoverImpl(const std::string* xml, const std::vector<std::string>& gpu_bus_ids, Topology* out) {
  if (!out) return setLastError(ncclInvalidArgument, "topology discovery: out is NULL");
  *out = Topology{};
  out->source = xml ? "xml" : "this machine";
  HwlocTopology topo;
  MOE_CHECK(initTopology(&topo, /*with_io=*/true));
  if (xml) {
    // hwloc expects the length including the terminating NUL, as hwloc_topology_export_xmlbuffer reports it.
    if (xml->empty() || xml->size() + 1 > static_cast<size_t>(INT_MAX)) {
      return setLastError(ncclInvalidArgument, "topology discovery: XML buffer is empty or too large");
    }
    if (hwloc_topology_set_xmlbuffer(topo.t, xml->c_str(), static_cast<int>(xml->size() + 1)) < 0) {
      return setLastError(ncclInvalidArgument, "hwloc_topology_set_xmlbuffer failed: %s (not hwloc XML?)",
                          std::strerror(errno));
    }
  }
  if (hwloc_topology_load(topo.t) < 0) {
    return setLastError(xml ? ncclInvalidArgument : ncclSystemError, "hwloc_topology_load failed: %s%s",
                        std::strerror(errno), xml ? " (invalid topology XML?)" : "");
  }
  return fillFromHwloc(topo.t, gpu_bus_ids, out);
}

}  // namespace

ncclResult_t discover(const std::vector<std::string>& gpu_bus_ids, Topology* out) {
  return discoverImpl(nullptr, gpu_bus_ids, out);
}

ncclResult_t discoverFromXml(const std::string& xml, const std::vector<std::string>& gpu_bus_ids, Topology* out) {
  return discoverImpl(&xml, gpu_bus_ids, out);
}

ncclResult_t bindCallingThread(const std::string& cpuset) {
  HwlocBitmap set;
  if (!set.b) return setLastError(ncclSystemError, "hwloc_bitmap_alloc failed");
  if (cpuset.empty() || hwloc_bitmap_list_sscanf(set.b, cpuset.c_str()) < 0 || hwloc_bitmap_iszero(set.b)) {
    return setLastError(ncclInvalidArgument, "cannot bind to cpuset \"%s\": not a non-empty CPU list", cpuset.c_str());
  }
  // A CPU-only topology of this machine (no I/O): enough to bind, and cheap to load.
  HwlocTopology topo;
  MOE_CHECK(initTopology(&topo, /*with_io=*/false));
  TOPO_HWLOC_CHECK(hwloc_topology_load(topo.t));
  hwloc_bitmap_and(set.b, set.b, hwloc_topology_get_allowed_cpuset(topo.t));
  if (hwloc_bitmap_iszero(set.b)) {
    return setLastError(ncclInvalidArgument,
                        "cannot bind to cpuset \"%s\": none of these CPUs is available "
                        "to this process (allowed: %s)",
                        cpuset.c_str(), listString(hwloc_topology_get_allowed_cpuset(topo.t)).c_str());
  }
  if (hwloc_set_cpubind(topo.t, set.b, HWLOC_CPUBIND_THREAD) < 0) {
    int err = errno;
    return setLastError(ncclSystemError, "hwloc_set_cpubind(%s, THREAD) failed: %s", listString(set.b).c_str(),
                        std::strerror(err));
  }
  return ncclSuccess;
}

ncclResult_t bindCallingThreadNearGpu(const Topology& topology, int gpu_idx) {
  if (gpu_idx < 0 || gpu_idx >= static_cast<int>(topology.gpus.size())) {
    return setLastError(ncclInvalidArgument, "cannot bind near GPU %d: the topology has %zu GPUs", gpu_idx,
                        topology.gpus.size());
  }
  const Gpu& gpu = topology.gpus[gpu_idx];
  if (!gpu.found || gpu.cpuset.empty()) {
    return setLastError(ncclInvalidArgument, "cannot bind near GPU %s: hwloc does not list it", gpu.bus_id.c_str());
  }
  return bindCallingThread(gpu.cpuset);
}

ncclResult_t callingThreadBinding(std::string* cpuset) {
  if (!cpuset) return setLastError(ncclInvalidArgument, "callingThreadBinding: cpuset is NULL");
  HwlocTopology topo;
  MOE_CHECK(initTopology(&topo, /*with_io=*/false));
  TOPO_HWLOC_CHECK(hwloc_topology_load(topo.t));
  HwlocBitmap set;
  if (!set.b) return setLastError(ncclSystemError, "hwloc_bitmap_alloc failed");
  TOPO_HWLOC_CHECK(hwloc_get_cpubind(topo.t, set.b, HWLOC_CPUBIND_THREAD));
  *cpuset = listString(set.b);
  return ncclSuccess;
}

}  // namespace nccl_moe::topo
