// The verbs backend (src/transport/rdma/verbs/{device,memory,rc_qp,gpu_mapping}.h) against a FAKE IbvApi / Mlx5Api
// and fake CUDA operations: the calls it makes and their order, the attributes and access flags it passes, the
// choices it takes (HCA override, NIC pairing, port, GID index), and that every failing call is reported with the
// call, the device and the errno text and frees what was made before it. Nothing here touches a NIC or a GPU; what
// only hardware can show is docs/transport.md's bring-up checklist.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <infiniband/mlx5dv.h>
#include <infiniband/verbs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "fake_verbs.h"
#include "topo/topo.h"
#include "transport/rdma/conn_record.h"
#include "transport/rdma/mlx5/cqe.h"
#include "transport/rdma/verbs/device.h"
#include "transport/rdma/verbs/gpu_mapping.h"
#include "transport/rdma/verbs/memory.h"
#include "transport/rdma/verbs/qp_attr.h"
#include "transport/rdma/verbs/rc_qp.h"

namespace nccl_moe::verbs {
namespace {

using namespace fake;  // NOLINT: the doubles and their state

std::string lastError() { return threadLastError(); }
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Installs a fresh Fake with an InfiniBand default (2 devices, port 1 active, LID 0x11, 2 GIDs) and the tables.
class VerbsBackend : public ::testing::Test {
 protected:
  void SetUp() override {
    fake_.reset(new Fake());
    g = fake_.get();
    setInfiniBandDefaults(g);
    installFakes(&ibv_, &dv_, &cuda_);
    options_.cuda = &cuda_;
    options_.env = [this](const char* name) -> const char* {
      auto it = env_.find(name);
      return it == env_.end() ? nullptr : it->second.c_str();
    };
  }
  void TearDown() override {
    // Nothing outlives its owner, whatever the test did.
    EXPECT_EQ(0, g->contexts);
    EXPECT_EQ(0, g->pds);
    EXPECT_EQ(0, g->mrs);
    EXPECT_EQ(0, g->cqs);
    EXPECT_EQ(0, g->qps);
    EXPECT_TRUE(g->host_regs.empty());
    g = nullptr;
  }
  std::unique_ptr<Device> openOk() {
    std::unique_ptr<Device> d;
    EXPECT_EQ(ncclSuccess, Device::open(ibv_, &dv_, options_, &d)) << lastError();
    return d;
  }
  // The message of a failing open, after checking it failed and created nothing.
  std::string openFails() {
    std::unique_ptr<Device> d;
    EXPECT_NE(ncclSuccess, Device::open(ibv_, &dv_, options_, &d));
    EXPECT_EQ(nullptr, d);
    EXPECT_EQ(0, g->contexts);
    EXPECT_EQ(0, g->pds);
    return lastError();
  }
  std::unique_ptr<Fake> fake_;
  IbvApi ibv_;
  Mlx5Api dv_;
  CudaOps cuda_;
  DeviceOptions options_;
  std::map<std::string, std::string> env_;
};

// ---- NCCL_MOE_IB_HCA ----

TEST(VerbsHca, ParsesOneDeviceWithAnOptionalPort) {
  HcaOverride h;
  ASSERT_EQ(ncclSuccess, parseIbHca("", &h));
  EXPECT_FALSE(h.set);
  ASSERT_EQ(ncclSuccess, parseIbHca("mlx5_0", &h));
  EXPECT_TRUE(h.set);
  EXPECT_EQ("mlx5_0", h.device);
  EXPECT_EQ(0, h.port);
  ASSERT_EQ(ncclSuccess, parseIbHca("mlx5_bond_1:2", &h));
  EXPECT_EQ("mlx5_bond_1", h.device);
  EXPECT_EQ(2, h.port);
  ASSERT_EQ(ncclSuccess, parseIbHca("=mlx5_3:1", &h));  // NCCL's exact-match marker
  EXPECT_EQ("mlx5_3", h.device);
  EXPECT_EQ(1, h.port);
}

TEST(VerbsHca, RefusesWhatItDoesNotImplementNamingTheVariable) {
  const char* bad[] = {"mlx5_0,mlx5_1", "^mlx5_0", "mlx5_0:", "mlx5_0:0", "mlx5_0:256",
                       "mlx5_0:1x",     ":1",      "mlx5 0",  "="};
  for (const char* text : bad) {
    HcaOverride h;
    h.set = true;
    EXPECT_EQ(ncclInvalidArgument, parseIbHca(text, &h)) << text;
    EXPECT_FALSE(h.set) << text;
    EXPECT_TRUE(contains(lastError(), "NCCL_MOE_IB_HCA=\"" + std::string(text) + "\"")) << lastError();
    EXPECT_TRUE(contains(lastError(), "mlx5_0:1")) << "the accepted syntax: " << lastError();
  }
  HcaOverride h;
  parseIbHca("mlx5_0,mlx5_1", &h);
  EXPECT_TRUE(contains(lastError(), "lists and exclusions")) << lastError();
}

// ---- NIC choice ----

topo::PciLocation under(std::vector<uint64_t> bridges, int numa) {
  topo::PciLocation l;
  l.numa_idx = numa;
  l.locality_id = static_cast<uint64_t>(numa + 1);
  for (size_t i = 0; i < bridges.size(); ++i) l.bridges.push_back({bridges[i], i == 0});
  return l;
}

// Two NICs; the GPU shares a PCIe switch with the second one. The pairing is topo's PCI-distance rule.
topo::Topology twoNicTopology() {
  topo::Topology t;
  t.nics.resize(2);
  t.nics[0].name = "mlx5_0";
  t.nics[0].location = under({1, 10}, 0);  // host bridge 1, its own switch 10
  t.nics[1].name = "mlx5_1";
  t.nics[1].location = under({2, 20, 21}, 0);  // host bridge 2, switch 20
  t.gpus.resize(1);
  t.gpus[0].bus_id = "0000:1b:00.0";
  t.gpus[0].found = true;
  t.gpus[0].location = under({2, 20, 22}, 0);  // also below switch 20
  topo::pairGpusWithNics(&t);
  return t;
}

TEST(VerbsNicChoice, TheOverrideWinsAndMustExist) {
  const topo::Topology t = twoNicTopology();
  HcaOverride h;
  ASSERT_EQ(ncclSuccess, parseIbHca("mlx5_0:1", &h));
  NicChoice c;
  ASSERT_EQ(ncclSuccess, chooseNic({"mlx5_0", "mlx5_1"}, &t, 0, h, &c)) << lastError();
  EXPECT_EQ(0, c.device_idx);
  EXPECT_EQ(1, c.port);
  EXPECT_EQ("NCCL_MOE_IB_HCA", c.reason);
  ASSERT_EQ(ncclSuccess, parseIbHca("mlx5_7", &h));
  EXPECT_EQ(ncclInvalidArgument, chooseNic({"mlx5_0", "mlx5_1"}, &t, 0, h, &c));
  EXPECT_TRUE(contains(lastError(), "NCCL_MOE_IB_HCA names mlx5_7")) << lastError();
  EXPECT_TRUE(contains(lastError(), "devices: mlx5_0, mlx5_1")) << lastError();
}

TEST(VerbsNicChoice, ThePciNearestNicOfTheGpuElseTheFirstDevice) {
  const topo::Topology t = twoNicTopology();
  ASSERT_EQ(1, t.gpus[0].nic_idx);
  NicChoice c;
  ASSERT_EQ(ncclSuccess, chooseNic({"mlx5_0", "mlx5_1"}, &t, 0, HcaOverride{}, &c));
  EXPECT_EQ(1, c.device_idx);
  EXPECT_EQ("mlx5_1", c.name);
  EXPECT_EQ(0, c.port);
  EXPECT_TRUE(contains(c.reason, "nearest to GPU 0000:1b:00.0 (same PCIe switch")) << c.reason;
  // verbs lists the devices in another order: the name decides, not the index.
  ASSERT_EQ(ncclSuccess, chooseNic({"mlx5_1", "mlx5_0"}, &t, 0, HcaOverride{}, &c));
  EXPECT_EQ(0, c.device_idx);
  EXPECT_EQ("mlx5_1", c.name);
  // hwloc pairs a NIC verbs does not list, or none, or there is no topology: the first device, saying why.
  ASSERT_EQ(ncclSuccess, chooseNic({"mlx5_4", "mlx5_5"}, &t, 0, HcaOverride{}, &c));
  EXPECT_EQ("mlx5_4", c.name);
  EXPECT_TRUE(contains(c.reason, "pairs GPU 0000:1b:00.0 with mlx5_1, which verbs does not list")) << c.reason;
  topo::Topology no_nic = t;
  no_nic.gpus[0].nic_idx = -1;
  ASSERT_EQ(ncclSuccess, chooseNic({"mlx5_4"}, &no_nic, 0, HcaOverride{}, &c));
  EXPECT_TRUE(contains(c.reason, "no RDMA NIC near GPU")) << c.reason;
  ASSERT_EQ(ncclSuccess, chooseNic({"mlx5_4"}, nullptr, -1, HcaOverride{}, &c));
  EXPECT_TRUE(contains(c.reason, "the first device verbs lists (no topology")) << c.reason;
  EXPECT_EQ(ncclSystemError, chooseNic({}, &t, 0, HcaOverride{}, &c));
  EXPECT_TRUE(contains(lastError(), "no RDMA device")) << lastError();
}

TEST(VerbsPortChoice, FirstActiveOrTheAskedOneWhenActive) {
  ibv_port_attr down{}, up = activePort(IBV_LINK_LAYER_INFINIBAND, 1, 1);
  down.state = IBV_PORT_DOWN;
  int port = 0;
  ASSERT_EQ(ncclSuccess, choosePort("mlx5_0", {down, up, up}, 0, &port));
  EXPECT_EQ(2, port);
  ASSERT_EQ(ncclSuccess, choosePort("mlx5_0", {down, up, up}, 3, &port));
  EXPECT_EQ(3, port);
  EXPECT_EQ(ncclSystemError, choosePort("mlx5_0", {down, up}, 1, &port));
  EXPECT_TRUE(contains(lastError(), "port 1 of mlx5_0 (NCCL_MOE_IB_HCA) is not ACTIVE")) << lastError();
  EXPECT_EQ(ncclInvalidArgument, choosePort("mlx5_0", {down, up}, 3, &port));
  EXPECT_TRUE(contains(lastError(), "has 2 port(s)")) << lastError();
  EXPECT_EQ(ncclSystemError, choosePort("mlx5_0", {down}, 0, &port));
  EXPECT_TRUE(contains(lastError(), "mlx5_0 has no ACTIVE port")) << lastError();
}

// ---- GID index ----

GidEntry entry(const ibv_gid& gid, const char* type) {
  GidEntry e;
  std::memcpy(e.raw, gid.raw, 16);
  e.type = type;
  return e;
}

TEST(VerbsGid, VariablesThenInfiniBandZeroThenRoceV2Ipv4) {
  std::map<std::string, std::string> env;
  EnvLookup lookup = [&](const char* n) -> const char* {
    auto it = env.find(n);
    return it == env.end() ? nullptr : it->second.c_str();
  };
  const std::vector<GidEntry> roce = {entry(ipv6Gid(), "IB/RoCE v1"), entry(ipv6Gid(), "RoCE v2"),
                                      entry(ipv4Gid(1), "IB/RoCE v1"), entry(ipv4Gid(1), "RoCE v2"),
                                      entry(ibv_gid{}, "")};
  int index = -5;
  std::string source;
  ASSERT_EQ(ncclSuccess, chooseGidIndex("mlx5_0", 1, LinkLayer::kEthernet, lookup, roce, &index, &source));
  EXPECT_EQ(3, index);
  EXPECT_EQ("RoCE v2 IPv4 GID", source);
  ASSERT_EQ(ncclSuccess,
            chooseGidIndex("mlx5_0", 1, LinkLayer::kEthernet, lookup, {roce[0], roce[1], roce[2]}, &index, &source));
  EXPECT_EQ(1, index);
  EXPECT_EQ("RoCE v2 GID", source);
  EXPECT_EQ(ncclSystemError,
            chooseGidIndex("mlx5_0", 1, LinkLayer::kEthernet, lookup, {roce[0], roce[2]}, &index, &source));
  EXPECT_TRUE(contains(lastError(), "no RoCE v2 GID")) << lastError();
  EXPECT_TRUE(contains(lastError(), "NCCL_MOE_IB_GID_INDEX")) << lastError();
  ASSERT_EQ(ncclSuccess, chooseGidIndex("mlx5_0", 1, LinkLayer::kInfiniBand, lookup, roce, &index, &source));
  EXPECT_EQ(0, index);

  env["NCCL_IB_GID_INDEX"] = "2";
  ASSERT_EQ(ncclSuccess, chooseGidIndex("mlx5_0", 1, LinkLayer::kEthernet, lookup, roce, &index, &source));
  EXPECT_EQ(2, index);
  EXPECT_EQ("NCCL_IB_GID_INDEX", source);
  env["NCCL_MOE_IB_GID_INDEX"] = "0x1";  // ours first; hex as NCCL reads integers
  ASSERT_EQ(ncclSuccess, chooseGidIndex("mlx5_0", 1, LinkLayer::kEthernet, lookup, roce, &index, &source));
  EXPECT_EQ(1, index);
  EXPECT_EQ("NCCL_MOE_IB_GID_INDEX", source);
  env["NCCL_MOE_IB_GID_INDEX"] = "-1";  // NCCL's "choose"
  ASSERT_EQ(ncclSuccess, chooseGidIndex("mlx5_0", 1, LinkLayer::kEthernet, lookup, roce, &index, &source));
  EXPECT_EQ(3, index);
  env["NCCL_MOE_IB_GID_INDEX"] = "4";
  EXPECT_EQ(ncclInvalidArgument, chooseGidIndex("mlx5_0", 1, LinkLayer::kEthernet, lookup, roce, &index, &source));
  EXPECT_TRUE(contains(lastError(), "NCCL_MOE_IB_GID_INDEX=4: GID 4 of mlx5_0 port 1 is empty")) << lastError();
  env["NCCL_MOE_IB_GID_INDEX"] = "9";
  EXPECT_EQ(ncclInvalidArgument, chooseGidIndex("mlx5_0", 1, LinkLayer::kEthernet, lookup, roce, &index, &source));
  EXPECT_TRUE(contains(lastError(), "has 5 GID entries")) << lastError();
  env["NCCL_MOE_IB_GID_INDEX"] = "three";
  EXPECT_EQ(ncclInvalidArgument, chooseGidIndex("mlx5_0", 1, LinkLayer::kEthernet, lookup, roce, &index, &source));
  EXPECT_TRUE(contains(lastError(), "NCCL_MOE_IB_GID_INDEX=\"three\" is not a GID index")) << lastError();
}

// ---- Device ----

TEST_F(VerbsBackend, OpenQueriesTheChosenPortAndAllocatesThePd) {
  std::unique_ptr<Device> d = openOk();
  ASSERT_NE(nullptr, d);
  const std::vector<std::string> expected = {
      "ibv_get_device_list", "mlx5dv_is_supported", "ibv_open_device", "ibv_free_device_list", "ibv_query_device",
      "ibv_query_port",      "ibv_query_port",      "ibv_query_gid",   "ibv_query_gid",        "ibv_alloc_pd"};
  EXPECT_EQ(expected, g->calls);
  const PortIdentity& id = d->identity();
  EXPECT_EQ("mlx5_0", id.name);
  EXPECT_EQ(2, id.port);  // port 1 is down
  EXPECT_EQ(LinkLayer::kInfiniBand, id.link_layer);
  EXPECT_EQ(0x11, id.lid);
  EXPECT_EQ(0, id.gid_index);
  EXPECT_EQ(0, std::memcmp(id.gid, ipv6Gid().raw, 16));
  EXPECT_EQ(0x0102030405060708ull, id.node_guid);  // host order
  EXPECT_EQ(8, id.max_rd_atomic);                  // max_qp_init_rd_atom
  EXPECT_EQ(16, id.max_dest_rd_atomic);            // max_qp_rd_atom
  EXPECT_EQ("mlx5_0 port 2", d->where());

  rdma::ConnRecord rec;
  fillConnRecordIdentity(id, &rec);
  EXPECT_STREQ("mlx5_0", rec.nic_name);
  EXPECT_EQ(2, rec.port);
  EXPECT_EQ(0x11, rec.lid);
  EXPECT_EQ(static_cast<uint8_t>(IBV_MTU_4096), rec.active_mtu);

  g->calls.clear();
  d.reset();
  EXPECT_EQ((std::vector<std::string>{"ibv_dealloc_pd", "ibv_close_device"}), g->calls);
}

TEST_F(VerbsBackend, OpenHonoursTheHcaOverrideAndRoceGidTypesFromSysfs) {
  env_["NCCL_MOE_IB_HCA"] = "mlx5_1:2";
  g->ports[1] = activePort(IBV_LINK_LAYER_ETHERNET, 0, 3);
  g->gids = {ipv6Gid(), ipv4Gid(7), ipv4Gid(7)};
  const std::filesystem::path root =
      std::filesystem::temp_directory_path() / ("verbs_sysfs_" + std::to_string(getpid()));
  const std::filesystem::path types = root / "mlx5_1" / "ports" / "2" / "gid_attrs" / "types";
  std::filesystem::create_directories(types);
  const char* kinds[] = {"IB/RoCE v1", "IB/RoCE v1", "RoCE v2"};
  for (int i = 0; i < 3; ++i) std::ofstream(types / std::to_string(i)) << kinds[i] << "\n";
  options_.sysfs_root = root.string();
  std::unique_ptr<Device> d = openOk();
  std::filesystem::remove_all(root);
  ASSERT_NE(nullptr, d);
  EXPECT_EQ("mlx5_1", d->name());
  EXPECT_EQ(2, d->identity().port);
  EXPECT_EQ(LinkLayer::kEthernet, d->identity().link_layer);
  EXPECT_EQ(2, d->identity().gid_index);
  EXPECT_EQ(0, std::memcmp(d->identity().gid, ipv4Gid(7).raw, 16));
}

TEST_F(VerbsBackend, EveryFailingOpenStepNamesTheCallTheDeviceAndErrnoAndFreesWhatItMade) {
  const char* steps[] = {"ibv_open_device", "ibv_query_device", "ibv_query_port", "ibv_query_gid", "ibv_alloc_pd"};
  for (const char* step : steps) {
    g->calls.clear();
    g->fail = step;
    g->fail_errno = EACCES;
    const std::string msg = openFails();
    EXPECT_TRUE(contains(msg, std::string(step) + " failed on mlx5_0")) << msg;
    EXPECT_TRUE(contains(msg, std::strerror(EACCES))) << msg;
    EXPECT_TRUE(contains(msg, "errno 13")) << msg;
    const bool opened = std::string(step) != "ibv_open_device";
    EXPECT_EQ(opened, g->calls.back() == "ibv_close_device") << step;
  }
  g->fail = "ibv_get_device_list";
  g->fail_errno = ENOSYS;
  EXPECT_TRUE(contains(openFails(), "ibv_get_device_list failed on this host: " + std::string(std::strerror(ENOSYS))));
}

TEST_F(VerbsBackend, OpenRefusesNonMlx5NoAtomicsNoLidNoActivePortAndNoDevices) {
  g->mlx5 = false;
  EXPECT_TRUE(contains(openFails(), "mlx5_0 is not an mlx5 device"));
  g->mlx5 = true;
  options_.require_mlx5 = true;
  {
    std::unique_ptr<Device> d;
    EXPECT_EQ(ncclSystemError, Device::open(ibv_, nullptr, options_, &d));
    EXPECT_TRUE(contains(lastError(), "libmlx5 is not loaded")) << lastError();
  }
  g->device_attr.atomic_cap = IBV_ATOMIC_NONE;
  EXPECT_TRUE(contains(openFails(), "does not do RDMA atomics"));
  g->device_attr.atomic_cap = IBV_ATOMIC_HCA;
  g->ports[1].lid = 0;
  EXPECT_TRUE(contains(openFails(), "mlx5_0 port 2: InfiniBand port without a LID"));
  g->ports[1].state = IBV_PORT_INIT;
  EXPECT_TRUE(contains(openFails(), "mlx5_0 has no ACTIVE port"));
  g->names.clear();
  EXPECT_TRUE(contains(openFails(), "no RDMA device"));
  env_["NCCL_MOE_IB_HCA"] = "mlx5_0,mlx5_1";
  EXPECT_TRUE(contains(openFails(), "NCCL_MOE_IB_HCA=\"mlx5_0,mlx5_1\""));
}

// ---- Registration ----

struct FakeGpuBuffer {
  Page page{3 * 4096};
  void* at(size_t offset) { return static_cast<uint8_t*>(page.p) + offset; }
};

bool fdIsClosed(int fd) { return fcntl(fd, F_GETFD) == -1 && errno == EBADF; }

TEST_F(VerbsBackend, DataWindowsGoThroughDmaBufRelaxedSignalWindowsStrict) {
  std::unique_ptr<Device> d = openOk();
  FakeGpuBuffer buf;
  RegistrationSpec data;
  data.addr = buf.at(100);  // not page-aligned: the fd covers whole pages, the MR starts at an offset
  data.bytes = 5000;
  data.what = "data window";
  std::unique_ptr<MemoryRegion> data_mr;
  ASSERT_EQ(ncclSuccess, MemoryRegion::create(*d, data, &data_mr)) << lastError();
  ASSERT_EQ(1u, g->regs.size());
  const Fake::Reg r = g->regs[0];
  EXPECT_EQ("ibv_reg_dmabuf_mr", r.call);
  EXPECT_EQ(100u, r.offset);
  EXPECT_EQ(5000u, r.length);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(data.addr), r.iova);  // windows are addressed by the virtual address
  EXPECT_EQ(unsigned{IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ |
                     IBV_ACCESS_REMOTE_ATOMIC | IBV_ACCESS_RELAXED_ORDERING},
            r.access);
  ASSERT_EQ(1u, g->dmabuf_fds.size());
  EXPECT_EQ(g->dmabuf_fds[0], r.fd);
  EXPECT_TRUE(fdIsClosed(r.fd)) << "the dma-buf fd is closed after registration";
  EXPECT_EQ(RegistrationPath::kDmaBuf, data_mr->path());
  const rdma::Window& w = data_mr->window();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(data.addr), w.addr);
  EXPECT_EQ(5000u, w.bytes);
  EXPECT_NE(w.lkey, w.rkey);
  EXPECT_FALSE(w.strongly_ordered());
  EXPECT_EQ(w.rkey, data_mr->connWindow().rkey);

