#include "transport/rdma/verbs/device.h"

#include <endian.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "core/error.h"
#include "core/log.h"
#include "topo/topo.h"

namespace nccl_moe::verbs {

ncclResult_t verbsFailure(const char* call, const std::string& where, int err, const std::string& detail) {
  return setLastError(ncclSystemError, "%s failed on %s: %s (errno %d)%s", call, where.c_str(),
                      err != 0 ? std::strerror(err) : "no errno set", err, detail.c_str());
}

// ---- NCCL_MOE_IB_HCA ----

ncclResult_t parseIbHca(const std::string& text, HcaOverride* out) {
  *out = HcaOverride{};
  if (text.empty()) return ncclSuccess;
  const char* syntax = "one device, \"mlx5_0\" or \"mlx5_0:1\" (NCCL's syntax without lists or exclusions)";
  if (text.find(',') != std::string::npos || text[0] == '^')
    return setLastError(ncclInvalidArgument, "NCCL_MOE_IB_HCA=\"%s\": lists and exclusions are not supported: %s",
                        text.c_str(), syntax);
  std::string body = text[0] == '=' ? text.substr(1) : text;  // NCCL's exact-match prefix; matches are exact here
  std::string name = body;
  int port = 0;
  const size_t colon = body.find(':');
  if (colon != std::string::npos) {
    name = body.substr(0, colon);
    const std::string port_text = body.substr(colon + 1);
    char* end = nullptr;
    errno = 0;
    const long p = port_text.empty() ? -1 : std::strtol(port_text.c_str(), &end, 10);
    if (port_text.empty() || *end != '\0' || errno == ERANGE || p < 1 || p > 255)
      return setLastError(ncclInvalidArgument, "NCCL_MOE_IB_HCA=\"%s\": port \"%s\" is not a number in 1..255: %s",
                          text.c_str(), port_text.c_str(), syntax);
    port = static_cast<int>(p);
  }
  if (name.empty() || name.size() >= static_cast<size_t>(rdma::kConnNicNameBytes) ||
      !std::all_of(name.begin(), name.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.';
      }))
    return setLastError(ncclInvalidArgument, "NCCL_MOE_IB_HCA=\"%s\": \"%s\" is not a device name: %s", text.c_str(),
                        name.c_str(), syntax);
  out->set = true;
  out->device = name;
  out->port = port;
  return ncclSuccess;
}

// ---- choices ----

namespace {

std::string joinNames(const std::vector<std::string>& names) {
  std::string s;
  for (const std::string& n : names) s += (s.empty() ? "" : ", ") + n;
  return s.empty() ? "none" : s;
}

int indexOf(const std::vector<std::string>& names, const std::string& name) {
  const auto it = std::find(names.begin(), names.end(), name);
  return it == names.end() ? -1 : static_cast<int>(it - names.begin());
}

}  // namespace

ncclResult_t chooseNic(const std::vector<std::string>& devices, const topo::Topology* topology, int gpu_idx,
                       const HcaOverride& hca, NicChoice* out) {
  *out = NicChoice{};
  if (devices.empty())
    return setLastError(ncclSystemError,
                        "no RDMA device: ibv_get_device_list lists none (is the NIC's driver, mlx5_ib, loaded?)");
  if (hca.set) {
    const int idx = indexOf(devices, hca.device);
    if (idx < 0)
      return setLastError(ncclInvalidArgument, "NCCL_MOE_IB_HCA names %s, which verbs does not list (devices: %s)",
                          hca.device.c_str(), joinNames(devices).c_str());
    out->device_idx = idx;
    out->name = hca.device;
    out->port = hca.port;
    out->reason = "NCCL_MOE_IB_HCA";
    return ncclSuccess;
  }
  std::string why_not_paired = "no topology";
  if (topology != nullptr && gpu_idx >= 0 && gpu_idx < static_cast<int>(topology->gpus.size())) {
    const topo::Gpu& gpu = topology->gpus[static_cast<size_t>(gpu_idx)];
    if (!gpu.found) {
      why_not_paired = "hwloc does not list GPU " + gpu.bus_id;
    } else if (gpu.nic_idx < 0 || gpu.nic_idx >= static_cast<int>(topology->nics.size())) {
      why_not_paired = "hwloc sees no RDMA NIC near GPU " + gpu.bus_id;
    } else {
      const std::string& paired = topology->nics[static_cast<size_t>(gpu.nic_idx)].name;
      const int idx = indexOf(devices, paired);
      if (idx >= 0) {
        out->device_idx = idx;
        out->name = paired;
        out->reason = "nearest to GPU " + gpu.bus_id + " (" + topo::pathTypeName(gpu.nic_distance.type) + ", " +
                      std::to_string(gpu.nic_distance.hops) + " PCI hops)";
        return ncclSuccess;
      }
      why_not_paired = "hwloc pairs GPU " + gpu.bus_id + " with " + paired + ", which verbs does not list";
    }
  }
  out->device_idx = 0;
  out->name = devices[0];
  out->reason = "the first device verbs lists (" + why_not_paired + "; devices: " + joinNames(devices) +
                "; NCCL_MOE_IB_HCA chooses another)";
  return ncclSuccess;
}

