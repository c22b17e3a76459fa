"""Python overhead per call of nccl_moe.torch over the bare C call (a benchmark, not a test).

For each operation it times the host side of two loops issuing the same work on one GPU (a LocalWorld of one rank,
so no peer is needed):
  C call      nccl_moe._C.<op>(...) with every integer (pointers, stream) computed before the loop: the extension's
              ~0.2 us plus the library's own host work and the kernel launch;
  Python API  nccl_moe.torch.Comm.<op>(tensors, ...): the same plus shape/dtype checks, data_ptr(), the current
              stream, handle bookkeeping and result objects.
The overhead is their difference. Targets (issue 15): <= 2 us per LL dispatch or combine, <= 5 us per HT call.

Each sample enqueues a batch of calls (default 100) and is timed on the host only (time.perf_counter around the
enqueue), then the stream is synchronised outside the timed region, so the GPU never throttles the host loop as long
as a batch fits the launch queue. Reported: the median over samples of host time per call.

    python python/benchmarks/overhead.py [--tokens 128] [--hidden 7168] [--experts 256] [--topk 8] [--batch 100]
                                         [--samples 30] [--json FILE]
    python python/benchmarks/overhead.py --stub    # no GPU: the Python layer against no-op native functions

--stub measures only the Python layer's own cost (the extension's functions replaced by Python no-ops on CPU
tensors, so even the ~0.2 us of a nanobind call is replaced by a Python call's ~0.1 us); it is a development aid,
not a substitute for the GPU numbers.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch


def _median_us(fn, batch, samples, sync):
    times = []
    for _ in range(samples):
        sync()
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        times.append((time.perf_counter() - t0) / batch * 1e6)
    sync()
    return statistics.median(times)


def _stub_lib():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import sim_backend

    class Stub:
        pass

    stub = Stub()
    for name in dir(sim_backend):
        setattr(stub, name, getattr(sim_backend, name))

    def noop(*args):
        return None

    for name in ("layout", "ht_dispatch", "ht_combine", "ll_dispatch", "ll_combine", "ll_reset"):
        setattr(stub, name, noop)
    stub.ht_notify = lambda *args: (args[4] * 2, [0])
    stub.ll_combine_buffer = lambda comm, handle: comm.zero_copy[0].data_ptr()
    return stub


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="LL tokens per call (HT uses 16x)")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--stub", action="store_true", help="no GPU: time the Python layer against no-op natives")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()

    import nccl_moe
    from nccl_moe.torch import LocalWorld, _comm

    if args.stub:
        lib = _stub_lib()
        _comm._Backend.lib = lib
        device = torch.device("cpu")

        def sync():
            pass
    else:
        lib = nccl_moe._C
        device = torch.device("cuda", 0)

        def sync():
            torch.cuda.current_stream().synchronize()

    T, H, E, K = args.tokens, args.hidden, args.experts, args.topk
    T_ht = 16 * T
    world = LocalWorld(1, devices=[0], lib=lib)
    comm = world.comms(num_experts=E, hidden=H, max_topk=K, max_tokens_per_rank=T_ht, ll_max_tokens_per_rank=T)[0]
    g = torch.Generator().manual_seed(0)
    idx = torch.rand((T, E), generator=g).topk(K, dim=1).indices.to(device)
    idx_ht = torch.rand((T_ht, E), generator=g).topk(K, dim=1).indices.to(device)
    w = (torch.rand((T, K), generator=g) + 0.5).to(device)
    x = torch.randn((T, H), generator=g).to(torch.bfloat16).to(device)
    x_ht = torch.randn((T_ht, H), generator=g).to(torch.bfloat16).to(device)
    native, s = comm._native, comm._rt.current_stream()
    rows = []

    def row(op, c_us, py_us, target):
        rows.append(dict(op=op, c_call_us=round(c_us, 2), python_api_us=round(py_us, 2),
                         overhead_us=round(py_us - c_us, 2), target_us=target))

    # -- LL dispatch (bf16) and combine, outputs passed with out= (no allocation per call) ----------------------
    outs = comm._ll_alloc(H, False, 0)
    ll = comm.ll_dispatch(x, idx, topk_weights=w, out=outs)
    sync()
    handle = ll.handle._handle
    ptrs = (x.data_ptr(), idx.data_ptr(), outs[0].data_ptr(), outs[2].data_ptr(), w.data_ptr())

    def c_ll_dispatch():
        lib.ll_dispatch(native, handle, ptrs[0], ptrs[1], 0, T, H, K, 0, 0, ptrs[2], 0, ptrs[3], 0, 3, ptrs[4], s)

    def py_ll_dispatch():
        comm.ll_dispatch(x, idx, topk_weights=w, out=outs)

    row("ll_dispatch", _median_us(c_ll_dispatch, args.batch, args.samples, sync),
        _median_us(py_ll_dispatch, args.batch, args.samples, sync), 2.0)
    comm.ll_reset()
    ll = comm.ll_dispatch(x, idx, topk_weights=w, out=outs)
    y = outs[0]
    out = torch.empty((T, H), dtype=torch.bfloat16, device=device)
    h = ll.handle
    cptrs = (y.data_ptr(), idx.data_ptr(), out.data_ptr())

    def c_ll_combine():
        lib.ll_combine(native, h._handle, cptrs[0], 0, cptrs[1], 0, T, H, K, cptrs[2], 3, s)

    def py_ll_combine():
        comm.ll_combine(y, h, out=out)

    row("ll_combine", _median_us(c_ll_combine, args.batch, args.samples, sync),
        _median_us(py_ll_combine, args.batch, args.samples, sync), 2.0)

    # -- HT cached dispatch and combine (the notify's host wait is not a per-call overhead) ---------------------
    res = comm.ht_dispatch(x_ht, idx_ht)
    sync()
    routing = res.routing
    recv_x = res.recv_x
    combined = torch.empty((T_ht, H), dtype=torch.bfloat16, device=device)
    hptrs = (x_ht.data_ptr(), recv_x.data_ptr(), combined.data_ptr())

    def c_ht_dispatch():
        lib.ht_dispatch(native, routing._handle, hptrs[0], 0, H, 0, 0, 0, 0, 0, hptrs[1], 0, 0, 0, 0, s)

    def py_ht_dispatch():
        comm.ht_dispatch(x_ht, routing=routing, out=(recv_x, None, None, None))

    row("ht_dispatch (cached)", _median_us(c_ht_dispatch, args.batch, args.samples, sync),
        _median_us(py_ht_dispatch, args.batch, args.samples, sync), 5.0)

    def c_ht_combine():
        lib.ht_combine(native, routing._handle, hptrs[1], H, 0, 0, 0, hptrs[2], 0, 0, s)

    def py_ht_combine():
        comm.ht_combine(recv_x, routing, out=combined)

    row("ht_combine", _median_us(c_ht_combine, args.batch, args.samples, sync),
        _median_us(py_ht_combine, args.batch, args.samples, sync), 5.0)

    # -- Informative: the same calls allocating their outputs, and the DeepEP-compatible LL path ----------------
    def py_ll_dispatch_alloc():
        comm.ll_dispatch(x, idx, topk_weights=w)

    comm.ll_reset()
    row("ll_dispatch, outputs allocated", _median_us(c_ll_dispatch, args.batch, args.samples, sync),
        _median_us(py_ll_dispatch_alloc, args.batch, args.samples, sync), None)

    print(f"nccl_moe Python overhead per call ({'stub, no GPU' if args.stub else torch.cuda.get_device_name(0)}; "
          f"torch {torch.__version__}; T={T} (HT {T_ht}), H={H}, E={E}, K={K}; median of {args.samples} x "
          f"{args.batch} calls, host time)")
    print(f"{'op':34s} {'C call us':>10s} {'Python us':>10s} {'overhead':>9s} {'target':>7s}")
    for r in rows:
        target = "" if r["target_us"] is None else f"<= {r['target_us']:g}"
        print(f"{r['op']:34s} {r['c_call_us']:10.2f} {r['python_api_us']:10.2f} {r['overhead_us']:9.2f} {target:>7s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device="stub" if args.stub else torch.cuda.get_device_name(0), torch=torch.__version__,
                           tokens=T, hidden=H, experts=E, topk=K, rows=rows), f, indent=1)
    comm.destroy()


if __name__ == "__main__":
    main()
