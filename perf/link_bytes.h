// Bytes that cross each link class when a communicator spans several nodes: RDMA (between nodes, through the NICs)
// and NVLink (between GPUs of one node), per rank, for the internode paths NCCL-MoE builds (issue 14, DeepEP's
// design in shared/scale-out.md section 1). Pure functions of the routing and the node layout, no CUDA.
//
// Contract (rank r on node r / ranks_per_node with local index r % ranks_per_node; "holders" of token t of rank s =
// the ranks holding at least one of its valid experts):
//   HT dispatch   for every token t of s and every node m with a holder: the token crosses RDMA once from s to
//                 its rail peer f = (m, local index of s) when m != node(s) (f = s on s's own node), then f
//                 forwards it over NVLink to every holder d != f on node m. Nothing else moves (a holder == f, or
//                 s itself, is a local copy).
//   HT combine    the reverse: every holder d != f sends its row over NVLink to f, which reduces the node's rows
//                 and sends ONE bf16 partial per (token, node) over RDMA to s when m != node(s).
//   LL dispatch   one message per (token, destination rank d != s) with a holder d: over RDMA when node(d) !=
//                 node(s), else over NVLink (no deduplication per node, no forwarding).
//   LL combine    the reverse: one bf16 row per (token, holder rank d != s), each reduced on d first.
//   Row sizes are the logical ones (options.h): HT dispatch htDispatchBytes(1, H, dtype), HT combine and LL
//   combine H * 2, LL dispatch llDispatchBytes(1, H, dtype). Top-k ids, weights and source metadata are not counted
//   (as in the logical bytes).
//   Per-rank bytes are reported averaged over ranks, like bytes_per_rank: every byte sent is received, so the mean
//   of bytes sent equals the mean of bytes received. The per-rank vectors keep both directions for a model.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "options.h"
#include "reference/reference.h"

namespace nccl_moe::perf {

// Rows (HT: token rows or node partials; LL: messages) per rank and link class, in each direction.
struct LinkRows {
  std::vector<int64_t> rdma_send, rdma_recv;  // [R]
  std::vector<int64_t> nvl_send, nvl_recv;    // [R]
};

// Dispatch rows of a routing on a node layout (ranks_per_node >= 1 dividing R; throws std::invalid_argument).
LinkRows htDispatchLinkRows(const ref::Routing& routing, int ranks_per_node);
LinkRows llDispatchLinkRows(const ref::Routing& routing, int ranks_per_node);
// Combine moves the same rows the other way: send and receive swapped.
LinkRows reversedLinkRows(const LinkRows& rows);

// RDMA and NVLink bytes of one op, averaged over ranks; both < 0 (JSON null) when the layout has one node
// (ranks_per_node 0 or == R). op as in ResultRow: HT "dispatch" / "notify_dispatch" / "combine"; LL ops starting
// with "combine" are the combine, every other op the dispatch.
struct LinkBytes {
  double rdma_per_rank = -1;
  double nvl_per_rank = -1;
};
LinkBytes linkBytesPerRank(Mode mode, const std::string& op, DType dtype, int hidden, const ref::Routing& routing,
                           int ranks_per_node);

}  // namespace nccl_moe::perf
