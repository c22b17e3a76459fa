#include "transport/rdma/conn_record.h"

#include <cstdio>
#include <cstring>
#include <string>

#include "core/error.h"

namespace nccl_moe::rdma {

namespace {

// Wire offsets (little-endian). The header [0, 12) is the same in every version.
constexpr size_t kOffMagic = 0;                                               // u32
constexpr size_t kOffVersion = 4;                                             // u16
constexpr size_t kOffSize = 6;                                                // u16
constexpr size_t kOffRank = 8;                                                // i32
constexpr size_t kOffPeer = 12;                                               // i32
constexpr size_t kOffNumRanks = 16;                                           // i32
constexpr size_t kOffNode = 20;                                               // i32
constexpr size_t kOffNicGuid = 24;                                            // u64
constexpr size_t kOffNicName = 32;                                            // char[32]
constexpr size_t kOffPort = 64;                                               // u8
constexpr size_t kOffLinkLayer = 65;                                          // u8
constexpr size_t kOffMtu = 66;                                                // u8
constexpr size_t kOffGidIndex = 67;                                           // u8
constexpr size_t kOffLid = 68;                                                // u16
constexpr size_t kOffNumWindows = 70;                                         // u16
constexpr size_t kOffGid = 72;                                                // u8[16]
constexpr size_t kOffFirstPsn = 88;                                           // u32
constexpr size_t kOffNumQps = 92;                                             // u16[kNumQpSets]
constexpr size_t kOffQpn = kOffNumQps + 2 * kNumQpSets;                       // u32[kNumQpSets][32]
constexpr size_t kOffWindows = kOffQpn + 4 * kNumQpSets * kConnMaxQpsPerSet;  // {u64 addr, u64 bytes, u32 rkey, u32 0}
constexpr size_t kWindowWireBytes = 24;
constexpr size_t kOffSl = kOffWindows + kWindowWireBytes * kConnMaxWindows;  // u8[kNumQpSets] (version 2)
constexpr size_t kOffTrafficClass = kOffSl + kNumQpSets;                     // u8[kNumQpSets] (version 2)
constexpr size_t kEnd = kOffTrafficClass + kNumQpSets;
static_assert(kOffQpn == 96 && kOffWindows == 352 && kOffSl == 448 && kEnd == 452, "connection record wire layout");
static_assert(kEnd <= kConnRecordBytes, "the connection record outgrew its fixed size");
static_assert(kConnRecordBytes <= 0xffff, "the size field is 16 bits");

constexpr uint32_t kMax24 = 0xffffff;

template <typename T>
void put(uint8_t* out, size_t off, T v) {
  for (size_t i = 0; i < sizeof(T); ++i) out[off + i] = static_cast<uint8_t>(static_cast<uint64_t>(v) >> (8 * i));
}
template <typename T>
T get(const uint8_t* in, size_t off) {
  uint64_t v = 0;
  for (size_t i = 0; i < sizeof(T); ++i) v |= static_cast<uint64_t>(in[off + i]) << (8 * i);
  return static_cast<T>(v);
}

bool terminated(const char* s, size_t n) { return std::memchr(s, '\0', n) != nullptr; }

ncclResult_t checkCapacity(const ConnRecord& r, const char* what) {
  for (int s = 0; s < kNumQpSets; ++s)
    if (r.num_qps[s] > kConnMaxQpsPerSet)
      return setLastError(ncclInvalidArgument, "%s: rank %d lists %u QPs in the %s set (at most %d)", what, r.rank,
                          unsigned{r.num_qps[s]}, qpSetName(s), kConnMaxQpsPerSet);
  if (r.num_windows > kConnMaxWindows)
    return setLastError(ncclInvalidArgument, "%s: rank %d lists %u windows (at most %d)", what, r.rank,
                        unsigned{r.num_windows}, kConnMaxWindows);
  if (!terminated(r.nic_name, sizeof(r.nic_name)))
    return setLastError(ncclInvalidArgument, "%s: rank %d's nic_name is not NUL-terminated within %d bytes", what,
                        r.rank, kConnNicNameBytes);
  for (int s = 0; s < kNumQpSets; ++s)
    if (r.sl[s] > 15)
      return setLastError(ncclInvalidArgument, "%s: rank %d's service level %u of the %s set exceeds 15", what, r.rank,
                          unsigned{r.sl[s]}, qpSetName(s));
  if (r.first_psn > kMax24)
    return setLastError(ncclInvalidArgument, "%s: rank %d's first_psn 0x%x exceeds 24 bits", what, r.rank, r.first_psn);
  for (int s = 0; s < kNumQpSets; ++s)
    for (int q = 0; q < r.num_qps[s]; ++q)
      if (r.qpn[s][q] > kMax24)
        return setLastError(ncclInvalidArgument, "%s: rank %d's QPN 0x%x (%s set, QP %d) exceeds 24 bits", what, r.rank,
                            r.qpn[s][q], qpSetName(s), q);
  return ncclSuccess;
}

// Collects "field: rank a has x, rank b has y" clauses for the disagreement message.
class Disagreements {
 public:
  template <typename T>
  void compare(const char* field, int ref_rank, T ref_value, int rank, T value) {
    if (ref_value == value) return;
    for (Entry& e : entries_)
      if (e.field == field) {
        ++e.more;
        return;
      }
    entries_.push_back(Entry{field, ref_rank, static_cast<unsigned long long>(ref_value), rank,
                             static_cast<unsigned long long>(value), 0});
  }
  bool empty() const { return entries_.empty(); }
  std::string text() const {
    std::string s;
    for (const Entry& e : entries_) {
      char clause[256];
      std::snprintf(clause, sizeof(clause), "%s%s: rank %d has %llu, rank %d has %llu", s.empty() ? "" : "; ",
                    e.field.c_str(), e.ref_rank, e.ref_value, e.rank, e.value);
      s += clause;
      if (e.more > 0) s += " (and " + std::to_string(e.more) + " more rank" + (e.more > 1 ? "s)" : ")");
    }
    return s;
  }

