// Connection records (src/transport/rdma/conn_record.h): pack/unpack round trip and the fixed wire layout,
// rejection of foreign, mis-sized, other-version and over-capacity records, and detection of disagreement
// between ranks (slot, addressee, rank count, version, link layer, QPs per set, windows) with the ranks and
// fields named.
#include "transport/rdma/conn_record.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"

namespace {

namespace r = nccl_moe::rdma;

std::string lastError() { return nccl_moe::threadLastError(); }

r::ConnRecord makeRecord(int rank, int peer, int num_ranks, std::mt19937_64& rng) {
  r::ConnRecord c;
  c.rank = rank;
  c.peer = peer;
  c.num_ranks = num_ranks;
  c.node = rank / 8;
  std::snprintf(c.nic_name, sizeof(c.nic_name), "mlx5_%d", rank % 8);
  c.nic_guid = rng();
  c.port = 1;
  c.link_layer = 0;
  c.active_mtu = 5;
  c.gid_index = 3;
  c.lid = static_cast<uint16_t>(rng());
  for (uint8_t& b : c.gid) b = static_cast<uint8_t>(rng());
  c.first_psn = static_cast<uint32_t>(rng()) & 0xffffff;
  c.num_qps[r::kQpSetHighThroughput] = 24;
  c.num_qps[r::kQpSetLowLatency] = 8;
  for (int s = 0; s < r::kNumQpSets; ++s)
    for (int q = 0; q < c.num_qps[s]; ++q) c.qpn[s][q] = static_cast<uint32_t>(rng()) & 0xffffff;
  c.num_windows = 2;
  c.windows[0] = {0x7f0000000000ull + rng() % 4096 * 4096, 1ull << 30, static_cast<uint32_t>(rng())};
  c.windows[1] = {0x7f8000000000ull, 1ull << 20, static_cast<uint32_t>(rng())};
  c.sl[r::kQpSetHighThroughput] = 3;
  c.sl[r::kQpSetLowLatency] = 5;
  c.traffic_class[r::kQpSetHighThroughput] = 0x60;
  c.traffic_class[r::kQpSetLowLatency] = 0xa0;
  return c;
}

void expectSame(const r::ConnRecord& a, const r::ConnRecord& b) {
  EXPECT_EQ(a.version, b.version);
  EXPECT_EQ(a.rank, b.rank);
  EXPECT_EQ(a.peer, b.peer);
  EXPECT_EQ(a.num_ranks, b.num_ranks);
  EXPECT_EQ(a.node, b.node);
  EXPECT_STREQ(a.nic_name, b.nic_name);
  EXPECT_EQ(a.nic_guid, b.nic_guid);
  EXPECT_EQ(a.port, b.port);
  EXPECT_EQ(a.link_layer, b.link_layer);
  EXPECT_EQ(a.active_mtu, b.active_mtu);
  EXPECT_EQ(a.gid_index, b.gid_index);
  EXPECT_EQ(a.lid, b.lid);
  EXPECT_EQ(0, std::memcmp(a.gid, b.gid, 16));
  EXPECT_EQ(a.first_psn, b.first_psn);
  for (int s = 0; s < r::kNumQpSets; ++s) {
    EXPECT_EQ(a.num_qps[s], b.num_qps[s]);
    for (int q = 0; q < a.num_qps[s]; ++q) EXPECT_EQ(a.qpn[s][q], b.qpn[s][q]) << s << "/" << q;
    for (int q = a.num_qps[s]; q < r::kConnMaxQpsPerSet; ++q)
      EXPECT_EQ(0u, b.qpn[s][q]) << "unused QPN " << s << "/" << q;
  }
  EXPECT_EQ(a.num_windows, b.num_windows);
  for (int w = 0; w < a.num_windows; ++w) {
    EXPECT_EQ(a.windows[w].addr, b.windows[w].addr);
    EXPECT_EQ(a.windows[w].bytes, b.windows[w].bytes);
    EXPECT_EQ(a.windows[w].rkey, b.windows[w].rkey);
  }
  for (int s = 0; s < r::kNumQpSets; ++s) {
    EXPECT_EQ(a.sl[s], b.sl[s]) << "set " << s;
    EXPECT_EQ(a.traffic_class[s], b.traffic_class[s]) << "set " << s;
  }
}

TEST(ConnRecord, RoundTrip) {
  std::mt19937_64 rng(42);
  for (int i = 0; i < 100; ++i) {
    r::ConnRecord in = makeRecord(i % 16, (i * 7) % 16, 16, rng);
    in.num_qps[r::kQpSetLowLatency] = static_cast<uint16_t>(rng() % (r::kConnMaxQpsPerSet + 1));
    for (int q = 8; q < in.num_qps[r::kQpSetLowLatency]; ++q)
      in.qpn[r::kQpSetLowLatency][q] = static_cast<uint32_t>(rng()) & 0xffffff;
    std::vector<uint8_t> wire(r::kConnRecordBytes, 0xcc);
    ASSERT_EQ(ncclSuccess, r::packConnRecord(in, wire.data())) << lastError();
    r::ConnRecord out;
    ASSERT_EQ(ncclSuccess, r::unpackConnRecord(wire.data(), wire.size(), &out)) << lastError();
    expectSame(in, out);
  }
}

TEST(ConnRecord, WireLayout) {
  std::mt19937_64 rng(1);
  r::ConnRecord in = makeRecord(5, 2, 16, rng);
  in.qpn[r::kQpSetLowLatency][0] = 0x00a1b2c3;
  in.windows[1].bytes = 0x0102030405060708ull;
  std::vector<uint8_t> w(r::kConnRecordBytes, 0xcc);
  ASSERT_EQ(ncclSuccess, r::packConnRecord(in, w.data())) << lastError();
  EXPECT_EQ(0, std::memcmp("NMCR", w.data(), 4));
  EXPECT_EQ(2, w[4]) << "version 2";
  EXPECT_EQ(0, w[5]);
  EXPECT_EQ(0x00, w[6]) << "size 512, little-endian";
  EXPECT_EQ(0x02, w[7]);
  EXPECT_EQ(5, w[8]) << "rank";
  EXPECT_EQ(2, w[12]) << "peer";
  EXPECT_EQ(0, std::memcmp("mlx5_5", w.data() + 32, 7));
  const size_t low_latency_qpn0 = 96 + 4 * r::kConnMaxQpsPerSet;
  const uint8_t qpn_bytes[4] = {0xc3, 0xb2, 0xa1, 0x00};
  EXPECT_EQ(0, std::memcmp(qpn_bytes, w.data() + low_latency_qpn0, 4));
  const uint8_t bytes_le[8] = {8, 7, 6, 5, 4, 3, 2, 1};
  EXPECT_EQ(0, std::memcmp(bytes_le, w.data() + 352 + 24 + 8, 8)) << "window 1 bytes";
  const uint8_t service[4] = {3, 5, 0x60, 0xa0};  // SL of each set, then TC of each set
  EXPECT_EQ(0, std::memcmp(service, w.data() + 448, 4)) << "service levels and traffic classes";
  for (size_t i = 452; i < r::kConnRecordBytes; ++i) ASSERT_EQ(0, w[i]) << "reserved tail byte " << i;
  // Unused QPN slots and windows are zero on the wire.
  for (size_t i = 96 + 4 * 24; i < 96 + 4 * 32; ++i) ASSERT_EQ(0, w[i]) << "unused high-throughput QPN byte " << i;
}

TEST(ConnRecord, UnpackRejectsForeignAndOtherVersionRecords) {
  std::mt19937_64 rng(2);
  const r::ConnRecord in = makeRecord(3, 0, 4, rng);
  std::vector<uint8_t> good(r::kConnRecordBytes);
  ASSERT_EQ(ncclSuccess, r::packConnRecord(in, good.data()));
  r::ConnRecord out;

  EXPECT_EQ(ncclInvalidUsage, r::unpackConnRecord(good.data(), good.size() - 1, &out));
  EXPECT_NE(std::string::npos, lastError().find("511 bytes, expected 512")) << lastError();

  std::vector<uint8_t> w = good;
  w[0] ^= 1;
  EXPECT_EQ(ncclInvalidUsage, r::unpackConnRecord(w.data(), w.size(), &out));
  EXPECT_NE(std::string::npos, lastError().find("not a connection record")) << lastError();

  w = good;
  w[4] = 1;  // a build from before the QP sets carried their service levels
  EXPECT_EQ(ncclInvalidUsage, r::unpackConnRecord(w.data(), w.size(), &out));
  EXPECT_NE(std::string::npos,
            lastError().find("rank 3's connection record is version 1; this library reads version 2"))
      << lastError();
  EXPECT_EQ(1, out.version);
  EXPECT_EQ(3, out.rank) << "the stable header still names the sender";

  w = good;
  w[6] = 0;
  w[7] = 4;  // claims 1024 bytes
  EXPECT_EQ(ncclInvalidUsage, r::unpackConnRecord(w.data(), w.size(), &out));
  EXPECT_NE(std::string::npos, lastError().find("claims 1024 bytes")) << lastError();

  w = good;
  w[94] = 33;  // low-latency QP count
  EXPECT_EQ(ncclInvalidUsage, r::unpackConnRecord(w.data(), w.size(), &out));
  EXPECT_NE(std::string::npos, lastError().find("33 QPs in the low-latency set")) << lastError();

  w = good;
  w[70] = 5;  // windows
  EXPECT_EQ(ncclInvalidUsage, r::unpackConnRecord(w.data(), w.size(), &out));
  EXPECT_NE(std::string::npos, lastError().find("5 windows")) << lastError();

  w = good;
  std::memset(w.data() + 32, 'x', 32);
  EXPECT_EQ(ncclInvalidUsage, r::unpackConnRecord(w.data(), w.size(), &out));
  EXPECT_NE(std::string::npos, lastError().find("nic_name is not NUL-terminated")) << lastError();

  w = good;
  w[96 + 3] = 0x01;  // high-throughput QPN 0 beyond 24 bits
  EXPECT_EQ(ncclInvalidUsage, r::unpackConnRecord(w.data(), w.size(), &out));
  EXPECT_NE(std::string::npos, lastError().find("exceeds 24 bits")) << lastError();

  w = good;
  w[449] = 16;  // the low-latency set's service level
  EXPECT_EQ(ncclInvalidUsage, r::unpackConnRecord(w.data(), w.size(), &out));
  EXPECT_NE(std::string::npos, lastError().find("service level 16 of the low-latency set exceeds 15")) << lastError();
}

TEST(ConnRecord, PackRejectsWhatTheWireCannotHold) {
  std::mt19937_64 rng(3);
  std::vector<uint8_t> w(r::kConnRecordBytes);
  r::ConnRecord c = makeRecord(0, 1, 2, rng);
  c.num_qps[r::kQpSetHighThroughput] = r::kConnMaxQpsPerSet + 1;
  EXPECT_EQ(ncclInvalidArgument, r::packConnRecord(c, w.data()));
  EXPECT_NE(std::string::npos, lastError().find("33 QPs in the high-throughput set")) << lastError();
  c = makeRecord(0, 1, 2, rng);
  c.qpn[r::kQpSetLowLatency][2] = 0x1000000;
  EXPECT_EQ(ncclInvalidArgument, r::packConnRecord(c, w.data()));
  EXPECT_NE(std::string::npos, lastError().find("low-latency set, QP 2")) << lastError();
  c = makeRecord(0, 1, 2, rng);
  c.first_psn = 0x1000000;
  EXPECT_EQ(ncclInvalidArgument, r::packConnRecord(c, w.data()));
  c = makeRecord(0, 1, 2, rng);
  c.num_windows = r::kConnMaxWindows + 1;
  EXPECT_EQ(ncclInvalidArgument, r::packConnRecord(c, w.data()));
}

// Records as rank `self` receives them from every rank, after a wire round trip.
std::vector<r::ConnRecord> exchange(int num_ranks, int self, void (*tweak)(std::vector<r::ConnRecord>&)) {
  std::mt19937_64 rng(num_ranks * 100 + self);
  std::vector<r::ConnRecord> sent;
  for (int i = 0; i < num_ranks; ++i) sent.push_back(makeRecord(i, self, num_ranks, rng));
  if (tweak) tweak(sent);
  std::vector<r::ConnRecord> received(num_ranks);
  for (int i = 0; i < num_ranks; ++i) {
    std::vector<uint8_t> w(r::kConnRecordBytes);
    EXPECT_EQ(ncclSuccess, r::packConnRecord(sent[i], w.data())) << lastError();
    EXPECT_EQ(ncclSuccess, r::unpackConnRecord(w.data(), w.size(), &received[i])) << lastError();
  }
  return received;
}

TEST(ConnRecord, AgreeingRecordsPass) {
  for (int self = 0; self < 4; ++self) {
    const auto recs = exchange(4, self, nullptr);
    EXPECT_EQ(ncclSuccess, r::checkConnRecords(recs.data(), 4, self)) << lastError();
  }
  const auto one = exchange(1, 0, nullptr);
  EXPECT_EQ(ncclSuccess, r::checkConnRecords(one.data(), 1, 0)) << lastError();
}

TEST(ConnRecord, DisagreementNamesRanksAndFields) {
  const struct {
    const char* name;
    void (*tweak)(std::vector<r::ConnRecord>&);
    const char* expect;
  } cases[] = {
      {"LL QP count", [](std::vector<r::ConnRecord>& v) { v[2].num_qps[r::kQpSetLowLatency] = 4; },
       "connection records disagree: QPs per peer in the low-latency set: rank 0 has 8, rank 2 has 4"},
      {"HT QP count on two ranks",
       [](std::vector<r::ConnRecord>& v) {
         v[1].num_qps[r::kQpSetHighThroughput] = 12;
         v[3].num_qps[r::kQpSetHighThroughput] = 12;
       },
       "QPs per peer in the high-throughput set: rank 0 has 24, rank 1 has 12 (and 1 more rank)"},
      {"window size", [](std::vector<r::ConnRecord>& v) { v[3].windows[1].bytes = 1ull << 21; },
       "window 1 bytes: rank 0 has 1048576, rank 3 has 2097152"},
      {"window count", [](std::vector<r::ConnRecord>& v) { v[1].num_windows = 1; },
       "window count: rank 0 has 2, rank 1 has 1"},
      {"LL service level", [](std::vector<r::ConnRecord>& v) { v[3].sl[r::kQpSetLowLatency] = 4; },
       "service level of the low-latency set: rank 0 has 5, rank 3 has 4"},
      {"HT service level on rank 0's peers",
       [](std::vector<r::ConnRecord>& v) {
         for (size_t i = 1; i < v.size(); ++i) v[i].sl[r::kQpSetHighThroughput] = 0;
       },
       "service level of the high-throughput set: rank 0 has 3, rank 1 has 0 (and 2 more ranks)"},
      {"LL traffic class", [](std::vector<r::ConnRecord>& v) { v[1].traffic_class[r::kQpSetLowLatency] = 0; },
       "traffic class of the low-latency set: rank 0 has 160, rank 1 has 0"},
      {"link layer", [](std::vector<r::ConnRecord>& v) { v[2].link_layer = 1; },
       "link layer (0 InfiniBand, 1 Ethernet): rank 0 has 0, rank 2 has 1"},
      {"two fields at once",
       [](std::vector<r::ConnRecord>& v) {
         v[1].num_qps[r::kQpSetLowLatency] = 2;
         v[2].windows[0].bytes = 7;
       },
       "low-latency set: rank 0 has 8, rank 1 has 2; window 0 bytes: rank 0 has 1073741824, rank 2 has 7"},
  };
  for (const auto& c : cases) {
    for (int self = 0; self < 4; ++self) {
      const auto recs = exchange(4, self, c.tweak);
      EXPECT_EQ(ncclInvalidUsage, r::checkConnRecords(recs.data(), 4, self)) << c.name;
      EXPECT_NE(std::string::npos, lastError().find(c.expect)) << c.name << ": " << lastError();
    }
  }
}

TEST(ConnRecord, VersionDisagreementIsReported) {
  // Records unpacked by an older reader that kept a newer peer's header (unpack fails on it; a caller that still
  // wants one message for all ranks can run the check over the headers).
  std::mt19937_64 rng(5);
  std::vector<r::ConnRecord> recs;
  for (int i = 0; i < 3; ++i) recs.push_back(makeRecord(i, 0, 3, rng));
  recs[2].version = 3;
  EXPECT_EQ(ncclInvalidUsage, r::checkConnRecords(recs.data(), 3, 0));
  EXPECT_NE(std::string::npos, lastError().find("record version: rank 0 has 2, rank 2 has 3")) << lastError();
}

TEST(ConnRecord, MisroutedRecordsAreRejected) {
  auto recs = exchange(4, 1, nullptr);
  std::swap(recs[0], recs[2]);
  EXPECT_EQ(ncclInvalidUsage, r::checkConnRecords(recs.data(), 4, 1));
  EXPECT_NE(std::string::npos, lastError().find("slot 0 holds the record of rank 2")) << lastError();

  recs = exchange(4, 1, nullptr);
  recs[3].peer = 2;
  EXPECT_EQ(ncclInvalidUsage, r::checkConnRecords(recs.data(), 4, 1));
  EXPECT_NE(std::string::npos, lastError().find("rank 3's record is addressed to rank 2, not rank 1")) << lastError();

  recs = exchange(4, 1, nullptr);
  recs[2].num_ranks = 8;
  EXPECT_EQ(ncclInvalidUsage, r::checkConnRecords(recs.data(), 4, 1));
  EXPECT_NE(std::string::npos, lastError().find("rank 2 counts 8 ranks; this communicator has 4")) << lastError();

  EXPECT_EQ(ncclInvalidArgument, r::checkConnRecords(recs.data(), 4, 4));
}

}  // namespace