ncclResult_t choosePort(const std::string& device, const std::vector<ibv_port_attr>& ports, int wanted, int* port) {
  if (wanted > 0) {
    if (wanted > static_cast<int>(ports.size()))
      return setLastError(ncclInvalidArgument, "NCCL_MOE_IB_HCA asks for port %d of %s, which has %zu port(s)", wanted,
                          device.c_str(), ports.size());
    if (ports[static_cast<size_t>(wanted - 1)].state != IBV_PORT_ACTIVE)
      return setLastError(ncclSystemError, "port %d of %s (NCCL_MOE_IB_HCA) is not ACTIVE (state %d)", wanted,
                          device.c_str(), static_cast<int>(ports[static_cast<size_t>(wanted - 1)].state));
    *port = wanted;
    return ncclSuccess;
  }
  for (size_t i = 0; i < ports.size(); ++i) {
    if (ports[i].state == IBV_PORT_ACTIVE) {
      *port = static_cast<int>(i + 1);
      return ncclSuccess;
    }
  }
  return setLastError(ncclSystemError, "%s has no ACTIVE port (%zu port(s); `ibv_devinfo -d %s` shows their state)",
                      device.c_str(), ports.size(), device.c_str());
}

namespace {

bool isZero(const uint8_t* raw) {
  for (int i = 0; i < 16; ++i)
    if (raw[i] != 0) return false;
  return true;
}

// ::ffff:a.b.c.d
bool isIpv4Mapped(const uint8_t* raw) {
  for (int i = 0; i < 10; ++i)
    if (raw[i] != 0) return false;
  return raw[10] == 0xff && raw[11] == 0xff;
}

bool isRoceV2(const std::string& type) { return type.find("RoCE v2") != std::string::npos; }

}  // namespace

ncclResult_t chooseGidIndex(const std::string& device, int port, LinkLayer link_layer, const EnvLookup& env,
                            const std::vector<GidEntry>& table, int* index, std::string* source) {
  for (const char* name : {"NCCL_MOE_IB_GID_INDEX", "NCCL_IB_GID_INDEX"}) {
    const char* text = env ? env(name) : nullptr;
    if (text == nullptr || *text == '\0') continue;
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(text, &end, 0);
    if (end == text || *end != '\0' || errno == ERANGE || v < -1 || v > 255)
      return setLastError(ncclInvalidArgument, "%s=\"%s\" is not a GID index (0..255, or -1 to choose)", name, text);
    if (v == -1) break;  // NCCL's "choose"
    if (v >= static_cast<long long>(table.size()))
      return setLastError(ncclInvalidArgument, "%s=%lld: port %d of %s has %zu GID entries", name, v, port,
                          device.c_str(), table.size());
    if (isZero(table[static_cast<size_t>(v)].raw))
      return setLastError(ncclInvalidArgument, "%s=%lld: GID %lld of %s port %d is empty (see show_gids)", name, v, v,
                          device.c_str(), port);
    *index = static_cast<int>(v);
    *source = name;
    return ncclSuccess;
  }
  if (link_layer == LinkLayer::kInfiniBand) {
    *index = 0;
    *source = "default (InfiniBand: the port GID)";
    return ncclSuccess;
  }
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < table.size(); ++i) {
      if (isZero(table[i].raw) || !isRoceV2(table[i].type)) continue;
      if (pass == 0 && !isIpv4Mapped(table[i].raw)) continue;
      *index = static_cast<int>(i);
      *source = pass == 0 ? "RoCE v2 IPv4 GID" : "RoCE v2 GID";
      return ncclSuccess;
    }
  }
  return setLastError(ncclSystemError,
                      "%s port %d (RoCE): no RoCE v2 GID among %zu entries (types from sysfs gid_attrs/types); set "
                      "NCCL_MOE_IB_GID_INDEX to the index `show_gids` lists for the port's IP address",
                      device.c_str(), port, table.size());
}

