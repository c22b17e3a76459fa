// The high-throughput MoE run of one rank for one size (contract in gpu_run.h): uploads the rank's inputs, runs a
// verification pass (notify + dispatch + combine, checked bitwise against the reference), then times the cached
// dispatch + combine loop (with --metrics also the comparable metrics' loops of the same pair, gpu_run.h) and the
// full first call (notify + dispatch, which includes the notify's host wait).
// The rank's device buffers are allocated and freed between Collective::quiesce() calls (ranks sharing a GPU).
#include <optional>

#include "gpu_run.h"
#include "verify.h"

namespace nccl_moe::perf {

namespace {

size_t sz(int64_t v) { return static_cast<size_t>(v); }

template <typename T>
size_t bytesOf(const std::vector<T>& v) {
  return v.size() * sizeof(T);
}

// Rows no rank can exceed: every rank's tokens.
size_t capRows(const Problem& p) { return std::max<size_t>(1, sz(p.spec.num_ranks) * sz(p.spec.tokens)); }

// One rank's inputs (uploaded) and outputs of the HT calls.
struct HtBuffers {
  DeviceArray<uint8_t> x;  // [T, H] bf16 or fp8
  DeviceArray<float> xs;   // fp8: [T, H/128] scales
  DeviceArray<int64_t> idx;
  DeviceArray<float> w;
  DeviceArray<uint8_t> recv_x;
  DeviceArray<float> recv_xs;
  DeviceArray<int64_t> recv_idx;
  DeviceArray<float> recv_w;
  DeviceArray<uint16_t> y;  // the expert outputs the combine sends back: [cap rows, H] bf16
  DeviceArray<uint16_t> out;

