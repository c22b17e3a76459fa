// moe-perf's transport mode, its pure parts (perf/transport.h, perf/options.h): option parsing and defaults, the
// NCCL_MOE_NET check, the software-NIC label on every row / banner / note, the timestamp reduction, and the JSON
// row's fields.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "options.h"
#include "transport.h"

namespace nccl_moe::perf {
namespace {

Options parse(const std::vector<std::string>& args) {
  Options o;
  std::string err;
  EXPECT_TRUE(parseOptions(args, &o, &err)) << err;
  return o;
}

std::string parseError(const std::vector<std::string>& args) {
  Options o;
  std::string err;
  EXPECT_FALSE(parseOptions(args, &o, &err));
  return err;
}

TEST(PerfTransport, ModeAndDefaults) {
  const Options o = parse({"--mode", "transport"});
  EXPECT_TRUE(o.transport);
  EXPECT_TRUE(o.modes.empty());
  const TransportConfig c = resolveTransport(o);
  ASSERT_EQ(20u, c.sizes.size());  // 8 B .. 4 MB, x2
  EXPECT_EQ(8, c.sizes.front());
  EXPECT_EQ(int64_t{4} << 20, c.sizes.back());
  EXPECT_EQ((std::vector<NetBackend>{NetBackend::kIbgda, NetBackend::kDbProxy, NetBackend::kProxy}), c.backends);
  ASSERT_EQ(2u, c.ops.size());
  EXPECT_EQ(8, c.batch);
  EXPECT_EQ(20, c.iters);
  EXPECT_EQ(5, c.warmup);
  EXPECT_TRUE(c.check);
  // A later --mode replaces it, as it replaces ht/ll.
  EXPECT_FALSE(parse({"--mode", "transport", "--mode", "ht"}).transport);
}

TEST(PerfTransport, SizesAreBytesLikeNcclTests) {
  TransportConfig c = resolveTransport(parse({"--mode=transport", "-b", "1", "-e", "1K", "-f", "4"}));
  EXPECT_EQ((std::vector<int64_t>{1, 4, 16, 64, 256, 1024}), c.sizes);
  c = resolveTransport(parse({"--mode", "transport", "-b", "4K"}));  // -b alone: one size
  EXPECT_EQ((std::vector<int64_t>{4096}), c.sizes);
  c = resolveTransport(parse({"--mode", "transport", "--tokens", "2M"}));
  EXPECT_EQ((std::vector<int64_t>{2 << 20}), c.sizes);
  c = resolveTransport(parse({"--mode", "transport", "-b", "100", "-e", "400", "-i", "100"}));
  EXPECT_EQ((std::vector<int64_t>{100, 200, 300, 400}), c.sizes);
  EXPECT_EQ(64, TransportConfig::slotBytes(1));
  EXPECT_EQ(64, TransportConfig::slotBytes(64));
  EXPECT_EQ(128, TransportConfig::slotBytes(65));
}

TEST(PerfTransport, BackendsBatchAndRunOptions) {
  TransportConfig c = resolveTransport(
      parse({"--mode", "transport", "--net-mode", "proxy", "--batch", "32", "-n", "3", "-w", "0", "-c", "0"}));
  EXPECT_EQ((std::vector<NetBackend>{NetBackend::kProxy}), c.backends);
  EXPECT_EQ(32, c.batch);
  EXPECT_EQ(3, c.iters);
  EXPECT_EQ(0, c.warmup);
  EXPECT_FALSE(c.check);
  c = resolveTransport(parse({"--mode", "transport", "--net-mode=ibgda"}));
  EXPECT_EQ((std::vector<NetBackend>{NetBackend::kIbgda}), c.backends);
  EXPECT_STREQ("ibgda", netBackendName(NetBackend::kIbgda));
  EXPECT_STREQ("proxy", netBackendName(NetBackend::kProxy));
  EXPECT_STREQ("dbproxy", netBackendName(NetBackend::kDbProxy));
  c = resolveTransport(parse({"--mode", "transport", "--net-mode", "dbproxy,ibgda"}));
  EXPECT_EQ((std::vector<NetBackend>{NetBackend::kDbProxy, NetBackend::kIbgda}), c.backends);
  EXPECT_STREQ("put", transportOpName(TransportOp::kPut));
  EXPECT_STREQ("put_signal", transportOpName(TransportOp::kPutSignal));
}

TEST(PerfTransport, Errors) {
  EXPECT_NE(std::string::npos, parseError({"--mode", "ht,transport"}).find("runs alone"));
  EXPECT_NE(std::string::npos, parseError({"--mode", "transport,ll"}).find("runs alone"));
  EXPECT_NE(std::string::npos, parseError({"--mode", "nic"}).find("transport"));
  EXPECT_NE(std::string::npos, parseError({"--mode", "transport", "--net-mode", "gda"}).find("--net-mode"));
  EXPECT_NE(std::string::npos, parseError({"--mode", "transport", "--batch", "33"}).find("--batch"));
  EXPECT_NE(std::string::npos, parseError({"--mode", "transport", "--batch", "0"}).find("--batch"));
  EXPECT_NE(std::string::npos, parseError({"--net-mode", "proxy"}).find("belong to --mode transport"));
  EXPECT_NE(std::string::npos, parseError({"--mode", "ht", "--batch", "4"}).find("belong to --mode transport"));

  EXPECT_EQ("", checkTransportOptions(parse({"--mode", "transport"})));
  // Bytes in flight: the defaults (8 x 4 MiB) fit the software NIC's staging; more does not.
  EXPECT_EQ("", checkTransportConfig(resolveTransport(parse({"--mode", "transport"}))));
  EXPECT_EQ("", checkTransportConfig(resolveTransport(parse({"--mode", "transport", "-b", "16M", "--batch", "2"}))));
  const std::string big = checkTransportConfig(resolveTransport(parse({"--mode", "transport", "--batch", "9"})));
  EXPECT_NE(std::string::npos, big.find("--batch 9 x 4194304 B")) << big;
  EXPECT_NE("", checkTransportOptions(parse({"--mode", "transport", "--procs", "2"})));
  EXPECT_NE("", checkTransportOptions(parse({"--mode", "transport", "--ranks-per-gpu", "2"})));
  EXPECT_NE("", checkTransportOptions(parse({"--mode", "transport", "--ranks-per-node", "1"})));
  EXPECT_NE("", checkTransportOptions(parse({"--mode", "transport", "--metrics", "extra"})));
  EXPECT_NE("", checkTransportOptions(parse({"--mode", "transport", "--inject-skipped-write"})));
}

TEST(PerfTransport, OnlyTheSoftwareNicWhenAskedFor) {
  EXPECT_EQ("", checkTransportNet("emulated"));
  for (const char* v : {static_cast<const char*>(nullptr), "", "auto", "ib"}) {
    const std::string e = checkTransportNet(v);
    EXPECT_NE(std::string::npos, e.find("no verbs backend")) << e;
    EXPECT_NE(std::string::npos, e.find("NCCL_MOE_NET=emulated")) << e;
  }
  EXPECT_NE(std::string::npos, checkTransportNet("soft").find("expected auto, ib or emulated"));
}

TEST(PerfTransport, TimestampsReduceToLatencyAndStreamBandwidth) {
  TransportTimes t;
  t.lat_start_ns = {1000, 5000, 9000};
  t.lat_end_ns = {3000, 9000, 12000};  // 2, 4, 3 us
  t.batch_start_ns = {100000, 200000};
  t.batch_end_ns = {110000, 230000};  // 10, 30 us
  TransportStats s;
  std::string err;
  ASSERT_TRUE(summarizeTransport(t, 1 << 20, 8, &s, &err)) << err;
  EXPECT_DOUBLE_EQ(3.0, s.median_us);
  EXPECT_DOUBLE_EQ(2.0, s.min_us);
  EXPECT_DOUBLE_EQ(4.0, s.max_us);
  EXPECT_DOUBLE_EQ(20.0, s.batch_median_us);
  EXPECT_DOUBLE_EQ(8.0 * (1 << 20) / 20.0 / 1e3, s.bandwidth_gbps);

  TransportTimes backwards = t;
  backwards.lat_end_ns[1] = 4000;
  EXPECT_FALSE(summarizeTransport(backwards, 8, 8, &s, &err));
  EXPECT_NE(std::string::npos, err.find("latency iteration 1")) << err;
  TransportTimes missing = t;
  missing.batch_start_ns[0] = 0;  // never recorded (the kernel stopped before it)
  EXPECT_FALSE(summarizeTransport(missing, 8, 8, &s, &err));
  EXPECT_NE(std::string::npos, err.find("stream batch 0")) << err;
  EXPECT_FALSE(summarizeTransport(TransportTimes(), 8, 8, &s, &err));
}

TransportRow sampleRow() {
  TransportRow r;
  r.net_backend = NetBackend::kProxy;
  r.op = TransportOp::kPutSignal;
  r.bytes = 4096;
  r.batch = 8;
  r.iters = 20;
  r.warmup = 5;
  r.chaos_seed = 7;
  r.available = true;
  r.checked = true;
  r.stats.median_us = 12.5;
  r.stats.min_us = 10;
  r.stats.max_us = 20;
  r.stats.batch_median_us = 50;
  r.stats.bandwidth_gbps = 0.655;
  r.gpu_name = "NVIDIA H200";
  r.git_sha = "abc1234";
  return r;
}

TEST(PerfTransport, JsonRowSaysSoftwareNicAndBackend) {
  const std::string j = transportToJson(sampleRow());
  for (const char* field : {"\"mode\":\"transport\"",
                            "\"op\":\"put_signal\"",
                            "\"backend\":\"gpu\"",
                            "\"transport\":\"software_nic\"",
                            "\"software_nic\":true",
                            "\"net_backend\":\"proxy\"",
                            "\"label\":\"software NIC \xe2\x80\x94 correctness/functional timing, not performance\"",
                            "\"gpus\":1",
                            "\"ranks\":2",
                            "\"shared_gpu\":true",
                            "\"nodes\":2",
                            "\"bytes\":4096",
                            "\"batch\":8",
                            "\"iters\":20",
                            "\"warmup\":5",
                            "\"chaos_seed\":7",
                            "\"available\":true",
                            "\"median_us\":12.500",
                            "\"min_us\":10.000",
                            "\"max_us\":20.000",
                            "\"batch_median_us\":50.000",
                            "\"bandwidth_gbps\":0.655",
                            "\"timer\":\"globaltimer\"",
                            "\"checked\":true",
                            "\"verified\":true",
                            "\"wrong\":0",
                            "\"error\":null",
                            "\"gpu_name\":\"NVIDIA H200\"",
                            "\"git_sha\":\"abc1234\""})
    EXPECT_NE(std::string::npos, j.find(field)) << field << " in " << j;
  EXPECT_EQ('{', j.front());
  EXPECT_EQ('}', j.back());
  // No MoE shape keys: a transport row is never mistaken for dispatch/combine.
  for (const char* key : {"\"dtype\"", "\"tokens\"", "\"hidden\"", "\"logical_gbps\"", "\"baseline_median_us\""})
    EXPECT_EQ(std::string::npos, j.find(key)) << key;

  TransportRow bad = sampleRow();
  bad.wrong = 3;
  EXPECT_NE(std::string::npos, transportToJson(bad).find("\"verified\":false"));
  EXPECT_NE(std::string::npos, transportToJson(bad).find("\"wrong\":3"));
  TransportRow failed = sampleRow();
  failed.available = false;
  failed.error = "phase net-quiet: rank 0 \"x\"";
  const std::string f = transportToJson(failed);
  EXPECT_NE(std::string::npos, f.find("\"median_us\":null")) << f;
  EXPECT_NE(std::string::npos, f.find("\"bandwidth_gbps\":null")) << f;
  EXPECT_NE(std::string::npos, f.find("\"verified\":false")) << f;
  EXPECT_NE(std::string::npos, f.find("\"error\":\"phase net-quiet: rank 0 \\\"x\\\"\"")) << f;
  EXPECT_NE(std::string::npos, f.find("\"software_nic\":true")) << f;
}

TEST(PerfTransport, EveryTableLineBannerAndNoteCarriesTheLabel) {
  const std::string label = kSoftNicLabel;
  EXPECT_EQ("software NIC \xe2\x80\x94 correctness/functional timing, not performance", label);
  const std::string row = transportTableRow(sampleRow());
  EXPECT_NE(std::string::npos, row.find("[" + label + "]")) << row;
  EXPECT_NE(std::string::npos, row.find("proxy")) << row;
  EXPECT_NE(std::string::npos, row.find("put_signal")) << row;
  EXPECT_NE(std::string::npos, row.find("12.50")) << row;
  EXPECT_EQ('\n', row.back());
  EXPECT_EQ(row.size() - 1, row.find('\n'));  // one line

  TransportRow failed = sampleRow();
  failed.available = false;
  failed.error = "a\nb";
  const std::string f = transportTableRow(failed);
  EXPECT_NE(std::string::npos, f.find("not available: a b")) << f;
  EXPECT_NE(std::string::npos, f.find("[" + label + "]")) << f;
  EXPECT_NE(std::string::npos, f.find("n/a")) << f;

  const std::string header = transportTableHeader();
  EXPECT_EQ('#', header.front());
  for (const char* col : {"bytes", "backend", "op", "batch", "lat_us", "batch_us", "GB/s", "#wrong"})
    EXPECT_NE(std::string::npos, header.find(col)) << col;

  for (uint64_t seed : {uint64_t{0}, uint64_t{42}}) {
    const std::string b = transportBanner(seed);
    EXPECT_NE(std::string::npos, b.find(label)) << b;
    EXPECT_NE(std::string::npos, b.find("SOFTWARE NIC")) << b;
    EXPECT_NE(std::string::npos, b.find("2 virtual nodes on GPU 0")) << b;
    EXPECT_NE(std::string::npos, b.find(seed != 0 ? "NCCL_MOE_EMU_CHAOS=42" : "chaos off")) << b;
    size_t start = 0;  // every line is a comment line
    while (start < b.size()) {
      EXPECT_EQ('#', b[start]) << b.substr(start);
      start = b.find('\n', start) + 1;
    }
  }
  const std::string notes = transportNotes(8);
  EXPECT_NE(std::string::npos, notes.find(label)) << notes;
  EXPECT_NE(std::string::npos, notes.find("8 x bytes / batch_us")) << notes;
}

// ---- MoE rows of a multi-node communicator (internode LL on virtual nodes) ----

TEST(PerfTransport, CommNodesRefuseADisagreeingLayoutBeforeAnyCall) {
  const std::vector<Mode> ll = {Mode::kLl}, ht = {Mode::kHt}, all = {Mode::kHt, Mode::kLl};
  // One node: nothing refused; --ranks-per-node keeps its meaning (a modelled layout).
  EXPECT_EQ("", checkCommNodes(all, 0, 4, 1));
  EXPECT_EQ("", checkCommNodes(ht, 2, 4, 1));
  // Several nodes: LL runs, with or without a --ranks-per-node that agrees.
  EXPECT_EQ("", checkCommNodes(ll, 0, 4, 2));
  EXPECT_EQ("", checkCommNodes(ll, 2, 4, 2));
  EXPECT_EQ("", checkCommNodes(ll, 0, 8, 4));
  // HT (alone or through --mode all) runs internode too.
  EXPECT_EQ("", checkCommNodes(ht, 0, 4, 2));
  EXPECT_EQ("", checkCommNodes(all, 2, 8, 4));
  // Nodes of unequal size are refused, naming them.
  const std::string u = checkCommNodes(ht, 0, 6, 4);
  EXPECT_NE(std::string::npos, u.find("span 4 nodes")) << u;
  EXPECT_NE(std::string::npos, u.find("does not split them into nodes of equal size")) << u;
  // A --ranks-per-node that is not the communicator's layout.
  const std::string d = checkCommNodes(ll, 4, 4, 2);
  EXPECT_NE(std::string::npos, d.find("--ranks-per-node 4 disagrees with the communicator")) << d;
  EXPECT_NE(std::string::npos, d.find("2 ranks per node")) << d;
  EXPECT_NE(std::string::npos, d.find("--ranks-per-node 2")) << d;
  EXPECT_NE("", checkCommNodes(ll, 1, 4, 2));
  // A node count that does not split the ranks evenly (the library never builds one; refused rather than guessed).
  EXPECT_NE(std::string::npos, checkCommNodes(ll, 0, 6, 4).find("nodes of equal size"));
}

TEST(PerfTransport, CommNodesGiveTheRowsTheirLayout) {
  EXPECT_EQ(0, layoutRanksPerNode(0, 4, 1));  // one node, no --ranks-per-node
  EXPECT_EQ(2, layoutRanksPerNode(2, 4, 1));  // one node: the modelled layout of --ranks-per-node
  EXPECT_EQ(2, layoutRanksPerNode(0, 4, 2));  // the communicator's: 4 ranks / 2 nodes
  EXPECT_EQ(2, layoutRanksPerNode(2, 4, 2));
  EXPECT_EQ(1, layoutRanksPerNode(0, 4, 4));
  EXPECT_EQ(4, layoutRanksPerNode(0, 8, 2));
}

TEST(PerfTransport, InternodeMoeBannerCarriesTheLabel) {
  const std::string b = softNicMoeBanner(2, 4, 1);
  EXPECT_NE(std::string::npos, b.find(std::string("# !!! ") + kSoftNicLabel + "\n")) << b;
  EXPECT_NE(std::string::npos, b.find("4 ranks on 1 GPU form 2 virtual nodes of 2 ranks (NCCL_MOE_EMULATE_NODES)"))
      << b;
  const std::string p = softNicMoeBanner(2, 2, 1, true);  // processes, each its own node through NCCL_HOSTID
  EXPECT_NE(std::string::npos, p.find("2 processes on 1 GPU form 2 virtual nodes of 1 ranks (a node per NCCL_HOSTID"))
      << p;
  EXPECT_NE(std::string::npos, b.find("software NIC")) << b;
  EXPECT_NE(std::string::npos, b.find("verified")) << b;
  size_t start = 0;
  while (start < b.size()) {  // every line is a "# !!!" comment
    EXPECT_EQ(0u, b.compare(start, 6, "# !!! ")) << b.substr(start);
    start = b.find('\n', start) + 1;
  }
  EXPECT_EQ('\n', b.back());
  EXPECT_STREQ("software_nic", kSoftNicTransport);
}

}  // namespace
}  // namespace nccl_moe::perf
