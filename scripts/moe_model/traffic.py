"""Record sizes and the traffic one token causes on RDMA and on NVLink.

Topology: `num_nodes` nodes of `gpus_per_node` GPUs; rank r sits on node r // G at local index r % G; expert e
lives on rank e // (E / R), so node n holds experts [n E/N, (n+1) E/N) (the layout of DeepEP's tests and ours).

HT (issue 14, item 1): a token of rank (a, i) crosses RDMA once per destination node n != a, to rank (n, i) (the
"rail"); that rank (or the source itself for n == a) forwards it over NVLink to every other GPU of node n that holds
one of its experts. Combine is the reverse: every GPU holding experts returns one BF16 row per (token, rank) over
NVLink to the node's forwarder, which reduces them and sends one partial per (token, node) over RDMA.

LL (issue 14, item 3): one message per (token, destination rank): RDMA to ranks of other nodes, NVLink to the other
ranks of the own node, nothing on a link for the own rank. The combine returns one BF16 partial per (token, rank)
(the per-rank reduction happens before the send) the same way.
"""

SCALE_BLOCK_ELEMS = 128  # fp8 scales: one per 128 elements of a row (DeepSeek-V3's 1x128 blocks, our fp8 format)
SCALE_BYTES = 4          # float32 scales (the UE8M0 format would pack 4 per word; not modelled)
LL_HEADER_BYTES = 128    # src/mem/ll_layout.h kLlHeaderBytes: tagged local experts + top-k weights, one line


