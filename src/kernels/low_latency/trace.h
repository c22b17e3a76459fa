// Diagnostic timeline of the low-latency dispatch kernel. When ncclMoeComm::ll_dispatch_trace is set (only by
// the GPU trace test, tests/gpu/ll_trace_test.cc; no public API), thread 0 of every block stores
// %globaltimer (ns, per GPU) at each point below into trace[block * kLlTracePoints + point]; a point a block
// does not reach keeps its previous value, so the caller zeroes the buffer before each traced call. With a
// null pointer each point costs one predicated branch.
#pragma once

namespace nccl_moe {

enum LlTracePoint {
  kLlTraceEntry = 0,    // block started
  kLlTraceTag,          // epoch loaded (tag known)
  kLlTraceSendStored,   // send: all of the block's tokens stored (before the arrival barrier)
  kLlTraceSendArrived,  // send: the block's arrival adds issued
  kLlTraceRecvReady,    // receive, first expert: every source's count shares seen (after the placement)
  kLlTraceRecvScanned,  // receive, first expert: headers scanned as they arrived, block prefix done
  kLlTraceRecvPlaced,   // receive, first expert: rows assigned, provenance written
  kLlTraceRecvCopied,   // receive, first expert: payload and scales copied
  kLlTraceExit,         // block done (after its receive arrival)
  kLlTraceSm,           // not a time: the SM the block runs on (%smid)
  kLlTracePoints
};

}  // namespace nccl_moe