void fillConnRecordIdentity(const PortIdentity& id, rdma::ConnRecord* r) {
  std::memset(r->nic_name, 0, sizeof(r->nic_name));
  std::strncpy(r->nic_name, id.name.c_str(), sizeof(r->nic_name) - 1);
  r->nic_guid = id.node_guid;
  r->port = id.port;
  r->link_layer = static_cast<uint8_t>(id.link_layer);
  r->active_mtu = static_cast<uint8_t>(id.active_mtu);
  r->gid_index = id.gid_index;
  r->lid = id.lid;
  std::memcpy(r->gid, id.gid, sizeof(r->gid));
}

// ---- Device ----

Device::Device(const IbvApi& ibv, const Mlx5Api* mlx5, const CudaOps& cuda)
    : api_(ibv), dv_(mlx5), cuda_(&cuda), mapper_(new HostMapper(cuda)) {}

std::string Device::where() const { return id_.name + " port " + std::to_string(id_.port); }

Device::~Device() {
  if (children_ != 0) {
    MOE_WARN("verbs device %s closed with %d registration(s) / QP(s) still alive: leaking its PD and context",
             id_.name.c_str(), children_);
    return;
  }
  mapper_.reset();
  if (pd_ != nullptr) {
    const int rc = api_.dealloc_pd(pd_);
    if (rc != 0) MOE_WARN("ibv_dealloc_pd failed on %s: %s", id_.name.c_str(), std::strerror(rc > 0 ? rc : errno));
  }
  if (context_ != nullptr) {
    const int rc = api_.close_device(context_);
    if (rc != 0) MOE_WARN("ibv_close_device failed on %s: %s", id_.name.c_str(), std::strerror(rc > 0 ? rc : errno));
  }
}

namespace {

std::string readGidType(const std::string& root, const std::string& dev, int port, size_t index) {
  std::ifstream in(root + "/" + dev + "/ports/" + std::to_string(port) + "/gid_attrs/types/" + std::to_string(index));
  std::string line;
  if (!in || !std::getline(in, line)) return "";
  return line;
}

int errnoOf(int rc) { return rc > 0 ? rc : errno; }

}  // namespace