def fp8_row_bytes(hidden):
    """A row as DeepEP's metric counts it: fp8 payload + float scales, no header (H * (1 + 4/128))."""
    return hidden + (hidden // SCALE_BLOCK_ELEMS) * SCALE_BYTES


def bf16_row_bytes(hidden):
    return 2 * hidden


def _align16(n):
    return (n + 15) // 16 * 16


HT_NET_HEADER_BYTES = 40  # src/mem/ht_net_layout.h HtNetHeader: source token, tag, 8 holder positions (int32)


def ht_dispatch_header_bytes(topk):
    """HT per-token metadata that travels with a record, as the internode kernels lay it out
    (src/mem/ht_net_layout.h HtNetLayout::header_bytes): HtNetHeader, top-k weights (fp32) and global expert ids
    (int16), padded to 16 bytes (96 B at K = 8)."""
    return _align16(HT_NET_HEADER_BYTES + topk * (4 + 2))


def ht_combine_header_bytes(topk):
    """HT combine record over RDMA: the node's partial row plus its top-k weights (fp32, the contract's weight sum);
    the slot is known from the dispatch, so no index travels."""
    return topk * 4


def ht_dispatch_record_bytes(hidden, topk):
    """HtNetLayout::dispatch_record_bytes for fp8 with float scales: header, then the payload padded to 16."""
    return ht_dispatch_header_bytes(topk) + _align16(fp8_row_bytes(hidden))


def ht_combine_record_bytes(hidden, topk, fp8=False):
    """BF16 partial per (token, node) with its weight sums, padded to 16 (HtNetLayout::combine_record_bytes);
    fp8=True: the stretch case, an e4m3 partial with per-128 float scales."""
    row = fp8_row_bytes(hidden) if fp8 else bf16_row_bytes(hidden)
    return _align16(row + ht_combine_header_bytes(topk))


def ll_dispatch_msg_bytes(hidden):
    """LL dispatch message: the 128-byte header line, the fp8 row and its float scales."""
    return LL_HEADER_BYTES + fp8_row_bytes(hidden)


def ll_combine_msg_bytes(hidden):
    """LL combine message: one BF16 partial row per (token, rank); its slot is known from the dispatch."""
    return bf16_row_bytes(hidden)


class Topology:
    def __init__(self, num_nodes, gpus_per_node, num_experts):
        if num_nodes < 1 or gpus_per_node < 1:
            raise ValueError("num_nodes and gpus_per_node must be >= 1")
        self.num_nodes = num_nodes
        self.gpus_per_node = gpus_per_node
        self.num_ranks = num_nodes * gpus_per_node
        if num_experts % self.num_ranks:
            raise ValueError("num_experts %d is not a multiple of the %d ranks" % (num_experts, self.num_ranks))
        self.num_experts = num_experts
        self.experts_per_rank = num_experts // self.num_ranks

    def rank_of_expert(self, e):
        return e // self.experts_per_rank

    def node_of_rank(self, r):
        return r // self.gpus_per_node

    def local_idx(self, r):
        return r % self.gpus_per_node


def ht_token_rows(topo, src_rank, experts):
    """HT rows of one token of `src_rank` routed to `experts` (masked slots: negative ids are ignored).

    Returns (nodes_all, nodes_remote, nvl_rows): destination nodes including the own one (DeepEP's metric counts
    these), destination nodes other than the own one (RDMA records), and NVLink rows (sum over destination nodes n of
    the GPUs of n holding its experts, other than the rail rank (n, src local index) that received it).
    """
    src_node = topo.node_of_rank(src_rank)
    src_idx = topo.local_idx(src_rank)
    ranks = {topo.rank_of_expert(e) for e in experts if e >= 0}
    nodes = {topo.node_of_rank(r) for r in ranks}
    nvl_rows = sum(1 for r in ranks if topo.local_idx(r) != src_idx)
    return len(nodes), len(nodes - {src_node}), nvl_rows


def ll_token_msgs(topo, src_rank, experts):
    """LL messages of one token: (ranks_all, rdma_msgs, nvl_msgs); the own rank's message uses no link."""
    src_node = topo.node_of_rank(src_rank)
    ranks = {topo.rank_of_expert(e) for e in experts if e >= 0}
    rdma = sum(1 for r in ranks if topo.node_of_rank(r) != src_node)
    nvl = sum(1 for r in ranks if r != src_rank and topo.node_of_rank(r) == src_node)
    return len(ranks), rdma, nvl


def ht_world_rows(topo, routing):
    """Exact per-rank HT row counts of one dispatch, from explicit routing {src_rank: [experts of each token]}.

    Returns {rank: {"rdma_send", "rdma_recv", "nvl_send", "nvl_recv", "nodes_all"}} in rows (records). A token of
    (a, i) going to node n is sent on RDMA by (a, i) and received by (n, i) (n != a); the forwarder (n, i) then sends
    one NVLink row to every other GPU of n holding its experts. Combine moves the same rows the other way.
    """
    keys = ("rdma_send", "rdma_recv", "nvl_send", "nvl_recv", "nodes_all")
    out = {r: dict.fromkeys(keys, 0) for r in range(topo.num_ranks)}
    G = topo.gpus_per_node
    for src, tokens in routing.items():
        a, i = topo.node_of_rank(src), topo.local_idx(src)
        for experts in tokens:
            ranks = {topo.rank_of_expert(e) for e in experts if e >= 0}
            nodes = {topo.node_of_rank(r) for r in ranks}
            out[src]["nodes_all"] += len(nodes)
            for n in nodes:
                fwd = n * G + i
                if n != a:
                    out[src]["rdma_send"] += 1
                    out[fwd]["rdma_recv"] += 1
                for r in ranks:
                    if topo.node_of_rank(r) == n and r != fwd:
                        out[fwd]["nvl_send"] += 1
                        out[r]["nvl_recv"] += 1
    return out


def ll_world_msgs(topo, routing):
    """Exact per-rank LL message counts {rank: {"rdma_send", "rdma_recv", "nvl_send", "nvl_recv", "recv_all"}}."""
    keys = ("rdma_send", "rdma_recv", "nvl_send", "nvl_recv", "recv_all")
    out = {r: dict.fromkeys(keys, 0) for r in range(topo.num_ranks)}
    for src, tokens in routing.items():
        for experts in tokens:
            for r in {topo.rank_of_expert(e) for e in experts if e >= 0}:
                out[r]["recv_all"] += 1
                if r == src:
                    continue
                link = "rdma" if topo.node_of_rank(r) != topo.node_of_rank(src) else "nvl"
                out[src][link + "_send"] += 1
                out[r][link + "_recv"] += 1
    return out
