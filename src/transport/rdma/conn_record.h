// The connection record: what rank r tells rank p so that p can connect its RC QPs to r's and address r's RDMA
// windows. Versioned and fixed-size, exchanged with one all-to-all at communicator init (rank r sends rank p the
// record addressed to p, because RC QPs are per pair: it lists the QPs r created for p). Each rank then holds one
// record from every rank, and checkConnRecords() rejects configurations the ranks disagree on, naming the ranks
// and the fields, identically on every rank.
//
// Wire format: kConnRecordBytes little-endian bytes at fixed offsets (conn_record.cc), independent of the host's
// struct padding. The first 12 bytes (magic, version, size, rank) keep their meaning in every version, so a record
// of another version is still attributed to its rank. Bytes past the last field are zero, room for later fields.
#pragma once

#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace nccl_moe::rdma {

// The QP sets: QPs of one set share a service level (qp_attr.h ServiceLevels), so the kernels of one mode can be
// put on their own virtual lane.
enum QpSet : int {
  kQpSetHighThroughput = 0,
  kQpSetLowLatency = 1,
  kNumQpSets = 2,
};
const char* qpSetName(int set);  // "high-throughput", "low-latency"

constexpr uint32_t kConnRecordMagic = 0x52434d4e;  // bytes "NMCR" on the wire
constexpr uint16_t kConnRecordVersion = 2;         // 2: the service level and traffic class of each QP set
constexpr size_t kConnRecordBytes = 512;
constexpr int kConnMaxQpsPerSet = 32;
constexpr int kConnMaxWindows = 4;
constexpr int kConnNicNameBytes = 32;  // NUL-terminated device name, e.g. "mlx5_0"

// A registered RDMA window of the sending rank: where it is and the key that reaches it.
struct ConnWindow {
  uint64_t addr = 0;  // the window's base as the remote QP addresses it (the registration's iova)
  uint64_t bytes = 0;
  uint32_t rkey = 0;
};

struct ConnRecord {
  uint16_t version = kConnRecordVersion;  // pack writes kConnRecordVersion; unpack reports what it read
  int32_t rank = -1;                      // the sender
  int32_t peer = -1;  // the rank the record is addressed to (the QPNs below are the sender's QPs for it)
  int32_t num_ranks = 0;
  int32_t node = -1;  // the sender's node index
  // The sender's NIC and port.
  char nic_name[kConnNicNameBytes] = {};
  uint64_t nic_guid = 0;  // node GUID, host order
  uint8_t port = 0;
  uint8_t link_layer = 0;  // verbs::LinkLayer
  uint8_t active_mtu = 0;  // enum ibv_mtu
  uint8_t gid_index = 0;
  uint16_t lid = 0;        // InfiniBand LID (0 on RoCE)
  uint8_t gid[16] = {};    // the GID at gid_index (RoCE, or InfiniBand with a GRH)
  uint32_t first_psn = 0;  // sq_psn of every QP below (24 bits)
  // QPs per peer in each set (the same on every rank) and the sender's QPNs toward `peer` (0 where the pair
  // has no QP in that set).
  uint16_t num_qps[kNumQpSets] = {};
  uint32_t qpn[kNumQpSets][kConnMaxQpsPerSet] = {};
  uint16_t num_windows = 0;
  ConnWindow windows[kConnMaxWindows];
  // The service level (0..15) and traffic class (0..255) the sender's QPs of each set use
  // (verbs::resolveServiceLevels): an RC pair sends on both sides' settings, so ranks must agree on them.
  uint8_t sl[kNumQpSets] = {};
  uint8_t traffic_class[kNumQpSets] = {};
};

// Serialises `record` into kConnRecordBytes bytes at `out`. Rejects counts beyond the fixed capacity, an
// unterminated nic_name and QPNs / PSN beyond 24 bits.
ncclResult_t packConnRecord(const ConnRecord& record, uint8_t* out);

// Parses kConnRecordBytes bytes. A record of another version fills only version and rank and fails with a
// message naming both versions; other defects (magic, size, counts beyond capacity) fail naming the field.
ncclResult_t unpackConnRecord(const uint8_t* bytes, size_t num_bytes, ConnRecord* out);

// `records[i]` is the record rank i sent to `self_rank`, for i in [0, num_ranks). Fails with ncclInvalidUsage when
// a record sits in the wrong slot, is addressed to another rank or counts another number of ranks, or when ranks
// disagree on the version, the link layer, the QPs per peer of a set, a set's service level or traffic class, the
// number of windows or a window's size.
// Disagreements are found against rank 0's record, so every rank reports the same pairs; the message names each
// disagreeing field with the first rank that differs, both values, and how many more ranks differ.
ncclResult_t checkConnRecords(const ConnRecord* records, int num_ranks, int self_rank);

}  // namespace nccl_moe::rdma