  HtBuffers(const Problem& p, int r, cudaStream_t st) {
    const bool fp8 = p.spec.dtype == DType::kFp8;
    const RowFormat& f = p.fmt;
    const size_t cap_rows = capRows(p);
    if (fp8) {
      x.allocate(bytesOf(p.x_fp8[sz(r)].fp8));
      x.uploadBytes(p.x_fp8[sz(r)].fp8, st);
      xs.assign(p.x_fp8[sz(r)].scales, st);
    } else {
      x.allocate(bytesOf(p.x_bf16[sz(r)]));
      x.uploadBytes(p.x_bf16[sz(r)], st);
    }
    idx.assign(p.routing.ranks[sz(r)].topk_idx, st);
    w.assign(p.routing.ranks[sz(r)].topk_weights, st);
    recv_x.allocate(cap_rows * f.data_bytes);
    recv_xs.allocate(cap_rows * sz(std::max(1, f.groups)));
    recv_idx.allocate(cap_rows * sz(p.spec.topk));
    recv_w.allocate(cap_rows * sz(p.spec.topk));
    y.allocate(cap_rows * sz(p.spec.hidden));
    y.upload(p.ht_y[sz(r)].data(), p.ht_y[sz(r)].size(), st);
    out.allocate(sz(p.spec.tokens) * sz(p.spec.hidden));
  }
};

// The calls of runMoeHt on buffers that exist on every rank.
void runHtCalls(const Problem& p, const RankDevice& rd, Collective& col, MoeSession& moe, int sms, const RunInfo& run,
                const Timing& tm, Progress& prog, HtBuffers& b, HtResult* res) {
  OpResult* all[3] = {&res->dispatch, &res->combine, &res->first};
  const bool check = run.options.check != 0;
  const bool fp8 = p.spec.dtype == DType::kFp8;
  const int r = rd.rank, T = p.spec.tokens, H = p.spec.hidden, K = p.spec.topk;
  const int El = p.numLocalExperts();
  const RowFormat& f = p.fmt;
  const cudaStream_t st = rd.stream;
  const size_t cap_rows = capRows(p);
  DeviceArray<uint8_t>& x = b.x;
  DeviceArray<float>& xs = b.xs;
  DeviceArray<int64_t>& idx = b.idx;
  DeviceArray<float>& w = b.w;
  DeviceArray<uint8_t>& recv_x = b.recv_x;
  DeviceArray<float>& recv_xs = b.recv_xs;
  DeviceArray<int64_t>& recv_idx = b.recv_idx;
  DeviceArray<float>& recv_w = b.recv_w;
  DeviceArray<uint16_t>& y = b.y;
  DeviceArray<uint16_t>& out = b.out;

  int num_recv = -1;
  std::vector<int> per_expert(sz(El), 0);
  ncclMoeNotifyArgs_t na = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
  na.topk_idx = idx.get();
  na.topk_idx_type = ncclMoeIndexInt64;
  na.num_tokens = T;
  na.topk = K;
  na.expert_alignment = p.spec.expert_alignment;
  na.recv_capacity = 0;  // host-count mode: the notify learns N_recv on the host (the documented sync)
  na.num_recv_tokens = &num_recv;
  na.num_recv_tokens_per_expert = per_expert.data();
  ncclMoeDispatchArgs_t da = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
  da.x = x.get();
  da.dtype = fp8 ? ncclMoeFp8E4M3 : ncclMoeBfloat16;
  da.hidden = H;
  da.x_scales = fp8 ? xs.get() : nullptr;
  da.scale_format = ncclMoeScaleFloat;
  da.topk_weights = w.get();
  da.recv_x = recv_x.get();
  da.recv_x_scales = fp8 ? recv_xs.get() : nullptr;
  da.recv_topk_idx = recv_idx.get();
  da.recv_topk_weights = recv_w.get();
  da.num_sms = sms;
  ncclMoeCombineArgs_t ca = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
  ca.x = y.get();
  ca.hidden = H;
  ca.combined_x = out.get();
  ca.num_sms = sms;

  auto call = [&](const char* fn, ncclResult_t result, std::string* err) {
    if (result != ncclSuccess && err->empty()) *err = apiError(fn, result, moe.comm);
    return result == ncclSuccess;
  };

  // Verification pass (also the availability probe). Outputs hold the marker first (verify.h).
  prog.set("ht: notify (verification)");
  recv_x.fill(kMarkerDataByte, st);
  recv_xs.fill(kMarkerDataByte, st);
  recv_idx.fill(kMarkerIndexByte, st);
  recv_w.fill(kMarkerDataByte, st);
  out.fill(kMarkerDataByte, st);
  std::string err;
  col.barrier();
  bool ok = call("ncclMoeDispatchNotify", ncclMoeDispatchNotify(moe.comm, moe.handle, &na, st), &err);
  if (!col.agree(ok)) {
    for (OpResult* o : all) o->fail(err);
    moe.checkAsync(col, &err);
    return;
  }
  prog.set("ht: dispatch (verification)");
  ok = call("ncclMoeDispatch", ncclMoeDispatch(moe.comm, moe.handle, &da, st), &err);
  HARNESS_CUDA(cudaStreamSynchronize(st));
  if (!col.agree(ok)) {
    res->dispatch.fail(err);
    res->first.fail(err);
    res->combine.fail(err.empty() ? kOtherRank : "needs ncclMoeDispatch: " + err);
    moe.checkAsync(col, &err);
    return;
  }
  res->dispatch.available = res->first.available = true;
  if (check) {
    const int64_t rows = std::clamp<int64_t>(num_recv, 0, static_cast<int64_t>(cap_rows));
    // --inject-skipped-write: the first received row back to the marker, as if the kernel had not written it.
    if (run.options.inject_skipped_write && rows > 0)
      HARNESS_CUDA(cudaMemsetAsync(recv_x.get(), kMarkerDataByte, f.data_bytes, st));
    const std::vector<uint8_t> gx = recv_x.download(sz(rows) * f.data_bytes, st);
    const std::vector<float> gs = fp8 ? recv_xs.download(sz(rows) * sz(f.groups), st) : std::vector<float>();
    const std::vector<int64_t> gi = recv_idx.download(sz(rows) * sz(K), st);
    const std::vector<float> gw = recv_w.download(sz(rows) * sz(K), st);
    const int64_t wrong_rows = htRecvWrong(p, r, rows, RowView::split(gx.data(), gs.data(), f)) +
                               htMetaWrong(p, r, rows, nullptr, gi.data(), gw.data());
    res->dispatch.wrong = wrong_rows;
    res->first.wrong = wrong_rows + htMetaWrong(p, r, num_recv, &per_expert, nullptr, nullptr);
  }
  prog.set("ht: combine (verification)");
  std::string comb_err;
  col.barrier();
  ok = call("ncclMoeCombine", ncclMoeCombine(moe.comm, moe.handle, &ca, st), &comb_err);
  HARNESS_CUDA(cudaStreamSynchronize(st));
  if (!col.agree(ok)) {
    res->combine.fail(comb_err);
  } else {
    res->combine.available = true;
    if (check && run.options.inject_skipped_write && T > 0)
      HARNESS_CUDA(cudaMemsetAsync(out.get(), kMarkerDataByte, sz(H) * sizeof(uint16_t), st));
    if (check) res->combine.wrong = bf16Wrong(out.download(out.size(), st).data(), p.ht_expected_combine[sz(r)]);
  }
  if (!moe.checkAsync(col, &err)) {
    for (OpResult* o : all) o->fail(err);
    return;
  }

  // Timed: cached-handle dispatch (no notify, no host wait), then combine; then the same pair in the loops of the
  // comparable metrics (--metrics; nothing without it).
  const EnqueueCall dispatch = [&](std::string* e) {
    return call("ncclMoeDispatch", ncclMoeDispatch(moe.comm, moe.handle, &da, st), e);
  };
  const EnqueueCall combine = [&](std::string* e) {
    return call("ncclMoeCombine", ncclMoeCombine(moe.comm, moe.handle, &ca, st), e);
  };
  timeDispatchCombine(col, st, run, tm, prog, "ht: timed dispatch/combine", &res->dispatch, &res->combine, dispatch,
                      combine);
  timeComparableMetrics(col, st, run, prog, Mode::kHt, &res->dispatch, &res->combine, dispatch, combine);

  // Timed: the full first call, notify (layout + count exchange + host wait) + dispatch. It includes a host wait by
  // definition, so it is always event-timed (no kernel-timer ids).
  Events ev(2);
  bool fail_f = false;
  std::string ef;
  for (int i = 0; i < run.warmup + run.iters; ++i) {
    prog.setCall("ht: timed notify + dispatch", i, run.warmup, run.iters);
    col.barrier();
    ev.record(0, st);
    if (!fail_f)
      fail_f = !call("ncclMoeDispatchNotify", ncclMoeDispatchNotify(moe.comm, moe.handle, &na, st), &ef) ||
               !call("ncclMoeDispatch", ncclMoeDispatch(moe.comm, moe.handle, &da, st), &ef);
    ev.record(1, st);
    HARNESS_CUDA(cudaStreamSynchronize(st));
    if (i >= run.warmup) res->first.us.push_back(ev.us(0, 1));
  }
  if (!col.agree(!fail_f)) res->first.fail(ef);
  if (!moe.checkAsync(col, &err))
    for (OpResult* o : all) o->fail(err);
}

}  // namespace

void runMoeHt(const Problem& p, const RankDevice& rd, Collective& col, MoeSession& moe, int sms, const RunInfo& run,
              const Timing& tm, Progress& prog, HtResult* res) {
  if (!moe.usable) {  // the same on every rank (agreed): nobody allocates
    for (OpResult* o : {&res->dispatch, &res->combine, &res->first}) o->fail(moe.error);
    return;
  }
  std::optional<HtBuffers> buffers;
  col.quiesce();  // ranks sharing a GPU: no rank allocates or frees while a peer's kernel waits for it
  prog.set("ht: setup");
  buffers.emplace(p, rd.rank, rd.stream);
  col.quiesce();
  runHtCalls(p, rd, col, moe, sms, run, tm, prog, *buffers, res);
  col.quiesce();
  buffers.reset();
  col.quiesce();
}

}  // namespace nccl_moe::perf
