// What every bootstrap offers on top of its all-gather (src/core/bootstrap.h): agreement on a failure and a barrier.
#include "core/bootstrap.h"

#include <vector>

#include "core/error.h"

namespace nccl_moe {

ncclResult_t Bootstrap::agree(bool local_failed, bool* any_failed) {
  const int mine = local_failed ? 1 : 0;
  std::vector<int> all(static_cast<size_t>(size()));
  MOE_CHECK(allGather(&mine, all.data(), sizeof(int)));
  *any_failed = false;
  for (int v : all) *any_failed = *any_failed || v != 0;
  return ncclSuccess;
}

ncclResult_t Bootstrap::barrier() {
  bool any = false;
  return agree(false, &any);
}

}  // namespace nccl_moe