  RegistrationSpec signal = data;
  signal.addr = buf.at(8192);
  signal.bytes = 64;
  signal.flags = rdma::kWindowSignal;
  signal.access = rdma::kAccessAllRemote | rdma::kAccessRelaxedOrdering;  // asked, and still refused
  std::unique_ptr<MemoryRegion> signal_mr;
  ASSERT_EQ(ncclSuccess, MemoryRegion::create(*d, signal, &signal_mr)) << lastError();
  ASSERT_EQ(2u, g->regs.size());
  EXPECT_EQ(0u, g->regs[1].access & IBV_ACCESS_RELAXED_ORDERING);
  EXPECT_EQ(unsigned{rdma::kAccessAllRemote}, g->regs[1].access);
  EXPECT_TRUE(signal_mr->window().strongly_ordered());
  EXPECT_EQ(uint32_t{rdma::kWindowSignal}, signal_mr->window().flags);

  EXPECT_EQ(unsigned{rdma::kAccessAllRemote}, registrationAccess(rdma::kAccessAllRemote, 0, false));
  g->calls.clear();
  signal_mr.reset();
  data_mr.reset();
  EXPECT_EQ((std::vector<std::string>{"ibv_dereg_mr", "ibv_dereg_mr"}), g->calls);
}

TEST_F(VerbsBackend, DmaBufFailuresFallBackToRegMrWithTheSameFlags) {
  std::unique_ptr<Device> d = openOk();
  FakeGpuBuffer buf;
  RegistrationSpec data;
  data.addr = buf.at(0);
  data.bytes = 4096;
  RegistrationSpec signal = data;
  signal.flags = rdma::kWindowSignal;
  std::unique_ptr<MemoryRegion> a, b, c, e;

  g->dmabuf_fail = "cuMemGetHandleForAddressRange(DMA_BUF_FD) returned CUresult 801";
  ASSERT_EQ(ncclSuccess, MemoryRegion::create(*d, data, &a)) << lastError();
  EXPECT_EQ(RegistrationPath::kPeerMemory, a->path());
  EXPECT_EQ("ibv_reg_mr_iova2", g->regs.back().call);  // relaxed ordering is an optional-range flag
  EXPECT_NE(0u, g->regs.back().access & IBV_ACCESS_RELAXED_ORDERING);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(data.addr), g->regs.back().iova);
  ASSERT_EQ(ncclSuccess, MemoryRegion::create(*d, signal, &b)) << lastError();
  EXPECT_EQ("ibv_reg_mr", g->regs.back().call);
  EXPECT_EQ(0u, g->regs.back().access & IBV_ACCESS_RELAXED_ORDERING);

  g->dmabuf_fail.clear();
  g->fail = "ibv_reg_dmabuf_mr";
  g->fail_errno = EOPNOTSUPP;
  ASSERT_EQ(ncclSuccess, MemoryRegion::create(*d, signal, &c)) << lastError();
  EXPECT_EQ(RegistrationPath::kPeerMemory, c->path());
  EXPECT_EQ("ibv_reg_mr", g->regs.back().call);
  EXPECT_TRUE(fdIsClosed(g->dmabuf_fds.back()));

  ibv_.reg_dmabuf_mr = nullptr;  // rdma-core older than 34
  g->calls.clear();
  ASSERT_EQ(ncclSuccess, MemoryRegion::create(*d, signal, &e)) << lastError();
  EXPECT_EQ((std::vector<std::string>{"ibv_reg_mr"}), g->calls);
}

