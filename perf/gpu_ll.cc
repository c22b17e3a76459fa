// The low-latency MoE run of one rank for one size (contract in gpu_run.h): uploads the rank's inputs, runs two
// verification rounds (both phases per call, then the send and receive halves as separate calls; slabs compared as
// sets per expert, the combine against the reference), then times dispatch + combine (with --metrics also the
// comparable metrics' loops of the same pair, gpu_run.h) and the four halves.
// The rank's device buffers are allocated and freed between Collective::quiesce() calls (ranks sharing a GPU).
#include <optional>

#include "gpu_run.h"
#include "verify.h"

namespace nccl_moe::perf {

namespace {

size_t sz(int64_t v) { return static_cast<size_t>(v); }

// One rank's inputs (uploaded) and outputs of the LL calls.
struct LlBuffers {
  DeviceArray<uint16_t> x;  // [T, H] bf16
  DeviceArray<int64_t> idx;
  DeviceArray<float> w;
  DeviceArray<uint8_t> recv_x;  // [E_l, slab, row]
  DeviceArray<float> recv_xs;
  DeviceArray<int> recv_count;
  DeviceArray<uint16_t> y;  // the expert outputs the combine sends back: [E_l, slab, H] bf16
  DeviceArray<uint16_t> out;

  LlBuffers(const Problem& p, int r, cudaStream_t st) {
    const size_t slab_total = sz(p.numLocalExperts()) * sz(p.slabRows());
    x.assign(p.x_bf16[sz(r)], st);
    idx.assign(p.routing.ranks[sz(r)].topk_idx, st);
    w.assign(p.routing.ranks[sz(r)].topk_weights, st);
    recv_x.allocate(slab_total * p.fmt.data_bytes);
    recv_xs.allocate(slab_total * sz(std::max(1, p.fmt.groups)));
    recv_count.allocate(sz(p.numLocalExperts()));
    y.allocate(slab_total * sz(p.spec.hidden));
    out.allocate(sz(p.spec.tokens) * sz(p.spec.hidden));
  }
};

// The calls of runMoeLl on buffers that exist on every rank.
void runLlCalls(const Problem& p, const RankDevice& rd, Collective& col, MoeSession& moe, const RunInfo& run,
                const Timing& tm, Progress& prog, LlBuffers& b, LlResult* res) {
  OpResult* all[6] = {&res->dispatch,      &res->combine,      &res->dispatch_send,
                      &res->dispatch_recv, &res->combine_send, &res->combine_recv};
  const bool check = run.options.check != 0;
  const bool fp8 = p.spec.dtype == DType::kFp8;
  const int r = rd.rank, T = p.spec.tokens, H = p.spec.hidden, K = p.spec.topk;
  const int El = p.numLocalExperts(), slab = p.slabRows();
  const RowFormat& f = p.fmt;
  const cudaStream_t st = rd.stream;
  const size_t slab_total = sz(El) * sz(slab);
  DeviceArray<uint16_t>& x = b.x;
  DeviceArray<int64_t>& idx = b.idx;
  DeviceArray<float>& w = b.w;
  DeviceArray<uint8_t>& recv_x = b.recv_x;
  DeviceArray<float>& recv_xs = b.recv_xs;
  DeviceArray<int>& recv_count = b.recv_count;
  DeviceArray<uint16_t>& y = b.y;
  DeviceArray<uint16_t>& out = b.out;

  ncclMoeLLDispatchArgs_t la = NCCL_MOE_LL_DISPATCH_ARGS_INITIALIZER;
  la.x = x.get();
  la.topk_idx = idx.get();
  la.topk_idx_type = ncclMoeIndexInt64;
  la.num_tokens = T;
  la.hidden = H;
  la.topk = K;
  la.use_fp8 = fp8 ? 1 : 0;
  la.scale_format = ncclMoeScaleFloat;
  la.recv_x = recv_x.get();
  la.recv_x_scales = fp8 ? recv_xs.get() : nullptr;
  la.recv_count = recv_count.get();
  la.phase = ncclMoePhaseBoth;
  la.topk_weights = w.get();  // carried with the tokens: the combine needs no weight exchange
  ncclMoeLLCombineArgs_t lc = NCCL_MOE_LL_COMBINE_ARGS_INITIALIZER;
  lc.x = y.get();
  lc.zero_copy = 0;
  lc.topk_idx = idx.get();
  lc.topk_weights = nullptr;  // the dispatch's
  lc.num_tokens = T;
  lc.hidden = H;
  lc.topk = K;
  lc.out = out.get();
  lc.phase = ncclMoePhaseBoth;

  auto call = [&](const char* fn, ncclResult_t result, std::string* err) {
    if (result != ncclSuccess && err->empty()) *err = apiError(fn, result, moe.comm);
    return result == ncclSuccess;
  };
  auto dispatchCall = [&](ncclMoePhase_t phase, std::string* err) {
    la.phase = phase;
    return call("ncclMoeLowLatencyDispatch", ncclMoeLowLatencyDispatch(moe.comm, moe.handle, &la, st), err);
  };
  auto combineCall = [&](ncclMoePhase_t phase, std::string* err) {
    lc.phase = phase;
    return call("ncclMoeLowLatencyCombine", ncclMoeLowLatencyCombine(moe.comm, moe.handle, &lc, st), err);
  };

  // Verification: one round with both phases per call, one with the send and receive halves as separate calls.
  struct Round {
    bool dispatch_ok = false, combine_ok = false;
    std::string dispatch_err, combine_err;
    int64_t dispatch_wrong = 0, combine_wrong = 0;
  };
  auto verifyRound = [&](bool split) {
    Round result;
    prog.set(split ? "ll: split dispatch (verification)" : "ll: dispatch (verification)");
    // Outputs hold the marker before every verified call (verify.h): the split round's halves are checked on
    // outputs the whole-call round did not leave behind.
    recv_x.fill(kMarkerDataByte, st);
    if (fp8) recv_xs.fill(kMarkerDataByte, st);
    recv_count.fill(kMarkerIndexByte, st);
    out.fill(kMarkerDataByte, st);
    col.barrier();
    bool ok = split ? dispatchCall(ncclMoePhaseSend, &result.dispatch_err) &&
                          dispatchCall(ncclMoePhaseRecv, &result.dispatch_err)
                    : dispatchCall(ncclMoePhaseBoth, &result.dispatch_err);
    HARNESS_CUDA(cudaStreamSynchronize(st));
    result.dispatch_ok = col.agree(ok);
    if (!result.dispatch_ok) return result;
    if (check) {
      const std::vector<int> counts = recv_count.download(sz(El), st);
      // --inject-skipped-write: the first row of the first non-empty slab back to the marker.
      if (run.options.inject_skipped_write) {
        for (int e = 0; e < El; ++e) {
          if (counts[sz(e)] <= 0) continue;
          HARNESS_CUDA(
              cudaMemsetAsync(recv_x.get() + sz(e) * sz(slab) * f.data_bytes, kMarkerDataByte, f.data_bytes, st));
          break;
        }
      }
      const std::vector<uint8_t> gx = recv_x.download(recv_x.size(), st);
      const std::vector<float> gs = fp8 ? recv_xs.download(slab_total * sz(f.groups), st) : std::vector<float>();
      std::vector<int32_t> identity;
      result.dispatch_wrong = llRecvWrong(p, r, counts.data(), RowView::split(gx.data(), gs.data(), f), &identity);
      // Expert outputs in the order this GPU received the rows, so the combine check is order-independent.
      const std::vector<uint16_t> yh = llExpertOutputsFor(p, r, identity);
      y.upload(yh.data(), yh.size(), st);
    } else {
      y.zeroAsync(st);
    }
    prog.set(split ? "ll: split combine (verification)" : "ll: combine (verification)");
    col.barrier();
    ok = split
             ? combineCall(ncclMoePhaseSend, &result.combine_err) && combineCall(ncclMoePhaseRecv, &result.combine_err)
             : combineCall(ncclMoePhaseBoth, &result.combine_err);
    HARNESS_CUDA(cudaStreamSynchronize(st));
    result.combine_ok = col.agree(ok);
    if (result.combine_ok && check && run.options.inject_skipped_write && T > 0)
      HARNESS_CUDA(cudaMemsetAsync(out.get(), kMarkerDataByte, sz(H) * sizeof(uint16_t), st));
    if (result.combine_ok && check)
      result.combine_wrong = bf16Wrong(out.download(out.size(), st).data(), p.ll_expected_combine[sz(r)]);
    return result;
  };
  std::string err;
  const Round both = verifyRound(false);
  if (!both.dispatch_ok) {
    const std::string e = both.dispatch_err;
    for (OpResult* o : all) o->fail(o == &res->dispatch || e.empty() ? e : "needs dispatch: " + e);
    moe.checkAsync(col, &err);
    return;
  }
  res->dispatch.available = true;
  res->dispatch.wrong = both.dispatch_wrong;
  if (both.combine_ok) {
    res->combine.available = true;
    res->combine.wrong = both.combine_wrong;
  } else {
    res->combine.fail(both.combine_err);
  }
  const Round split = verifyRound(true);
  OpResult* dispatch_halves[2] = {&res->dispatch_send, &res->dispatch_recv};
  OpResult* combine_halves[2] = {&res->combine_send, &res->combine_recv};
  for (OpResult* o : dispatch_halves) {
    o->available = split.dispatch_ok;
    o->wrong = split.dispatch_wrong;  // the pair is verified together
    if (!split.dispatch_ok) o->fail(split.dispatch_err);
  }
  for (OpResult* o : combine_halves) {
    o->available = split.dispatch_ok && split.combine_ok;
    o->wrong = split.combine_wrong;
    if (!split.dispatch_ok) {
      o->fail(split.dispatch_err.empty() ? "" : "needs the split dispatch: " + split.dispatch_err);
    } else if (!split.combine_ok) {
      o->fail(split.combine_err);
    }
  }
  if (!moe.checkAsync(col, &err)) {
    for (OpResult* o : all) o->fail(err);
    return;
  }

  // Timed: dispatch then combine (both phases in one call each), a barrier before each; then the same pair in the
  // loops of the comparable metrics (--metrics; nothing without it).
  const EnqueueCall dispatch = [&](std::string* e) { return dispatchCall(ncclMoePhaseBoth, e); };
  const EnqueueCall combine = [&](std::string* e) { return combineCall(ncclMoePhaseBoth, e); };
  timeDispatchCombine(col, st, run, tm, prog, "ll: timed dispatch/combine", &res->dispatch, &res->combine, dispatch,
                      combine);
  timeComparableMetrics(col, st, run, prog, Mode::kLl, &res->dispatch, &res->combine, dispatch, combine);

  Events ev(6);
  // Timed: send and receive halves separately.
  bool fail_ds = !res->dispatch_send.available, fail_cs = !res->combine_send.available;
  std::string eds, ecs;
  for (int i = 0; i < run.warmup + run.iters; ++i) {
    prog.setCall("ll: timed send/recv halves", i, run.warmup, run.iters);
    const bool timed = i >= run.warmup;
    col.barrier();
    ev.record(0, st);
    if (!fail_ds) {
      KernelTimerScope k(tm.kernel, tm.ids(res->dispatch_send, timed));
      fail_ds = !dispatchCall(ncclMoePhaseSend, &eds);
    }
    ev.record(1, st);
    if (!fail_ds) {
      KernelTimerScope k(tm.kernel, tm.ids(res->dispatch_recv, timed));
      fail_ds = !dispatchCall(ncclMoePhaseRecv, &eds);
    }
    ev.record(2, st);
    col.barrier();
    ev.record(3, st);
    if (!fail_cs && !fail_ds) {
      KernelTimerScope k(tm.kernel, tm.ids(res->combine_send, timed));
      fail_cs = !combineCall(ncclMoePhaseSend, &ecs);
    }
    ev.record(4, st);
    if (!fail_cs && !fail_ds) {
      KernelTimerScope k(tm.kernel, tm.ids(res->combine_recv, timed));
      fail_cs = !combineCall(ncclMoePhaseRecv, &ecs);
    }
    ev.record(5, st);
    HARNESS_CUDA(cudaStreamSynchronize(st));
    if (timed) {
      res->dispatch_send.us.push_back(ev.us(0, 1));
      res->dispatch_recv.us.push_back(ev.us(1, 2));
      res->combine_send.us.push_back(ev.us(3, 4));
      res->combine_recv.us.push_back(ev.us(4, 5));
    }
  }
  collectKernelTimes(tm, {&res->dispatch_send, &res->dispatch_recv, &res->combine_send, &res->combine_recv});
  if (!col.agree(!fail_ds))
    for (OpResult* o : dispatch_halves) o->fail(eds);
  if (!col.agree(!fail_cs && !fail_ds))
    for (OpResult* o : combine_halves) o->fail(ecs.empty() ? eds : ecs);
  if (!moe.checkAsync(col, &err))
    for (OpResult* o : all) o->fail(err);
}

}  // namespace

void runMoeLl(const Problem& p, const RankDevice& rd, Collective& col, MoeSession& moe, const RunInfo& run,
              const Timing& tm, Progress& prog, LlResult* res) {
  if (!moe.usable) {  // the same on every rank (agreed): nobody allocates
    for (OpResult* o : {&res->dispatch, &res->combine, &res->dispatch_send, &res->dispatch_recv, &res->combine_send,
                        &res->combine_recv})
      o->fail(moe.error);
    return;
  }
  std::optional<LlBuffers> buffers;
  col.quiesce();  // ranks sharing a GPU: no rank allocates or frees while a peer's kernel waits for it
  prog.set("ll: setup");
  buffers.emplace(p, rd.rank, rd.stream);
  col.quiesce();
  runLlCalls(p, rd, col, moe, run, tm, prog, *buffers, res);
  col.quiesce();
  buffers.reset();
  col.quiesce();
}

}  // namespace nccl_moe::perf
