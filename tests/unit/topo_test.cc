// Topology discovery (src/topo): bus-id parsing, the pure PCI distance / nearest-NIC rules on synthetic bus
// hierarchies, discovery of this machine (whatever it has: no GPU and no NIC is a valid answer), an end-to-end
// GPU<->NIC pairing on a hand-written hwloc XML machine (2 NUMA nodes, 4 GPUs, 2 mlx5 NICs behind PCIe
// switches), the text summary, and binding the calling thread to a cpuset.
#include "topo/topo.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"

namespace nccl_moe::topo {
namespace {

// ------------------------------------------------------------------------------------------------
// Bus ids
// ------------------------------------------------------------------------------------------------

TEST(TopoBusId, ParsesTheFormsCudaAndHwlocUse) {
  PciBusId id;
  ASSERT_TRUE(parsePciBusId("0000:1b:00.0", &id));
  EXPECT_EQ(id, (PciBusId{0, 0x1b, 0, 0}));
  ASSERT_TRUE(parsePciBusId("00000000:1B:00.0", &id));  // cudaDeviceGetPCIBusId's long form
  EXPECT_EQ(formatPciBusId(id), "0000:1b:00.0");
  ASSERT_TRUE(parsePciBusId("0001:C3:1f.7", &id));
  EXPECT_EQ(formatPciBusId(id), "0001:c3:1f.7");
  ASSERT_TRUE(parsePciBusId("3b:00.1", &id));  // no domain: domain 0
  EXPECT_EQ(formatPciBusId(id), "0000:3b:00.1");
}

TEST(TopoBusId, RejectsGarbage) {
  for (const char* bad : {"", "gpu0", "0000:1b:00", "0000:1b:00.0 ", " 0000:1b:00.0", "0000:1b:00.0.0", "0x0:1b:00.0",
                          "0000:1b:20.0", "0000:1b:00.8", "0000:100:00.0", "-1:1b:00.0"}) {
    EXPECT_FALSE(parsePciBusId(bad, nullptr)) << "'" << bad << "'";
  }
}

// ------------------------------------------------------------------------------------------------
// Pure distance and pairing rules on synthetic hierarchies
// ------------------------------------------------------------------------------------------------

// Bridge ids of a fake machine: host bridges 1xx, PCI bridges 2xx.
PciBridge hb(uint64_t id) { return PciBridge{id, true}; }
PciBridge br(uint64_t id) { return PciBridge{id, false}; }
PciLocation at(int numa, uint64_t locality, std::vector<PciBridge> bridges) {
  PciLocation loc;
  loc.numa_idx = numa;
  loc.locality_id = locality;
  loc.bridges = std::move(bridges);
  return loc;
}

TEST(TopoDistance, ClassesFromSharedAncestors) {
  // NUMA 0 (locality 10): host bridge 100 -> root port 200 -> switch up 201 -> down ports 202, 203;
  //                       host bridge 101 -> root port 210.
  // NUMA 1 (locality 11): host bridge 110 -> root port 220.
  PciLocation gpu = at(0, 10, {hb(100), br(200), br(201), br(202)});
  PciLocation same_port = at(0, 10, {hb(100), br(200), br(201), br(202)});
  PciLocation same_switch = at(0, 10, {hb(100), br(200), br(201), br(203)});
  PciLocation same_host_bridge = at(0, 10, {hb(100), br(204)});
  PciLocation same_numa = at(0, 10, {hb(101), br(210)});
  PciLocation other_numa = at(1, 11, {hb(110), br(220)});

  PciDistance d = pciDistance(gpu, same_port);
  EXPECT_EQ(d.type, PathType::kSameSwitch);
  EXPECT_EQ(d.hops, 1);
  d = pciDistance(gpu, same_switch);
  EXPECT_EQ(d.type, PathType::kSameSwitch);
  EXPECT_EQ(d.hops, 3);  // down port 202 -> switch 201 -> down port 203
  d = pciDistance(gpu, same_host_bridge);
  EXPECT_EQ(d.type, PathType::kSameHostBridge);
  EXPECT_EQ(d.hops, 5);
  d = pciDistance(gpu, same_numa);
  EXPECT_EQ(d.type, PathType::kSameNuma);
  EXPECT_EQ(d.hops, 6);
  d = pciDistance(gpu, other_numa);
  EXPECT_EQ(d.type, PathType::kCrossNuma);

  // Symmetric.
  for (const PciLocation* other : {&same_port, &same_switch, &same_host_bridge, &same_numa, &other_numa}) {
    PciDistance ab = pciDistance(gpu, *other), ba = pciDistance(*other, gpu);
    EXPECT_EQ(ab.type, ba.type);
    EXPECT_EQ(ab.hops, ba.hops);
  }
  // The order the classes promise.
  EXPECT_TRUE(pciDistance(gpu, same_switch) < pciDistance(gpu, same_host_bridge));
  EXPECT_TRUE(pciDistance(gpu, same_host_bridge) < pciDistance(gpu, same_numa));
  EXPECT_TRUE(pciDistance(gpu, same_numa) < pciDistance(gpu, other_numa));
}

TEST(TopoDistance, UnknownNumaFallsBackToTheCpuSideObject) {
  // Both devices hang off the same CPU-side object that spans several NUMA nodes: same locality.
  EXPECT_EQ(pciDistance(at(-1, 5, {hb(100)}), at(-1, 5, {hb(101)})).type, PathType::kSameNuma);
  // Different objects, one NUMA index unknown: assume the far side.
  EXPECT_EQ(pciDistance(at(-1, 5, {hb(100)}), at(0, 6, {hb(101)})).type, PathType::kCrossNuma);
  // Different objects on one known NUMA node (e.g. a package and its NUMA node's group).
  EXPECT_EQ(pciDistance(at(0, 5, {hb(100)}), at(0, 6, {hb(101)})).type, PathType::kSameNuma);
}

TEST(TopoPairing, NearestWinsAndTiesGoToTheLowerIndex) {
  PciLocation gpu = at(0, 10, {hb(100), br(200), br(201), br(202)});
  std::vector<PciLocation> nics = {
      at(1, 11, {hb(110), br(220)}),                    // 0: other NUMA
      at(0, 10, {hb(100), br(204)}),                    // 1: same host bridge
      at(0, 10, {hb(100), br(200), br(201), br(203)}),  // 2: same switch, 3 hops
      at(0, 10, {hb(100), br(200), br(201), br(205)}),  // 3: same switch, 3 hops (tie with 2)
  };
  PciDistance d;
  EXPECT_EQ(nearestIndex(gpu, nics, &d), 2);
  EXPECT_EQ(d.type, PathType::kSameSwitch);
  EXPECT_EQ(d.hops, 3);

  // Without the switch NICs the host-bridge one wins over the remote one.
  EXPECT_EQ(nearestIndex(gpu, {nics[0], nics[1]}, nullptr), 1);
  // Two equally far remote NICs: the first.
  EXPECT_EQ(nearestIndex(gpu, {nics[0], nics[0]}, nullptr), 0);
  // Within a class, fewer hops wins even at a higher index.
  std::vector<PciLocation> by_hops = {nics[2], at(0, 10, {hb(100), br(200), br(201), br(202)})};
  EXPECT_EQ(nearestIndex(gpu, by_hops, &d), 1);
  EXPECT_EQ(d.hops, 1);
  // Nothing to choose from.
  EXPECT_EQ(nearestIndex(gpu, {}, &d), -1);
}

TEST(TopoPairing, GpusWithoutNicsOrNotFound) {
  Topology t;
  Gpu found;
  found.bus_id = "0000:1b:00.0";
  found.found = true;
  found.location = at(0, 10, {hb(100), br(200)});
  Gpu missing;
  missing.bus_id = "0000:ff:00.0";
  t.gpus = {found, missing};

  pairGpusWithNics(&t);  // no NICs at all
  EXPECT_EQ(t.gpus[0].nic_idx, -1);
  EXPECT_EQ(t.gpus[1].nic_idx, -1);

  Nic nic;
  nic.name = "mlx5_0";
  nic.location = at(1, 11, {hb(110)});
  t.nics = {nic};
  pairGpusWithNics(&t);
  EXPECT_EQ(t.gpus[0].nic_idx, 0);
  EXPECT_EQ(t.gpus[0].nic_distance.type, PathType::kCrossNuma);
  EXPECT_EQ(t.gpus[1].nic_idx, -1);  // a GPU hwloc does not list gets no NIC
  pairGpusWithNics(nullptr);         // tolerated
}

// ------------------------------------------------------------------------------------------------
// Text summary
// ------------------------------------------------------------------------------------------------

TEST(TopoFormat, SummaryNamesEverything) {
  Topology t;
  t.source = "this machine";
  t.num_cpus = 32;
  t.numa_nodes = {NumaNode{0, "0-15", 16, 0}, NumaNode{1, "16-31", 16, 0}};
  Gpu g0;
  g0.bus_id = "00000000:1B:00.0";
  g0.canonical_bus_id = "0000:1b:00.0";
  g0.found = true;
  g0.location.numa_idx = 0;
  g0.cpuset = "0-15";
  Gpu g1;
  g1.bus_id = "bogus";
  t.gpus = {g0, g1};
  std::string text = formatTopology(t);
  EXPECT_EQ(text.rfind("topology: 2 NUMA nodes, 32 CPUs, 2 GPUs, 0 RDMA NICs\n", 0), 0u) << text;
  EXPECT_NE(text.find("  numa 1 cpus 16-31\n"), std::string::npos) << text;
  EXPECT_NE(text.find("  GPU 0000:1b:00.0 numa 0 cpus 0-15 nic none (no RDMA NIC found)\n"), std::string::npos) << text;
  EXPECT_NE(text.find("  GPU bogus not found"), std::string::npos) << text;
  EXPECT_NE(text.find("  no RDMA NIC found\n"), std::string::npos) << text;

  Nic nic;
  nic.name = "mlx5_0";
  nic.bus_id = "0000:1c:00.0";
  nic.num_ports = 1;
  nic.location.numa_idx = 0;
  nic.cpuset = "0-15";
  t.nics = {nic};
  t.gpus[0].nic_idx = 0;
  t.gpus[0].nic_distance = PciDistance{PathType::kSameSwitch, 3};
  text = formatTopology(t);
  EXPECT_NE(text.find("1 RDMA NIC\n"), std::string::npos) << text;
  EXPECT_NE(text.find("nic mlx5_0 (same PCIe switch, 3 hops)"), std::string::npos) << text;
  EXPECT_NE(text.find("  NIC mlx5_0 0000:1c:00.0 ports 1 numa 0 cpus 0-15\n"), std::string::npos) << text;
  EXPECT_EQ(text.find("no RDMA NIC found"), std::string::npos) << text;
}

// ------------------------------------------------------------------------------------------------
// This machine
// ------------------------------------------------------------------------------------------------

TEST(TopoDiscover, ThisMachineWithoutGpus) {
  Topology t;
  ASSERT_EQ(discover({}, &t), ncclSuccess) << threadLastError();
  EXPECT_GE(t.numa_nodes.size(), 1u);
  EXPECT_GE(t.num_cpus, 1);
  EXPECT_FALSE(t.cpuset.empty());
  EXPECT_TRUE(t.gpus.empty());
  int numa_cpus = 0;
  for (const NumaNode& n : t.numa_nodes) numa_cpus += n.num_cpus;
  EXPECT_EQ(numa_cpus, t.num_cpus);
  std::string text = formatTopology(t);
  EXPECT_EQ(text.rfind("topology: ", 0), 0u) << text;
  EXPECT_NE(text.find(", 0 GPUs, "), std::string::npos) << text;
  if (t.nics.empty()) {
    EXPECT_NE(text.find("no RDMA NIC found"), std::string::npos) << text;
  }
  std::printf("%s", text.c_str());  // what hwloc sees here, for the log
}

TEST(TopoDiscover, UnknownBusIdsAreReportedNotFailed) {
  Topology t;
  ASSERT_EQ(discover({"0000:ff:1f.7", "not-a-bus-id"}, &t), ncclSuccess) << threadLastError();
  ASSERT_EQ(t.gpus.size(), 2u);
  EXPECT_FALSE(t.gpus[0].found);
  EXPECT_EQ(t.gpus[0].canonical_bus_id, "0000:ff:1f.7");
  EXPECT_EQ(t.gpus[0].nic_idx, -1);
  EXPECT_FALSE(t.gpus[1].found);
  EXPECT_TRUE(t.gpus[1].canonical_bus_id.empty());
  std::string text = formatTopology(t);
  EXPECT_NE(text.find("GPU 0000:ff:1f.7 not found"), std::string::npos) << text;
  EXPECT_NE(text.find("GPU not-a-bus-id not found"), std::string::npos) << text;
}

TEST(TopoDiscover, NullOutputIsAnError) {
  EXPECT_EQ(discover({}, nullptr), ncclInvalidArgument);
  EXPECT_NE(std::string(threadLastError()).find("NULL"), std::string::npos);
}

// ------------------------------------------------------------------------------------------------
// A fake machine in hwloc XML: 2 packages, each with one NUMA node and 4 PUs.
//   NUMA 0: host bridge -> root port 00:01.0 -> switch 01:00.0 -> ports 02:00.0 (GPU 03:00.0),
//           02:01.0 (GPU 04:00.0), 02:02.0 (NIC 05:00.0 = mlx5_0, 1 port)
//   NUMA 1: host bridge -> root port 80:01.0 -> switch 81:00.0 -> ports 82:00.0 (GPU 83:00.0),
//           82:01.0 (NIC 84:00.0 = mlx5_1, 2 ports)
//           host bridge -> root port 80:02.0 -> GPU 86:00.0 (not behind the switch)
// ------------------------------------------------------------------------------------------------

std::string cpusetAttrs(const char* mask) {
  return std::string("cpuset=\"") + mask + "\" complete_cpuset=\"" + mask + "\"";
}

std::string pciBridge(int gp, const char* busid, const char* range, int depth, const std::string& children) {
  return "<object type=\"Bridge\" gp_index=\"" + std::to_string(gp) + "\" bridge_type=\"1-1\" depth=\"" +
         std::to_string(depth) + "\" bridge_pci=\"0000:[" + range + "]\" pci_busid=\"" + busid +
         "\" pci_type=\"0604 [10b5:c010] [0000:0000] 01\" pci_link_speed=\"0.000000\">\n" + children + "</object>\n";
}

std::string gpuDev(int gp, const char* busid) {
  return "<object type=\"PCIDev\" gp_index=\"" + std::to_string(gp) + "\" pci_busid=\"" + busid +
         "\" pci_type=\"0302 [10de:2335] [10de:18be] a1\" pci_link_speed=\"0.000000\"/>\n";
}

std::string nicDev(int gp, const char* busid, const char* name, int ports) {
  std::string infos;
  for (int p = 1; p <= ports; ++p) {
    infos += "<info name=\"Port" + std::to_string(p) + "State\" value=\"4\"/>\n";
    infos += "<info name=\"Port" + std::to_string(p) + "LID\" value=\"0x" + std::to_string(p) + "\"/>\n";
  }
  return "<object type=\"PCIDev\" gp_index=\"" + std::to_string(gp) + "\" pci_busid=\"" + busid +
         "\" pci_type=\"0207 [15b3:101b] [15b3:0007] 00\" pci_link_speed=\"0.000000\">\n"
         "<object type=\"OSDev\" gp_index=\"" +
         std::to_string(gp + 1) + "\" name=\"" + name +
         "\" osdev_type=\"3\">\n<info name=\"NodeGUID\" value=\"0000:0000:0000:000" + std::to_string(gp % 10) +
         "\"/>\n" + infos + "</object>\n</object>\n";
}

std::string pus(int first_gp, int first_pu, int nodeset) {
  std::string out;
  for (int i = 0; i < 4; ++i) {
    char mask[16];
    std::snprintf(mask, sizeof(mask), "0x%08x", 1u << (first_pu + i));
    char ns[16];
    std::snprintf(ns, sizeof(ns), "0x%08x", nodeset);
    out += "<object type=\"PU\" os_index=\"" + std::to_string(first_pu + i) + "\" " + cpusetAttrs(mask) +
           " nodeset=\"" + ns + "\" complete_nodeset=\"" + ns + "\" gp_index=\"" + std::to_string(first_gp + i) +
           "\"/>\n";
  }
  return out;
}

std::string fakeMachineXml(bool with_second_nic) {
  std::string numa1_switch_ports = pciBridge(60, "0000:82:00.0", "83-83", 3, gpuDev(61, "0000:83:00.0"));
  if (with_second_nic) {
    numa1_switch_ports += pciBridge(62, "0000:82:01.0", "84-84", 3, nicDev(63, "0000:84:00.0", "mlx5_1", 2));
  }
  std::string xml =
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<!DOCTYPE topology SYSTEM \"hwloc2.dtd\">\n"
      "<topology version=\"2.0\">\n"
      "<object type=\"Machine\" os_index=\"0\" " +
      cpusetAttrs("0x000000ff") +
      " allowed_cpuset=\"0x000000ff\" nodeset=\"0x00000003\" complete_nodeset=\"0x00000003\""
      " allowed_nodeset=\"0x00000003\" gp_index=\"1\">\n"
      // Package 0 / NUMA 0
      "<object type=\"Package\" os_index=\"0\" " +
      cpusetAttrs("0x0000000f") +
      " nodeset=\"0x00000001\" complete_nodeset=\"0x00000001\" gp_index=\"2\">\n"
      "<object type=\"NUMANode\" os_index=\"0\" " +
      cpusetAttrs("0x0000000f") +
      " nodeset=\"0x00000001\" complete_nodeset=\"0x00000001\" gp_index=\"3\" local_memory=\"68719476736\"/>\n" +
      pus(10, 0, 1) +
      "<object type=\"Bridge\" gp_index=\"30\" bridge_type=\"0-1\" depth=\"0\" bridge_pci=\"0000:[00-0f]\">\n" +
      pciBridge(31, "0000:00:01.0", "01-05", 1,
                pciBridge(32, "0000:01:00.0", "02-05", 2,
                          pciBridge(33, "0000:02:00.0", "03-03", 3, gpuDev(34, "0000:03:00.0")) +
                              pciBridge(35, "0000:02:01.0", "04-04", 3, gpuDev(36, "0000:04:00.0")) +
                              pciBridge(37, "0000:02:02.0", "05-05", 3, nicDev(38, "0000:05:00.0", "mlx5_0", 1)))) +
      "</object>\n"
      "</object>\n"
      // Package 1 / NUMA 1
      "<object type=\"Package\" os_index=\"1\" " +
      cpusetAttrs("0x000000f0") +
      " nodeset=\"0x00000002\" complete_nodeset=\"0x00000002\" gp_index=\"4\">\n"
      "<object type=\"NUMANode\" os_index=\"1\" " +
      cpusetAttrs("0x000000f0") +
      " nodeset=\"0x00000002\" complete_nodeset=\"0x00000002\" gp_index=\"5\" local_memory=\"68719476736\"/>\n" +
      pus(20, 4, 2) +
      "<object type=\"Bridge\" gp_index=\"50\" bridge_type=\"0-1\" depth=\"0\" bridge_pci=\"0000:[80-8f]\">\n" +
      pciBridge(51, "0000:80:01.0", "81-84", 1, pciBridge(52, "0000:81:00.0", "82-84", 2, numa1_switch_ports)) +
      pciBridge(53, "0000:80:02.0", "86-86", 1, gpuDev(54, "0000:86:00.0")) +
      "</object>\n"
      "</object>\n"
      "</object>\n"
      "</topology>\n";
  return xml;
}

// What a caller passes: cudaDeviceGetPCIBusId's upper-case, 8-digit-domain form.
const std::vector<std::string> kFakeGpus = {"00000000:03:00.0", "00000000:04:00.0", "00000000:83:00.0",
                                            "00000000:86:00.0"};

TEST(TopoXml, PairsFourGpusWithTwoNics) {
  Topology t;
  ASSERT_EQ(discoverFromXml(fakeMachineXml(true), kFakeGpus, &t), ncclSuccess) << threadLastError();
  std::string text = formatTopology(t);
  SCOPED_TRACE(text);
  std::printf("%s", text.c_str());
  EXPECT_EQ(t.source, "xml");
  EXPECT_EQ(t.num_packages, 2);
  EXPECT_EQ(t.num_cpus, 8);
  ASSERT_EQ(t.numa_nodes.size(), 2u);
  EXPECT_EQ(t.numa_nodes[0].cpuset, "0-3");
  EXPECT_EQ(t.numa_nodes[1].cpuset, "4-7");
  EXPECT_EQ(t.numa_nodes[1].memory_bytes, 68719476736ull);

  ASSERT_EQ(t.nics.size(), 2u);
  EXPECT_EQ(t.nics[0].name, "mlx5_0");
  EXPECT_EQ(t.nics[0].bus_id, "0000:05:00.0");
  EXPECT_EQ(t.nics[0].num_ports, 1);
  EXPECT_EQ(t.nics[0].location.numa_idx, 0);
  EXPECT_EQ(t.nics[0].cpuset, "0-3");
  EXPECT_EQ(t.nics[1].name, "mlx5_1");
  EXPECT_EQ(t.nics[1].bus_id, "0000:84:00.0");
  EXPECT_EQ(t.nics[1].num_ports, 2);
  EXPECT_EQ(t.nics[1].location.numa_idx, 1);

  ASSERT_EQ(t.gpus.size(), 4u);
  const int expect_numa[4] = {0, 0, 1, 1};
  const char* expect_cpus[4] = {"0-3", "0-3", "4-7", "4-7"};
  const int expect_nic[4] = {0, 0, 1, 1};
  const PathType expect_type[4] = {PathType::kSameSwitch, PathType::kSameSwitch, PathType::kSameSwitch,
                                   PathType::kSameHostBridge};
  const int expect_hops[4] = {3, 3, 3, 5};
  for (int g = 0; g < 4; ++g) {
    SCOPED_TRACE("GPU " + std::to_string(g));
    const Gpu& gpu = t.gpus[g];
    EXPECT_TRUE(gpu.found);
    EXPECT_EQ(gpu.bus_id, kFakeGpus[g]);
    EXPECT_EQ(gpu.vendor_id, 0x10de);
    EXPECT_EQ(gpu.class_id, 0x0302);
    EXPECT_EQ(gpu.location.numa_idx, expect_numa[g]);
    EXPECT_EQ(gpu.cpuset, expect_cpus[g]);
    EXPECT_EQ(gpu.nic_idx, expect_nic[g]);
    EXPECT_EQ(gpu.nic_distance.type, expect_type[g]);
    EXPECT_EQ(gpu.nic_distance.hops, expect_hops[g]);
  }
  // The bridges hwloc built: host bridge on top, PCI bridges below.
  ASSERT_EQ(t.gpus[0].location.bridges.size(), 4u);
  EXPECT_TRUE(t.gpus[0].location.bridges[0].host_bridge);
  EXPECT_FALSE(t.gpus[0].location.bridges[3].host_bridge);

  EXPECT_EQ(text.rfind("topology: 2 NUMA nodes, 8 CPUs, 4 GPUs, 2 RDMA NICs (from xml)\n", 0), 0u);
  EXPECT_NE(text.find("  GPU 0000:03:00.0 numa 0 cpus 0-3 nic mlx5_0 (same PCIe switch, 3 hops)\n"), std::string::npos);
  EXPECT_NE(text.find("  GPU 0000:86:00.0 numa 1 cpus 4-7 nic mlx5_1 (same host bridge, 5 hops)\n"), std::string::npos);
  EXPECT_NE(text.find("  NIC mlx5_1 0000:84:00.0 ports 2 numa 1 cpus 4-7\n"), std::string::npos);
}

TEST(TopoXml, GpusOfTheNicLessNodeCrossNuma) {
  Topology t;
  ASSERT_EQ(discoverFromXml(fakeMachineXml(false), kFakeGpus, &t), ncclSuccess) << threadLastError();
  SCOPED_TRACE(formatTopology(t));
  ASSERT_EQ(t.nics.size(), 1u);
  for (int g = 0; g < 4; ++g) EXPECT_EQ(t.gpus[g].nic_idx, 0) << g;
  EXPECT_EQ(t.gpus[0].nic_distance.type, PathType::kSameSwitch);
  EXPECT_EQ(t.gpus[2].nic_distance.type, PathType::kCrossNuma);
  EXPECT_EQ(t.gpus[3].nic_distance.type, PathType::kCrossNuma);
}

TEST(TopoXml, BadXmlIsAnErrorNotACrash) {
  Topology t;
  EXPECT_NE(discoverFromXml("this is not xml", {}, &t), ncclSuccess);
  EXPECT_NE(std::string(threadLastError()), "");
  std::printf("bad XML reports: %s\n", threadLastError());
  EXPECT_EQ(discoverFromXml("", {}, &t), ncclInvalidArgument);
}

// ------------------------------------------------------------------------------------------------
// Thread binding (in a helper thread, so the test runner's own binding is untouched)
// ------------------------------------------------------------------------------------------------

TEST(TopoBind, BindsTheCallingThread) {
  Topology t;
  ASSERT_EQ(discover({}, &t), ncclSuccess) << threadLastError();
  ASSERT_FALSE(t.numa_nodes.empty());
  std::string numa0_cpus;
  for (const NumaNode& n : t.numa_nodes) {
    if (!n.cpuset.empty()) {
      numa0_cpus = n.cpuset;
      break;
    }
  }
  ASSERT_FALSE(numa0_cpus.empty());

  std::thread worker([&] {
    std::string before, after;
    ASSERT_EQ(callingThreadBinding(&before), ncclSuccess) << threadLastError();
    EXPECT_FALSE(before.empty());

    ASSERT_EQ(bindCallingThread(numa0_cpus), ncclSuccess) << threadLastError();
    ASSERT_EQ(callingThreadBinding(&after), ncclSuccess) << threadLastError();
    EXPECT_EQ(after, numa0_cpus);

    // One CPU: the first this process may use.
    std::string first_cpu = t.cpuset.substr(0, t.cpuset.find_first_of("-,"));
    ASSERT_EQ(bindCallingThread(first_cpu), ncclSuccess) << threadLastError();
    ASSERT_EQ(callingThreadBinding(&after), ncclSuccess) << threadLastError();
    EXPECT_EQ(after, first_cpu);

    // Near a GPU: a topology whose GPU is local to the first NUMA node with CPUs.
    Topology with_gpu = t;
    Gpu gpu;
    gpu.bus_id = "0000:1b:00.0";
    gpu.found = true;
    gpu.cpuset = numa0_cpus;
    with_gpu.gpus = {gpu};
    ASSERT_EQ(bindCallingThreadNearGpu(with_gpu, 0), ncclSuccess) << threadLastError();
    ASSERT_EQ(callingThreadBinding(&after), ncclSuccess) << threadLastError();
    EXPECT_EQ(after, numa0_cpus);
  });
  worker.join();
}

TEST(TopoBind, BadRequestsReturnErrors) {
  std::thread worker([] {
    EXPECT_EQ(bindCallingThread(""), ncclInvalidArgument);
    EXPECT_EQ(bindCallingThread("cpus please"), ncclInvalidArgument);
    EXPECT_EQ(bindCallingThread("100000"), ncclInvalidArgument);  // no such CPU here
    EXPECT_NE(std::string(threadLastError()).find("100000"), std::string::npos) << threadLastError();
    Topology t;
    EXPECT_EQ(bindCallingThreadNearGpu(t, 0), ncclInvalidArgument);
    Gpu missing;
    missing.bus_id = "0000:ff:00.0";
    t.gpus = {missing};
    EXPECT_EQ(bindCallingThreadNearGpu(t, 0), ncclInvalidArgument);
    EXPECT_EQ(bindCallingThreadNearGpu(t, -1), ncclInvalidArgument);
    EXPECT_EQ(callingThreadBinding(nullptr), ncclInvalidArgument);
  });
  worker.join();
}

}  // namespace
}  // namespace nccl_moe::topo