TEST_F(VerbsBackend, ARegistrationThatFailsBothWaysNamesBothAndLeavesNothing) {
  std::unique_ptr<Device> d = openOk();
  FakeGpuBuffer buf;
  RegistrationSpec signal;
  signal.addr = buf.at(0);
  signal.bytes = 4096;
  signal.flags = rdma::kWindowSignal;
  signal.what = "signal window";
  g->dmabuf_fail = "not supported by this GPU";
  g->fail = "ibv_reg_mr";
  g->fail_errno = EFAULT;
  std::unique_ptr<MemoryRegion> m;
  EXPECT_EQ(ncclSystemError, MemoryRegion::create(*d, signal, &m));
  EXPECT_EQ(nullptr, m);
  const std::string msg = lastError();
  EXPECT_TRUE(contains(msg, "ibv_reg_mr failed on mlx5_0 port 2: " + std::string(std::strerror(EFAULT)))) << msg;
  EXPECT_TRUE(contains(msg, "signal window")) << msg;
  EXPECT_TRUE(contains(msg, "dma-buf: not supported by this GPU")) << msg;
  EXPECT_TRUE(contains(msg, "nvidia-peermem")) << msg;
  EXPECT_EQ(0, g->mrs);
}

// ---- QPs ----

RcQpSpec qpSpec() {
  RcQpSpec s;
  s.max_send_wr = 64;
  s.dev_state = reinterpret_cast<ibgda::GpuQpState*>(0x7000000);
  s.src_lkey = 0x55;
  s.result_lkey = 0x66;
  s.rank = 0;
  s.peer = 3;
  s.timeout_ns = 1000000000;
  s.dev_error = reinterpret_cast<ErrorRecord*>(0x8000000);
  return s;
}