 private:
  struct Entry {
    std::string field;
    int ref_rank;
    unsigned long long ref_value;
    int rank;
    unsigned long long value;
    int more;
  };
  std::vector<Entry> entries_;
};

}  // namespace

const char* qpSetName(int set) {
  switch (set) {
    case kQpSetHighThroughput:
      return "high-throughput";
    case kQpSetLowLatency:
      return "low-latency";
    default:
      return "unknown";
  }
}

ncclResult_t packConnRecord(const ConnRecord& r, uint8_t* out) {
  if (out == nullptr) return setLastError(ncclInvalidArgument, "packConnRecord: out is NULL");
  MOE_CHECK(checkCapacity(r, "packConnRecord"));
  std::memset(out, 0, kConnRecordBytes);
  put<uint32_t>(out, kOffMagic, kConnRecordMagic);
  put<uint16_t>(out, kOffVersion, kConnRecordVersion);
  put<uint16_t>(out, kOffSize, static_cast<uint16_t>(kConnRecordBytes));
  put<int32_t>(out, kOffRank, r.rank);
  put<int32_t>(out, kOffPeer, r.peer);
  put<int32_t>(out, kOffNumRanks, r.num_ranks);
  put<int32_t>(out, kOffNode, r.node);
  put<uint64_t>(out, kOffNicGuid, r.nic_guid);
  std::memcpy(out + kOffNicName, r.nic_name, kConnNicNameBytes);
  out[kOffPort] = r.port;
  out[kOffLinkLayer] = r.link_layer;
  out[kOffMtu] = r.active_mtu;
  out[kOffGidIndex] = r.gid_index;
  put<uint16_t>(out, kOffLid, r.lid);
  put<uint16_t>(out, kOffNumWindows, r.num_windows);
  std::memcpy(out + kOffGid, r.gid, sizeof(r.gid));
  put<uint32_t>(out, kOffFirstPsn, r.first_psn);
  for (int s = 0; s < kNumQpSets; ++s) {
    put<uint16_t>(out, kOffNumQps + 2 * s, r.num_qps[s]);
    for (int q = 0; q < r.num_qps[s]; ++q) put<uint32_t>(out, kOffQpn + 4 * (s * kConnMaxQpsPerSet + q), r.qpn[s][q]);
  }
  for (int w = 0; w < r.num_windows; ++w) {
    const size_t off = kOffWindows + kWindowWireBytes * w;
    put<uint64_t>(out, off, r.windows[w].addr);
    put<uint64_t>(out, off + 8, r.windows[w].bytes);
    put<uint32_t>(out, off + 16, r.windows[w].rkey);
  }
  for (int s = 0; s < kNumQpSets; ++s) {
    out[kOffSl + s] = r.sl[s];
    out[kOffTrafficClass + s] = r.traffic_class[s];
  }
  return ncclSuccess;
}

ncclResult_t unpackConnRecord(const uint8_t* in, size_t num_bytes, ConnRecord* out) {
  if (in == nullptr || out == nullptr) return setLastError(ncclInvalidArgument, "unpackConnRecord: NULL argument");
  if (num_bytes != kConnRecordBytes)
    return setLastError(ncclInvalidUsage, "connection record of %zu bytes, expected %zu", num_bytes, kConnRecordBytes);
  *out = ConnRecord{};
  const uint32_t magic = get<uint32_t>(in, kOffMagic);
  if (magic != kConnRecordMagic)
    return setLastError(ncclInvalidUsage, "not a connection record: magic 0x%08x, expected 0x%08x", magic,
                        kConnRecordMagic);
  out->version = get<uint16_t>(in, kOffVersion);
  out->rank = get<int32_t>(in, kOffRank);
  if (out->version != kConnRecordVersion)
    return setLastError(ncclInvalidUsage,
                        "rank %d's connection record is version %u; this library reads version %u (ranks run "
                        "different NCCL-MoE builds)",
                        out->rank, unsigned{out->version}, unsigned{kConnRecordVersion});
  const uint16_t size = get<uint16_t>(in, kOffSize);
  if (size != kConnRecordBytes)
    return setLastError(ncclInvalidUsage, "rank %d's connection record claims %u bytes; version %u records are %zu",
                        out->rank, unsigned{size}, unsigned{kConnRecordVersion}, kConnRecordBytes);
  out->peer = get<int32_t>(in, kOffPeer);
  out->num_ranks = get<int32_t>(in, kOffNumRanks);
  out->node = get<int32_t>(in, kOffNode);
  out->nic_guid = get<uint64_t>(in, kOffNicGuid);
  std::memcpy(out->nic_name, in + kOffNicName, kConnNicNameBytes);
  out->port = in[kOffPort];
  out->link_layer = in[kOffLinkLayer];
  out->active_mtu = in[kOffMtu];
  out->gid_index = in[kOffGidIndex];
  out->lid = get<uint16_t>(in, kOffLid);
  out->num_windows = get<uint16_t>(in, kOffNumWindows);
  std::memcpy(out->gid, in + kOffGid, sizeof(out->gid));
  out->first_psn = get<uint32_t>(in, kOffFirstPsn);
  for (int s = 0; s < kNumQpSets; ++s) out->num_qps[s] = get<uint16_t>(in, kOffNumQps + 2 * s);
  // Capacity first: the loops below trust the counts.
  for (int s = 0; s < kNumQpSets; ++s)
    if (out->num_qps[s] > kConnMaxQpsPerSet)
      return setLastError(ncclInvalidUsage, "rank %d's connection record lists %u QPs in the %s set (at most %d)",
                          out->rank, unsigned{out->num_qps[s]}, qpSetName(s), kConnMaxQpsPerSet);
  if (out->num_windows > kConnMaxWindows)
    return setLastError(ncclInvalidUsage, "rank %d's connection record lists %u windows (at most %d)", out->rank,
                        unsigned{out->num_windows}, kConnMaxWindows);
  for (int s = 0; s < kNumQpSets; ++s)
    for (int q = 0; q < out->num_qps[s]; ++q)
      out->qpn[s][q] = get<uint32_t>(in, kOffQpn + 4 * (s * kConnMaxQpsPerSet + q));
  for (int w = 0; w < out->num_windows; ++w) {
    const size_t off = kOffWindows + kWindowWireBytes * w;
    out->windows[w].addr = get<uint64_t>(in, off);
    out->windows[w].bytes = get<uint64_t>(in, off + 8);
    out->windows[w].rkey = get<uint32_t>(in, off + 16);
  }
  for (int s = 0; s < kNumQpSets; ++s) {
    out->sl[s] = in[kOffSl + s];
    out->traffic_class[s] = in[kOffTrafficClass + s];
  }
  const ncclResult_t capacity = checkCapacity(*out, "unpackConnRecord");
  return capacity == ncclSuccess ? ncclSuccess : ncclInvalidUsage;
}

ncclResult_t checkConnRecords(const ConnRecord* records, int num_ranks, int self_rank) {
  if (records == nullptr || num_ranks <= 0 || self_rank < 0 || self_rank >= num_ranks)
    return setLastError(ncclInvalidArgument, "checkConnRecords: %d records for rank %d", num_ranks, self_rank);
  for (int i = 0; i < num_ranks; ++i) {
    if (records[i].rank != i)
      return setLastError(ncclInvalidUsage, "connection records: slot %d holds the record of rank %d", i,
                          records[i].rank);
    if (records[i].peer != self_rank)
      return setLastError(ncclInvalidUsage, "connection records: rank %d's record is addressed to rank %d, not rank %d",
                          i, records[i].peer, self_rank);
    if (records[i].num_ranks != num_ranks)
      return setLastError(ncclInvalidUsage, "connection records: rank %d counts %d ranks; this communicator has %d", i,
                          records[i].num_ranks, num_ranks);
  }
  const ConnRecord& ref = records[0];
  Disagreements d;
  for (int i = 1; i < num_ranks; ++i) {
    const ConnRecord& r = records[i];
    d.compare("record version", 0, unsigned{ref.version}, i, unsigned{r.version});
    d.compare("link layer (0 InfiniBand, 1 Ethernet)", 0, unsigned{ref.link_layer}, i, unsigned{r.link_layer});
    d.compare("QPs per peer in the high-throughput set", 0, unsigned{ref.num_qps[kQpSetHighThroughput]}, i,
              unsigned{r.num_qps[kQpSetHighThroughput]});
    d.compare("QPs per peer in the low-latency set", 0, unsigned{ref.num_qps[kQpSetLowLatency]}, i,
              unsigned{r.num_qps[kQpSetLowLatency]});
    d.compare("service level of the high-throughput set", 0, unsigned{ref.sl[kQpSetHighThroughput]}, i,
              unsigned{r.sl[kQpSetHighThroughput]});
    d.compare("service level of the low-latency set", 0, unsigned{ref.sl[kQpSetLowLatency]}, i,
              unsigned{r.sl[kQpSetLowLatency]});
    d.compare("traffic class of the high-throughput set", 0, unsigned{ref.traffic_class[kQpSetHighThroughput]}, i,
              unsigned{r.traffic_class[kQpSetHighThroughput]});
    d.compare("traffic class of the low-latency set", 0, unsigned{ref.traffic_class[kQpSetLowLatency]}, i,
              unsigned{r.traffic_class[kQpSetLowLatency]});
    d.compare("window count", 0, unsigned{ref.num_windows}, i, unsigned{r.num_windows});
    static const char* const kWindowFields[kConnMaxWindows] = {"window 0 bytes", "window 1 bytes", "window 2 bytes",
                                                               "window 3 bytes"};
    const int common = ref.num_windows < r.num_windows ? ref.num_windows : r.num_windows;
    for (int w = 0; w < common && w < kConnMaxWindows; ++w)
      d.compare(kWindowFields[w], 0, ref.windows[w].bytes, i, r.windows[w].bytes);
  }
  if (!d.empty()) return setLastError(ncclInvalidUsage, "connection records disagree: %s", d.text().c_str());
  return ncclSuccess;
}

}  // namespace nccl_moe::rdma
