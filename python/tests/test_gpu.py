"""What only a GPU shows: CUDA-graph capture and replay with new data (LL dispatch + combine; worst-case HT notify +
dispatch + combine), events for overlap (previous_event / async_finish / allocate_on_comm_stream), device-side
errors surfacing as exceptions, and the single libnccl shared with torch. Ranks of a LocalWorld share GPU 0."""
import pytest
# Needs torch (its layer, or the CPU stand-in of the extension): reported as skipped without it.
torch = pytest.importorskip("torch", reason="torch is not installed")

import nccl_moe
import reference as ref
from conftest import Backend
from harness import Problem, assert_same_bits, prewarm
from nccl_moe.torch import Comm, Event

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    return Backend("cuda")


def test_single_libnccl_is_torchs():
    path = nccl_moe.libnccl_path()
    assert path is not None
    # torch.cuda.nccl.version() is the version torch was built with (it may name another patch release than the
    # pip libnccl it loads); the one-file check below is what matters.
    assert nccl_moe.nccl_version()[:2] == tuple(torch.cuda.nccl.version())[:2], (nccl_moe.nccl_version(),
                                                                                  torch.cuda.nccl.version(), path)
    maps = open("/proc/self/maps").read()
    assert len(nccl_moe._loader.libnccl_paths(maps)) == 1


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_ll_graph_replay_with_new_data(cuda, num_ranks):
    E, H, K, M = 4 * num_ranks, 512, 3, 8
    world = cuda.world(num_ranks)
    problems = [Problem(num_ranks, E, H, K, [M - 1, M][:num_ranks], seed=100 + i) for i in range(4)]

    def rank_body(r):
        prewarm(cuda)
        # Every replay's inputs on the device before any collective call: torch.cuda.graph() empties the allocator's
        # cache, and a rank must not cudaMalloc while its peer's replay waits for it.
        inputs = [(cuda.to(p.x[r]), cuda.to(p.topk_idx[r]), cuda.to(p.weights[r])) for p in problems[1:]]
        comm = Comm(world.group(r), num_experts=E, hidden=H, max_topk=K, ll_max_tokens_per_rank=M)
        try:
            T = problems[0].tokens[r]
            x = cuda.to(problems[0].x[r])
            idx = cuda.to(problems[0].topk_idx[r])
            w = cuda.to(problems[0].weights[r])

            def step():
                res = comm.ll_dispatch(x, idx, topk_weights=w, return_recv_hook=True)
                res.hook()
                y = (res.recv_x.float() * 0.5).to(torch.bfloat16)
                return res.recv_count, comm.ll_combine(y, res.handle).combined_x

            step()  # eager warm-up (allocator, first-use paths)
            torch.cuda.current_stream().synchronize()
            world.barrier()
            g = torch.cuda.CUDAGraph()
            # One capture at a time: entering torch.cuda.graph() empties the allocator's cache, which torch refuses
            # while another thread captures.
            with world.capture_lock, torch.cuda.graph(g, stream=torch.cuda.Stream(),
                                                      capture_error_mode="thread_local"):
                recv_count, out = step()
            assert comm.ever_captured
            world.barrier()
            got = []
            for p, (x_i, idx_i, w_i) in zip(problems[1:], inputs):
                assert p.tokens[r] == T
                x.copy_(x_i)
                idx.copy_(idx_i)
                w.copy_(w_i)
                g.replay()
                torch.cuda.current_stream().synchronize()
                got.append((recv_count.cpu(), out.cpu()))
            world.barrier()  # freeing the graph's memory waits for the device: no peer may still wait for us
            del g
            return got
        finally:
            torch.cuda.current_stream().synchronize()
            comm.destroy()

    results = world.run(rank_body)
    for i, p in enumerate(problems[1:]):
        want = ref.ll_dispatch(p.topk_idx, E, M, x=p.x)
        ys = []
        for d in range(num_ranks):
            assert_same_bits(results[d][i][0], want[d]["recv_count"], f"replay {i} rank {d} recv_count")
            y = torch.zeros((E // num_ranks, num_ranks * M, H), dtype=torch.bfloat16)
            for j, rows in enumerate(want[d]["recv_x"]):
                if rows is not None:
                    y[j, :rows.shape[0]] = (rows.float() * 0.5).to(torch.bfloat16)
            ys.append(y)
        outs = ref.ll_combine(p.topk_idx, p.weights, want, ys, E)
        for s in range(num_ranks):
            assert_same_bits(results[s][i][1], outs[s], f"replay {i} rank {s} combined_x")


@pytest.mark.parametrize("num_ranks", [1, 2])
def test_ht_worst_case_graph_replay(cuda, num_ranks):
    E, H, K, T = 4 * num_ranks, 256, 2, 12
    world = cuda.world(num_ranks)
    problems = [Problem(num_ranks, E, H, K, [T] * num_ranks, seed=200 + i) for i in range(4)]
    worst = num_ranks * T

    def rank_body(r):
        prewarm(cuda)
        inputs = [(cuda.to(p.x[r]), cuda.to(p.topk_idx[r])) for p in problems[1:]]  # see the LL test
        comm = Comm(world.group(r), num_experts=E, hidden=H, max_topk=K, max_tokens_per_rank=T)
        try:
            x, idx = cuda.to(problems[0].x[r]), cuda.to(problems[0].topk_idx[r])

            def step():
                res = comm.ht_dispatch(x, idx, num_worst_tokens=worst)
                out = comm.ht_combine(res.recv_x, res.routing).combined_x
                return res.recv_x, res.routing, out

            step()
            torch.cuda.current_stream().synchronize()
            world.barrier()
            g = torch.cuda.CUDAGraph()
            # One capture at a time: entering torch.cuda.graph() empties the allocator's cache, which torch refuses
            # while another thread captures.
            with world.capture_lock, torch.cuda.graph(g, stream=torch.cuda.Stream(),
                                                      capture_error_mode="thread_local"):
                recv_x, routing, out = step()
            # Views of the handle's device arrays (fixed addresses: the captured routing is never reused).
            count, src_info = routing.recv_count, routing.recv_src_info
            world.barrier()
            got = []
            for x_i, idx_i in inputs:
                x.copy_(x_i)
                idx.copy_(idx_i)
                g.replay()
                torch.cuda.current_stream().synchronize()
                got.append((recv_x.cpu(), count.cpu(), src_info.cpu(), out.cpu()))
            world.barrier()
            del g
            return got
        finally:
            torch.cuda.current_stream().synchronize()
            comm.destroy()

    results = world.run(rank_body)
    for i, p in enumerate(problems[1:]):
        want = ref.ht_dispatch(p.topk_idx, E, x=p.x)
        for d in range(num_ranks):
            recv_x, count, src_info, _ = results[d][i]
            n = len(want[d]["src"])
            assert int(count[0]) == n
            assert_same_bits(recv_x[:n], want[d]["recv_x"], f"replay {i} rank {d} recv_x")
            assert_same_bits(src_info[:n], want[d]["src_info"], f"replay {i} rank {d} src_info")
        outs, _ = ref.ht_combine(want, [w["recv_x"] for w in want], num_tokens=p.tokens)
        for s in range(num_ranks):
            assert_same_bits(results[s][i][3], outs[s], f"replay {i} rank {s} combined_x")


def test_host_count_notify_refused_in_capture(cuda):
    world = cuda.world(1)

    def rank_body(r):
        comm = Comm(world.group(r), num_experts=2, hidden=128, max_tokens_per_rank=8)
        try:
            x = torch.ones((4, 128), dtype=torch.bfloat16, device="cuda")
            idx = torch.tensor([[0], [1], [0], [1]], device="cuda")
            comm.ht_dispatch(x, idx)
            torch.cuda.current_stream().synchronize()
            g = torch.cuda.CUDAGraph()
            with pytest.raises(nccl_moe.NcclMoeError, match="recv_capacity > 0"):
                with torch.cuda.graph(g, stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
                    comm.ht_dispatch(x, idx)
        finally:
            torch.cuda.synchronize()
            comm.destroy()

    world.run(rank_body)


def test_events_previous_event_async_allocate_on_comm_stream(cuda):
    num_ranks, E, H = 2, 8, 256
    p = Problem(num_ranks, E, H, 2, [9, 14], seed=301)
    world = cuda.world(num_ranks)

    def rank_body(r):
        prewarm(cuda)
        comm = Comm(world.group(r), num_experts=E, hidden=H, max_topk=2, max_tokens_per_rank=16,
                    ll_max_tokens_per_rank=16)
        try:
            # allocate_on_comm_stream allocates on the communicator's stream: warm its cache too, then meet.
            prewarm(cuda, comm.comm_stream)
            world.barrier()
            x, idx, w = cuda.to(p.x[r]), cuda.to(p.topk_idx[r]), cuda.to(p.weights[r])
            before = Event.record_current()
            lay = comm.dispatch_layout(idx, previous_event=before, async_finish=True, allocate_on_comm_stream=True)
            assert lay.event is not None
            res = comm.ht_dispatch(x, idx, w, previous_event=lay.event, async_finish=True,
                                   allocate_on_comm_stream=True)
            assert isinstance(res.event, Event)
            res.event.current_stream_wait()
            comb = comm.ht_combine(res.recv_x, res.routing, topk_weights=res.recv_topk_weights,
                                   previous_event=Event.record_current(), async_finish=False)
            assert comb.event is None  # synchronous: the current stream already waits
            ll = comm.ll_dispatch(x, idx, topk_weights=w, async_finish=True)
            assert ll.event is not None and ll.event.extra_tensors is not None
            ll.event.current_stream_wait()
            llc = comm.ll_combine(ll.recv_x, ll.handle, async_finish=True)
            llc.event.synchronize()
            assert llc.event.query()
            return dict(recv_x=res.recv_x.cpu(), combined=comb.combined_x.cpu(), ll_count=ll.recv_count.cpu(),
                        layout=lay.num_tokens_per_rank.cpu())
        finally:
            torch.cuda.synchronize()
            comm.destroy()

    got = world.run(rank_body)
    want = ref.ht_dispatch(p.topk_idx, E, x=p.x, weights=p.weights)
    outs, _ = ref.ht_combine(want, [w["recv_x"] for w in want], num_tokens=p.tokens)
    wl = ref.ll_dispatch(p.topk_idx, E, 16, x=p.x)
    for d in range(num_ranks):
        assert_same_bits(got[d]["layout"], ref.layout(p.topk_idx[d], num_ranks, E)[0], "layout")
        assert_same_bits(got[d]["recv_x"], want[d]["recv_x"], "async recv_x")
        assert_same_bits(got[d]["combined"], outs[d], "combined after previous_event")
        assert_same_bits(got[d]["ll_count"], wl[d]["recv_count"], "async LL recv_count")


def test_worst_case_overflow_is_an_error(cuda):
    """A receive count over num_worst_tokens becomes a device error; the next call raises it (and the communicator
    must be destroyed)."""
    world = cuda.world(1)

    def rank_body(r):
        comm = Comm(world.group(r), num_experts=2, hidden=128, max_tokens_per_rank=8)
        try:
            x = torch.ones((8, 128), dtype=torch.bfloat16, device="cuda")
            idx = torch.zeros((8, 1), dtype=torch.int64, device="cuda")
            comm.ht_dispatch(x, idx, num_worst_tokens=4)
            torch.cuda.synchronize()
            with pytest.raises(nccl_moe.NcclMoeError):
                comm.check_async_error()
            with pytest.raises(nccl_moe.NcclMoeError):
                comm.ht_dispatch(x, idx, num_worst_tokens=8)
        finally:
            torch.cuda.synchronize()
            comm.destroy()

    world.run(rank_body)


def test_init_destroy_does_not_leak(cuda):
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    for _ in range(10):
        world = cuda.world(2)
        comms = world.comms(num_experts=4, hidden=256, max_tokens_per_rank=64, ll_max_tokens_per_rank=16)
        for c in comms:
            c.destroy()
    torch.cuda.synchronize()
    assert torch.cuda.mem_get_info()[0] >= free_before - (64 << 20)