template <typename T>
T* dev(const void* host) {
  return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(host) + kDevOffset);
}

TEST_F(VerbsBackend, AQpIsCreatedOpenedAndMappedForTheGpu) {
  std::unique_ptr<Device> d = openOk();
  g->calls.clear();
  std::unique_ptr<RcQp> q;
  ASSERT_EQ(ncclSuccess, RcQp::create(*d, qpSpec(), &q)) << lastError();
  EXPECT_EQ((std::vector<std::string>{"ibv_create_cq", "ibv_create_qp", "mlx5dv_init_obj", "cudaHostRegister",
                                      "cudaHostRegister", "cudaHostRegister io", "cudaHostRegister"}),
            g->calls);           // SQ, doorbell-record page, UAR, CQ; the CQ's record shares the QP's page
  EXPECT_EQ(256, g->cqe_asked);  // 4 x max_send_wr
  ASSERT_EQ(1u, g->qp_inits.size());
  const ibv_qp_init_attr& init = g->qp_inits[0];
  EXPECT_EQ(IBV_QPT_RC, init.qp_type);
  EXPECT_EQ(0, init.sq_sig_all);
  EXPECT_EQ(28u, init.cap.max_inline_data);
  EXPECT_EQ(64u, init.cap.max_send_wr);
  EXPECT_EQ(0u, init.cap.max_recv_wr);
  EXPECT_EQ(1u, init.cap.max_send_sge);
  EXPECT_EQ(init.send_cq, init.recv_cq);

  const ibgda::GpuQp& v = q->view();
  EXPECT_EQ(dev<uint8_t>(q->dvQp().sq.buf), v.sq);
  EXPECT_EQ(128u, v.wqe_cnt);  // what libmlx5 made, not what was asked
  EXPECT_EQ(q->qpn(), v.qpn);
  EXPECT_EQ(dev<uint32_t>(q->dvQp().dbrec), v.sq_dbrec);
  EXPECT_EQ(dev<uint64_t>(q->dvQp().bf.reg), v.doorbell);
  EXPECT_EQ(dev<uint8_t>(q->dvCq().buf), v.cq);
  EXPECT_EQ(256u, v.cqe_cnt);
  EXPECT_EQ(dev<uint32_t>(q->dvCq().dbrec), v.cq_dbrec);
  EXPECT_EQ(0x55u, v.lkey);
  EXPECT_EQ(0x66u, v.result_lkey);
  EXPECT_EQ(3, v.peer);
  EXPECT_EQ(IBV_QPS_RESET, q->state());
  // The UAR page is registered as I/O memory, the queues as ordinary mapped memory, all portable.
  const auto uar = g->host_regs.find(reinterpret_cast<uintptr_t>(g->uar_page.p));
  ASSERT_NE(g->host_regs.end(), uar);
  EXPECT_EQ(unsigned{cudaHostRegisterMapped | cudaHostRegisterPortable | cudaHostRegisterIoMemory}, uar->second.second);
  EXPECT_EQ(unsigned{cudaHostRegisterMapped | cudaHostRegisterPortable},
            g->host_regs.at(reinterpret_cast<uintptr_t>(q->dvQp().sq.buf)).second);

  // A second QP shares the doorbell-record and UAR pages: registered once, released with the last user.
  std::unique_ptr<RcQp> q2;
  ASSERT_EQ(ncclSuccess, RcQp::create(*d, qpSpec(), &q2)) << lastError();
  EXPECT_NE(q->qpn(), q2->qpn());
  EXPECT_EQ(6u, g->host_regs.size());  // 2 x (SQ, CQ) + dbrec page + UAR page
  q.reset();
  EXPECT_EQ(4u, g->host_regs.size());
  EXPECT_EQ(1u, g->host_regs.count(reinterpret_cast<uintptr_t>(g->uar_page.p)));
  g->calls.clear();
  q2.reset();
  EXPECT_TRUE(g->host_regs.empty());
  // Mappings go before the QP (libmlx5 frees the queue memory with it), the QP before its CQ.
  EXPECT_EQ("ibv_destroy_qp", g->calls[g->calls.size() - 2]);
  EXPECT_EQ("ibv_destroy_cq", g->calls.back());
  EXPECT_EQ("cudaHostUnregister", g->calls[g->calls.size() - 3]);
}

