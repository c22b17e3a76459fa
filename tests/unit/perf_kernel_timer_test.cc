// moe-perf's kernel timer bookkeeping on the CPU (perf/kernel_timer.h, KernelSpanBook): CUPTI kernel records and
// external-correlation records in any order in, per-call spans (first kernel start to last kernel end) out,
// missing and incomplete calls reported, unattributed records dropped after two flushes. The CUPTI collector itself
// needs a GPU (run moe-perf there; docs/moe-perf.md, "Timers").
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "kernel_timer.h"

namespace nccl_moe::perf {
namespace {

constexpr uint64_t kT0 = 1'000'000'000;  // an arbitrary CUPTI timestamp (ns)

TEST(PerfKernelTimer, SpanCoversAllKernelsOfOneCall) {
  KernelSpanBook book;
  // One call (external id 7) issued three API calls (correlations 10, 11, 12): a permutation kernel, an NCCL kernel
  // and an un-permutation kernel, with gaps between them.
  book.addCorrelation(10, 7);
  book.addCorrelation(11, 7);
  book.addCorrelation(12, 7);
  book.addKernel(11, kT0 + 5'000, kT0 + 30'000);
  book.addKernel(10, kT0 + 1'000, kT0 + 4'000);
  book.addKernel(12, kT0 + 31'000, kT0 + 41'500);
  EXPECT_EQ(book.kernelsOf(7), 3);
  std::vector<uint64_t> missing;
  const std::vector<double> us = book.take({7}, &missing);
  ASSERT_EQ(us.size(), 1u);
  EXPECT_DOUBLE_EQ(us[0], 40.5);  // 41.5 us - 1 us
  EXPECT_TRUE(missing.empty());
  EXPECT_EQ(book.knownCorrelations(), 0u);  // taken ids are forgotten
}

TEST(PerfKernelTimer, SeveralKernelsOfOneApiCall) {
  // A graph launch or a library call that launches on several streams: several kernel records, one correlation.
  KernelSpanBook book;
  book.addKernel(20, kT0 + 2'000, kT0 + 9'000);
  book.addCorrelation(20, 3);
  book.addKernel(20, kT0 + 1'000, kT0 + 3'000);  // concurrent kernel that started earlier, delivered later
  std::vector<uint64_t> missing;
  EXPECT_DOUBLE_EQ(book.take({3}, &missing)[0], 8.0);
  EXPECT_TRUE(missing.empty());
}

TEST(PerfKernelTimer, InterleavedIdsOfTwoRankThreads) {
  // Two rank threads time their calls at the same time: their API calls (correlation ids are process-wide and
  // interleave) carry different external ids; CUPTI delivers the records of both GPUs mixed in one buffer.
  KernelSpanBook book;
  const uint64_t a0 = 101, a1 = 102;  // thread A: two timed calls
  const uint64_t b0 = 201, b1 = 202;  // thread B
  book.addCorrelation(1, a0);
  book.addCorrelation(2, b0);
  book.addCorrelation(3, a0);
  book.addCorrelation(4, b0);
  book.addCorrelation(5, b1);
  book.addCorrelation(6, a1);
  book.addKernel(2, kT0 + 100, kT0 + 1'100);    // b0
  book.addKernel(1, kT0 + 50, kT0 + 700);       // a0
  book.addKernel(4, kT0 + 1'200, kT0 + 2'000);  // b0
  book.addKernel(3, kT0 + 800, kT0 + 1'050);    // a0
  book.addKernel(6, kT0 + 5'000, kT0 + 5'250);  // a1
  book.addKernel(5, kT0 + 5'100, kT0 + 5'600);  // b1
  std::vector<uint64_t> missing;
  // Thread B collects first; thread A's spans stay in the book until A takes them.
  const std::vector<double> b = book.take({b0, b1}, &missing);
  EXPECT_DOUBLE_EQ(b[0], 1.9);  // 100 .. 2000 ns
  EXPECT_DOUBLE_EQ(b[1], 0.5);
  EXPECT_EQ(book.kernelsOf(a0), 2);
  const std::vector<double> a = book.take({a0, a1}, &missing);
  EXPECT_DOUBLE_EQ(a[0], 1.0);  // 50 .. 1050 ns
  EXPECT_DOUBLE_EQ(a[1], 0.25);
  EXPECT_TRUE(missing.empty());
}

TEST(PerfKernelTimer, MissingIdsAreReported) {
  KernelSpanBook book;
  book.addCorrelation(1, 11);
  book.addKernel(1, kT0, kT0 + 2'000);
  book.addCorrelation(2, 12);  // an API call under id 12 that launched no kernel (e.g. a failed call)
  std::vector<uint64_t> missing;
  const std::vector<double> us = book.take({11, 12, 13}, &missing);  // 13: nothing at all
  EXPECT_DOUBLE_EQ(us[0], 2.0);
  EXPECT_DOUBLE_EQ(us[1], -1.0);
  EXPECT_DOUBLE_EQ(us[2], -1.0);
  EXPECT_EQ(missing, (std::vector<uint64_t>{12, 13}));
  // A null `missing` is allowed.
  EXPECT_DOUBLE_EQ(book.take({14}, nullptr)[0], -1.0);
}

TEST(PerfKernelTimer, IncompleteRecordsMakeTheCallMissing) {
  // A forced flush can deliver a kernel record without timestamps (the kernel had not finished).
  KernelSpanBook book;
  book.addCorrelation(1, 5);
  book.addCorrelation(2, 5);
  book.addKernel(1, kT0, kT0 + 1'000);
  book.addKernel(2, kT0 + 2'000, 0);
  book.addCorrelation(3, 6);
  book.addKernel(3, kT0 + 9'000, kT0 + 8'000);  // reversed
  std::vector<uint64_t> missing;
  const std::vector<double> us = book.take({5, 6}, &missing);
  EXPECT_DOUBLE_EQ(us[0], -1.0);
  EXPECT_DOUBLE_EQ(us[1], -1.0);
  EXPECT_EQ(missing, (std::vector<uint64_t>{5, 6}));
}

TEST(PerfKernelTimer, KernelRecordsBeforeAndAfterTheirCorrelation) {
  KernelSpanBook book;
  // Before: the kernel buffer is delivered first; the record waits until its correlation arrives.
  book.addKernel(40, kT0 + 10'000, kT0 + 12'000);
  EXPECT_EQ(book.pendingKernels(), 1u);
  EXPECT_EQ(book.kernelsOf(9), 0);
  book.endFlush();  // one flush later the correlation record is still allowed to arrive
  book.addCorrelation(40, 9);
  EXPECT_EQ(book.pendingKernels(), 0u);
  EXPECT_EQ(book.kernelsOf(9), 1);
  // After: a second kernel of the same call arrives once the correlation is known.
  book.addCorrelation(41, 9);
  book.addKernel(41, kT0 + 13'000, kT0 + 15'000);
  std::vector<uint64_t> missing;
  EXPECT_DOUBLE_EQ(book.take({9}, &missing)[0], 5.0);
  EXPECT_TRUE(missing.empty());
  // A record that arrives after its id was taken is not attributed to it any more (it waits, then is dropped).
  book.addKernel(41, kT0 + 16'000, kT0 + 17'000);
  EXPECT_EQ(book.pendingKernels(), 1u);
  EXPECT_EQ(book.kernelsOf(9), 0);
}

TEST(PerfKernelTimer, UnattributedKernelsAreDroppedAfterTwoFlushes) {
  // Barrier and hold kernels run outside any timer id: no correlation record ever names them.
  KernelSpanBook book;
  book.addKernel(70, kT0, kT0 + 30'000);
  book.addKernel(71, kT0 + 31'000, kT0 + 32'000);
  book.endFlush();
  EXPECT_EQ(book.pendingKernels(), 2u);
  book.addKernel(72, kT0 + 40'000, kT0 + 41'000);  // arrived after the first flush
  book.endFlush();
  EXPECT_EQ(book.pendingKernels(), 1u);  // 70 and 71 are gone, 72 has one more flush to go
  book.endFlush();
  EXPECT_EQ(book.pendingKernels(), 0u);
  // A late correlation for a dropped record no longer attributes anything.
  book.addCorrelation(70, 1);
  std::vector<uint64_t> missing;
  EXPECT_DOUBLE_EQ(book.take({1}, &missing)[0], -1.0);
  EXPECT_EQ(missing, (std::vector<uint64_t>{1}));
}

}  // namespace
}  // namespace nccl_moe::perf
