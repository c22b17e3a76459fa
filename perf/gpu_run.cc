// The kernel timer's collection after a timed loop (contract in gpu_run.h).
#include "gpu_run.h"

namespace nccl_moe::perf {

void collectKernelTimes(const Timing& t, std::initializer_list<OpResult*> ops) {
  if (t.kernel == nullptr) {
    for (OpResult* o : ops) o->kernel_error = "the kernel timer is off in this process";
    return;
  }
  meet(*t.local, t.local_wait_s, "before the kernel timer's flush");
  std::vector<uint64_t> ids;
  for (const OpResult* o : ops) ids.insert(ids.end(), o->kernel_ids.begin(), o->kernel_ids.end());
  std::vector<double> spans;
  std::string err;
  t.kernel->collect(ids, &spans, &err);
  size_t at = 0;
  for (OpResult* o : ops) {
    const size_t n = o->kernel_ids.size();
    o->kernel_us.assign(spans.begin() + static_cast<std::ptrdiff_t>(at),
                        spans.begin() + static_cast<std::ptrdiff_t>(at + n));
    at += n;
    const auto missing = std::count_if(o->kernel_us.begin(), o->kernel_us.end(), [](double v) { return v < 0; });
    if (!t.kernel->usable()) {
      o->kernel_error = t.kernel->error();
    } else if (missing > 0) {
      o->kernel_error = "no complete CUPTI kernel record for " + std::to_string(missing) + " of " + std::to_string(n) +
                        " timed calls";
    } else if (n != o->us.size()) {
      o->kernel_error = std::to_string(n) + " kernel-timed calls for " + std::to_string(o->us.size()) + " timed calls";
    }
    o->kernel_ids.clear();
  }
  meet(*t.local, t.local_wait_s, "after the kernel timer's flush");
}

}  // namespace nccl_moe::perf