TEST_F(VerbsBackend, EveryFailingQpStepIsNamedAndFreesWhatWasMade) {
  std::unique_ptr<Device> d = openOk();
  struct Case {
    const char* fail;
    const char* message;
  };
  const Case cases[] = {
      {"ibv_create_cq", "ibv_create_cq failed on mlx5_0 port 2: "},
      {"ibv_create_qp", "ibv_create_qp failed on mlx5_0 port 2: "},
      {"mlx5dv_init_obj", "mlx5dv_init_obj failed on mlx5_0 port 2: "},
      {"cudaHostRegister io", "cudaHostRegister(Mapped|Portable|IoMemory) failed for UAR doorbell"},
  };
  for (const Case& c : cases) {
    g->fail = c.fail;
    g->fail_errno = ENOMEM;
    std::unique_ptr<RcQp> q;
    EXPECT_NE(ncclSuccess, RcQp::create(*d, qpSpec(), &q)) << c.fail;
    EXPECT_EQ(nullptr, q);
    EXPECT_TRUE(contains(lastError(), c.message)) << lastError();
    if (std::string(c.fail).rfind("ibv", 0) == 0 || std::string(c.fail).rfind("mlx5", 0) == 0)
      EXPECT_TRUE(contains(lastError(), std::strerror(ENOMEM))) << lastError();
    EXPECT_EQ(0, g->cqs) << c.fail;
    EXPECT_EQ(0, g->qps) << c.fail;
    EXPECT_TRUE(g->host_regs.empty()) << c.fail;
  }
  EXPECT_TRUE(contains(lastError(), "PeerMappingOverride=1")) << "the UAR failure says what to change: " << lastError();
  g->fail.clear();
}