ncclResult_t Device::open(const IbvApi& ibv, const Mlx5Api* mlx5, const DeviceOptions& options,
                          std::unique_ptr<Device>* out) {
  MOE_ARG_CHECK(out != nullptr, "Device::open: out is NULL");
  const CudaOps& cuda = options.cuda != nullptr ? *options.cuda : CudaOps::runtime();
  std::unique_ptr<Device> d(new Device(ibv, mlx5, cuda));

  HcaOverride hca;
  const char* hca_text = options.env ? options.env("NCCL_MOE_IB_HCA") : nullptr;
  MOE_CHECK(parseIbHca(hca_text != nullptr ? hca_text : "", &hca));

  errno = 0;
  int num = 0;
  ibv_device** list = ibv.get_device_list(&num);
  if (list == nullptr) return verbsFailure("ibv_get_device_list", "this host", errno);
  std::vector<std::string> names;
  for (int i = 0; i < num; ++i) names.emplace_back(ibv.get_device_name(list[i]));
  NicChoice choice;
  ncclResult_t res = chooseNic(names, options.topology, options.gpu_idx, hca, &choice);
  if (res == ncclSuccess && options.require_mlx5) {
    if (mlx5 == nullptr || mlx5->is_supported == nullptr)
      res = setLastError(ncclSystemError, "%s: libmlx5 is not loaded; the GPU-initiated path needs mlx5 direct verbs",
                         choice.name.c_str());
    else if (!mlx5->is_supported(list[choice.device_idx]))
      res = setLastError(ncclSystemError,
                         "%s is not an mlx5 device (mlx5dv_is_supported: false): the GPU-initiated path needs a "
                         "ConnectX NIC; NCCL_MOE_IB_HCA chooses another",
                         choice.name.c_str());
  }
  if (res == ncclSuccess) {
    errno = 0;
    d->context_ = ibv.open_device(list[choice.device_idx]);
    if (d->context_ == nullptr) res = verbsFailure("ibv_open_device", choice.name, errno);
  }
  ibv.free_device_list(list);  // an opened context stays valid
  if (res != ncclSuccess) return res;
  d->id_.name = choice.name;

  ibv_device_attr dev_attr;
  std::memset(&dev_attr, 0, sizeof(dev_attr));
  int rc = ibv.query_device(d->context_, &dev_attr);
  if (rc != 0) return verbsFailure("ibv_query_device", choice.name, errnoOf(rc));
  if (dev_attr.atomic_cap == IBV_ATOMIC_NONE || dev_attr.max_qp_init_rd_atom < 1 || dev_attr.max_qp_rd_atom < 1)
    return setLastError(ncclSystemError,
                        "%s does not do RDMA atomics (atomic_cap %d, max_qp_init_rd_atom %d, max_qp_rd_atom %d): "
                        "every signal of the scale-out transport is a fetch-add",
                        choice.name.c_str(), static_cast<int>(dev_attr.atomic_cap), dev_attr.max_qp_init_rd_atom,
                        dev_attr.max_qp_rd_atom);
  d->id_.node_guid = be64toh(dev_attr.node_guid);
  d->id_.max_rd_atomic = static_cast<uint8_t>(std::min(dev_attr.max_qp_init_rd_atom, 255));
  d->id_.max_dest_rd_atomic = static_cast<uint8_t>(std::min(dev_attr.max_qp_rd_atom, 255));
  d->id_.max_qp_wr = static_cast<uint32_t>(std::max(dev_attr.max_qp_wr, 0));
  d->id_.max_cqe = dev_attr.max_cqe;

  std::vector<ibv_port_attr> ports(dev_attr.phys_port_cnt);
  for (size_t p = 0; p < ports.size(); ++p) {
    rc = ibv.queryPort(d->context_, static_cast<uint8_t>(p + 1), &ports[p]);
    if (rc != 0) return verbsFailure("ibv_query_port", choice.name + " port " + std::to_string(p + 1), errnoOf(rc));
  }
  int port = 0;
  MOE_CHECK(choosePort(choice.name, ports, choice.port, &port));
  const ibv_port_attr& pa = ports[static_cast<size_t>(port - 1)];
  d->id_.port = static_cast<uint8_t>(port);
  d->id_.link_layer = pa.link_layer == IBV_LINK_LAYER_ETHERNET ? LinkLayer::kEthernet : LinkLayer::kInfiniBand;
  d->id_.active_mtu = pa.active_mtu;
  d->id_.lid = pa.lid;
  if (d->id_.link_layer == LinkLayer::kInfiniBand && pa.lid == 0)
    return setLastError(ncclSystemError, "%s: InfiniBand port without a LID (is a subnet manager running?)",
                        d->where().c_str());

  std::vector<GidEntry> gids(static_cast<size_t>(std::max(pa.gid_tbl_len, 0)));
  for (size_t i = 0; i < gids.size(); ++i) {
    ibv_gid gid;
    std::memset(&gid, 0, sizeof(gid));
    rc = ibv.query_gid(d->context_, static_cast<uint8_t>(port), static_cast<int>(i), &gid);
    if (rc != 0)
      return verbsFailure("ibv_query_gid", d->where(), errnoOf(rc), " (GID index " + std::to_string(i) + ")");
    std::memcpy(gids[i].raw, gid.raw, 16);
    if (d->id_.link_layer == LinkLayer::kEthernet) gids[i].type = readGidType(options.sysfs_root, choice.name, port, i);
  }
  int gid_index = 0;
  std::string gid_source;
  MOE_CHECK(chooseGidIndex(choice.name, port, d->id_.link_layer, options.env, gids, &gid_index, &gid_source));
  d->id_.gid_index = static_cast<uint8_t>(gid_index);
  if (gid_index < static_cast<int>(gids.size())) std::memcpy(d->id_.gid, gids[static_cast<size_t>(gid_index)].raw, 16);

  errno = 0;
  d->pd_ = ibv.alloc_pd(d->context_);
  if (d->pd_ == nullptr) return verbsFailure("ibv_alloc_pd", d->where(), errno);

  MOE_INFO("verbs: %s (%s), %s, LID 0x%x, GID index %d (%s), active MTU %d, max_rd_atomic %u / max_dest_rd_atomic %u",
           d->where().c_str(), choice.reason.c_str(), d->id_.link_layer == LinkLayer::kEthernet ? "RoCE" : "InfiniBand",
           d->id_.lid, gid_index, gid_source.c_str(), 128 << static_cast<int>(d->id_.active_mtu),
           unsigned{d->id_.max_rd_atomic}, unsigned{d->id_.max_dest_rd_atomic});
  *out = std::move(d);
  return ncclSuccess;
}

}  // namespace nccl_moe::verbs
