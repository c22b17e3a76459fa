// RDMA / NVLink bytes of the internode paths (contract in link_bytes.h).
#include "link_bytes.h"

#include <stdexcept>

namespace nccl_moe::perf {

namespace {

size_t sz(int64_t v) { return static_cast<size_t>(v); }

LinkRows emptyRows(int R) {
  LinkRows rows;
  rows.rdma_send.assign(sz(R), 0);
  rows.rdma_recv.assign(sz(R), 0);
  rows.nvl_send.assign(sz(R), 0);
  rows.nvl_recv.assign(sz(R), 0);
  return rows;
}

void checkLayout(const ref::Routing& routing, int ranks_per_node) {
  routing.validate();
  if (ranks_per_node < 1 || routing.num_ranks % ranks_per_node != 0)
    throw std::invalid_argument("link bytes: ranks_per_node must be >= 1 and divide the rank count");
}

// holder[d] = 1 if token t of rank s has a valid expert on rank d.
void holders(const ref::Routing& routing, int s, int t, std::vector<char>* holder) {
  holder->assign(sz(routing.num_ranks), 0);
  const int K = routing.topk;
  for (int k = 0; k < K; ++k) {
    const int64_t e = routing.ranks[sz(s)].topk_idx[sz(t) * sz(K) + sz(k)];
    if (e >= 0) (*holder)[sz(routing.expert_rank(e))] = 1;
  }
}

}  // namespace

LinkRows htDispatchLinkRows(const ref::Routing& routing, int ranks_per_node) {
  checkLayout(routing, ranks_per_node);
  const int R = routing.num_ranks, rpn = ranks_per_node, N = R / rpn;
  LinkRows rows = emptyRows(R);
  std::vector<char> holder;
  for (int s = 0; s < R; ++s) {
    for (int t = 0; t < routing.ranks[sz(s)].num_tokens; ++t) {
      holders(routing, s, t, &holder);
      for (int m = 0; m < N; ++m) {
        const int f = m * rpn + s % rpn;  // the rail peer of s on node m (s itself on its own node)
        bool any = false;
        for (int d = m * rpn; d < (m + 1) * rpn; ++d) {
          if (!holder[sz(d)]) continue;
          any = true;
          if (d == f) continue;
          ++rows.nvl_send[sz(f)];
          ++rows.nvl_recv[sz(d)];
        }
        if (any && m != s / rpn) {
          ++rows.rdma_send[sz(s)];
          ++rows.rdma_recv[sz(f)];
        }
      }
    }
  }
  return rows;
}

LinkRows llDispatchLinkRows(const ref::Routing& routing, int ranks_per_node) {
  checkLayout(routing, ranks_per_node);
  const int R = routing.num_ranks, rpn = ranks_per_node;
  LinkRows rows = emptyRows(R);
  std::vector<char> holder;
  for (int s = 0; s < R; ++s) {
    for (int t = 0; t < routing.ranks[sz(s)].num_tokens; ++t) {
      holders(routing, s, t, &holder);
      for (int d = 0; d < R; ++d) {
        if (!holder[sz(d)] || d == s) continue;
        const bool remote = d / rpn != s / rpn;
        ++(remote ? rows.rdma_send : rows.nvl_send)[sz(s)];
        ++(remote ? rows.rdma_recv : rows.nvl_recv)[sz(d)];
      }
    }
  }
  return rows;
}

LinkRows reversedLinkRows(const LinkRows& rows) {
  LinkRows r;
  r.rdma_send = rows.rdma_recv;
  r.rdma_recv = rows.rdma_send;
  r.nvl_send = rows.nvl_recv;
  r.nvl_recv = rows.nvl_send;
  return r;
}

LinkBytes linkBytesPerRank(Mode mode, const std::string& op, DType dtype, int hidden, const ref::Routing& routing,
                           int ranks_per_node) {
  LinkBytes out;
  const int R = routing.num_ranks;
  if (ranks_per_node <= 0 || ranks_per_node >= R) return out;  // one node: no RDMA path, fields are null
  const bool combine = mode == Mode::kHt ? op == "combine" : op.rfind("combine", 0) == 0;
  LinkRows rows =
      mode == Mode::kHt ? htDispatchLinkRows(routing, ranks_per_node) : llDispatchLinkRows(routing, ranks_per_node);
  if (combine) rows = reversedLinkRows(rows);
  double row_bytes = 0;
  if (mode == Mode::kHt) {
    row_bytes = combine ? htCombineBytes(1, hidden) : htDispatchBytes(1, hidden, dtype);
  } else {
    row_bytes = combine ? llCombineBytes(1, hidden) : llDispatchBytes(1, hidden, dtype);
  }
  int64_t rdma = 0, nvl = 0;
  for (int r = 0; r < R; ++r) {
    rdma += rows.rdma_send[sz(r)];
    nvl += rows.nvl_send[sz(r)];
  }
  out.rdma_per_rank = static_cast<double>(rdma) * row_bytes / R;
  out.nvl_per_rank = static_cast<double>(nvl) * row_bytes / R;
  return out;
}

}  // namespace nccl_moe::perf