TEST_F(VerbsBackend, WhatLibmlx5MadeIsCheckedBeforeTheGpuSeesIt) {
  std::unique_ptr<Device> d = openOk();
  struct Case {
    void (*setup)();
    const char* message;
  };
  const Case cases[] = {
      {[] { g->stride = 128; }, "SQ stride 128, expected 64"},
      {[] { g->cqe_size = 128; }, "CQE size 128"},
      {[] { g->cqe_cnt = 64; }, "CQ of 64 entries < SQ of 128 WQEBBs"},
      {[] { g->corrupt_cqe = true; }, "CQE 3 starts with op_own 0x0, expected 0xf0"},
  };
  for (const Case& c : cases) {
    g->stride = 64;
    g->cqe_size = 64;
    g->cqe_cnt = 256;
    g->corrupt_cqe = false;
    c.setup();
    std::unique_ptr<RcQp> q;
    EXPECT_EQ(ncclSystemError, RcQp::create(*d, qpSpec(), &q));
    EXPECT_TRUE(contains(lastError(), "mlx5dv_init_obj on mlx5_0 port 2, QP 0x")) << lastError();
    EXPECT_TRUE(contains(lastError(), c.message)) << lastError();
    EXPECT_EQ(0, g->qps);
    EXPECT_EQ(0, g->cqs);
    EXPECT_TRUE(g->host_regs.empty());
  }
  // A binding the GPU view refuses (no wait bound) is reported too, and frees the mappings.
  g->stride = 64;
  g->cqe_size = 64;
  g->cqe_cnt = 256;
  g->corrupt_cqe = false;
  RcQpSpec s = qpSpec();
  s.timeout_ns = 0;
  std::unique_ptr<RcQp> q;
  EXPECT_EQ(ncclInvalidArgument, RcQp::create(*d, s, &q));
  EXPECT_TRUE(contains(lastError(), "the GPU view: timeout_ns is 0")) << lastError();
}

rdma::ConnRecord remoteRecord(const PortIdentity& local, uint32_t qpn) {
  rdma::ConnRecord r;
  r.rank = 1;
  r.peer = 0;
  r.num_ranks = 2;
  r.link_layer = static_cast<uint8_t>(local.link_layer);
  r.active_mtu = IBV_MTU_2048;
  r.lid = 0x22;
  r.first_psn = 0x4321;
  r.num_qps[rdma::kQpSetHighThroughput] = 1;
  r.qpn[rdma::kQpSetHighThroughput][0] = qpn;
  std::strcpy(r.nic_name, "mlx5_9");
  return r;
}

TEST_F(VerbsBackend, ConnectWalksResetInitRtrRtsWithTheBuiltAttributes) {
  std::unique_ptr<Device> d = openOk();
  std::unique_ptr<RcQp> q;
  ASSERT_EQ(ncclSuccess, RcQp::create(*d, qpSpec(), &q)) << lastError();
  ServiceLevels levels;
  ASSERT_EQ(
      ncclSuccess,
      resolveServiceLevels(
          [](const char* n) -> const char* { return std::string(n) == "NCCL_MOE_IB_SL" ? "5" : nullptr; }, &levels));
  QpConnectConfig config;
  ASSERT_EQ(ncclSuccess, buildConnectConfig(d->identity(), 0x1111, remoteRecord(d->identity(), 0x3456),
                                            rdma::kQpSetHighThroughput, 0, levels.general, &config))
      << lastError();
  EXPECT_EQ(IBV_MTU_2048, config.path_mtu);  // the smaller of 4096 (local) and 2048 (remote)
  EXPECT_EQ(8, config.max_rd_atomic);        // the device maxima, not NCCL's 1
  EXPECT_EQ(16, config.max_dest_rd_atomic);
  EXPECT_EQ(5, config.sl);
  EXPECT_EQ(2, config.port_num);
  ASSERT_EQ(ncclSuccess, q->connect(config, levels.general)) << lastError();
  EXPECT_EQ(IBV_QPS_RTS, q->state());
  ASSERT_EQ(3u, g->mods.size());
  const ibv_qp_state order[] = {IBV_QPS_INIT, IBV_QPS_RTR, IBV_QPS_RTS};
  ibv_qp_state from = IBV_QPS_RESET;
  for (int i = 0; i < 3; ++i) {
    QpTransition t;
    ASSERT_EQ(ncclSuccess, buildQpTransition(config, from, order[i], &t));
    EXPECT_EQ(order[i], g->mods[i].attr.qp_state);
    EXPECT_EQ(t.attr_mask, g->mods[i].mask) << qpStateName(order[i]);
    EXPECT_EQ(0, std::memcmp(&t.attr, &g->mods[i].attr, sizeof(t.attr))) << qpStateName(order[i]);
    from = order[i];
  }
  EXPECT_EQ(0x3456u, g->mods[1].attr.dest_qp_num);
  EXPECT_EQ(0x22, g->mods[1].attr.ah_attr.dlid);
  EXPECT_EQ(5, g->mods[1].attr.ah_attr.sl);
  EXPECT_EQ(0x4321u, g->mods[1].attr.rq_psn);
  EXPECT_EQ(16, g->mods[1].attr.max_dest_rd_atomic);
  EXPECT_EQ(0x1111u, g->mods[2].attr.sq_psn);
  EXPECT_EQ(8, g->mods[2].attr.max_rd_atomic);
  EXPECT_EQ(ncclInvalidUsage, q->connect(config, levels.general));  // only from RESET
  EXPECT_TRUE(contains(lastError(), "is in RTS, not RESET")) << lastError();
}

TEST_F(VerbsBackend, AFailingTransitionNamesItAndLeavesTheStateReached) {
  std::unique_ptr<Device> d = openOk();
  std::unique_ptr<RcQp> q;
  ASSERT_EQ(ncclSuccess, RcQp::create(*d, qpSpec(), &q)) << lastError();
  QpConnectConfig config;
  ASSERT_EQ(ncclSuccess, buildConnectConfig(d->identity(), 1, remoteRecord(d->identity(), 0x3456),
                                            rdma::kQpSetHighThroughput, 0, ServiceLevel{}, &config));
  g->fail = "ibv_modify_qp RTR";
  g->fail_errno = EINVAL;
  EXPECT_EQ(ncclSystemError, q->connect(config, ServiceLevel{}));
  const std::string msg = lastError();
  EXPECT_TRUE(contains(msg, "ibv_modify_qp failed on mlx5_0 port 2: " + std::string(std::strerror(EINVAL)))) << msg;
  EXPECT_TRUE(contains(msg, "INIT -> RTR")) << msg;
  EXPECT_EQ(IBV_QPS_INIT, q->state());
}

TEST_F(VerbsBackend, ConnectConfigRefusesMismatchedLinkLayersAndMissingQps) {
  std::unique_ptr<Device> d = openOk();
  QpConnectConfig config;
  rdma::ConnRecord roce = remoteRecord(d->identity(), 0x3456);
  roce.link_layer = static_cast<uint8_t>(LinkLayer::kEthernet);
  EXPECT_EQ(ncclInvalidUsage,
            buildConnectConfig(d->identity(), 1, roce, rdma::kQpSetHighThroughput, 0, ServiceLevel{}, &config));
  EXPECT_TRUE(contains(lastError(), "rank 1's NIC mlx5_9 port 0 is RoCE but this rank's mlx5_0 port 2 is InfiniBand"))
      << lastError();
  EXPECT_EQ(ncclInvalidUsage, buildConnectConfig(d->identity(), 1, remoteRecord(d->identity(), 0x3456),
                                                 rdma::kQpSetLowLatency, 0, ServiceLevel{}, &config));
  EXPECT_TRUE(contains(lastError(), "lists no low-latency QP 0")) << lastError();
}

TEST_F(VerbsBackend, ADeviceClosedUnderLiveObjectsLeaksInsteadOfClosing) {
  std::unique_ptr<Device> d = openOk();
  d->retain();
  ibv_context* context = d->context();
  ibv_pd* pd = d->pd();
  g->calls.clear();
  d.reset();  // logs a WARN
  EXPECT_TRUE(g->calls.empty()) << "nothing deallocated under a live child";
  // What the real process would keep; the fake frees it.
  fDeallocPd(pd);
  fCloseDevice(context);
}

}  // namespace
}  // namespace nccl_moe::verbs

namespace nccl_moe::verbs {
namespace {

TEST_F(VerbsBackend, HostMapperSharesContainedRangesAndRefusesPartialOverlaps) {
  HostMapper mapper(cuda_);
  Page block(4 * 4096);
  uint8_t* base = static_cast<uint8_t*>(block.p);
  void* dev = nullptr;
  ASSERT_EQ(ncclSuccess, mapper.map(base + 10, 2 * 4096, false, "queue", &dev)) << lastError();
  EXPECT_EQ(base + 10 + kDevOffset, static_cast<uint8_t*>(dev));
  ASSERT_EQ(1u, g->host_regs.size());
  EXPECT_EQ(3u * 4096, g->host_regs.begin()->second.first);  // whole pages around [base + 10, +8192)
  ASSERT_EQ(ncclSuccess, mapper.map(base + 4096 + 8, 8, false, "record", &dev));  // inside: shared, no new call
  EXPECT_EQ(base + 4096 + 8 + kDevOffset, static_cast<uint8_t*>(dev));
  EXPECT_EQ(1u, g->host_regs.size());
  EXPECT_EQ(ncclInternalError, mapper.map(base + 2 * 4096, 2 * 4096, false, "cq", &dev));
  EXPECT_TRUE(contains(lastError(), "cq")) << lastError();
  EXPECT_TRUE(contains(lastError(), "only partly")) << lastError();
  EXPECT_EQ(ncclInternalError, mapper.map(base, 8, true, "uar", &dev));
  EXPECT_TRUE(contains(lastError(), "already mapped as ordinary memory")) << lastError();
  mapper.unmap(base + 10);
  EXPECT_EQ(1u, g->host_regs.size()) << "one user left";
  mapper.unmap(base + 4096 + 8);
  EXPECT_TRUE(g->host_regs.empty());
  ASSERT_EQ(ncclSuccess, mapper.map(base, 8, true, "uar", &dev));
  EXPECT_EQ(1u, mapper.numRegistrations());
  // The destructor unregisters what is left (TearDown checks).
}

}  // namespace
}  // namespace nccl_moe::verbs
