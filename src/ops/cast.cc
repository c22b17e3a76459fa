// ncclMoeCastToFp8: local and stream-ordered; no communicator.
#include "kernels/cast/cast.h"

#include "core/error.h"
#include "ops/ops.h"

namespace nccl_moe {

ncclResult_t opCastToFp8(const void* x, int num_tokens, int hidden, ncclMoeScaleFormat_t format, void* out_fp8,
                         void* out_scales, cudaStream_t stream) {
  CastArgs a{};
  a.x = static_cast<const uint16_t*>(x);
  a.num_tokens = num_tokens;
  a.hidden = hidden;
  a.num_groups = (hidden + 127) / 128;
  a.num_words = (a.num_groups + 3) / 4;
  a.format = static_cast<int>(format);
  a.out = static_cast<uint8_t*>(out_fp8);
  a.out_scales = static_cast<float*>(out_scales);
  a.out_packed = static_cast<int*>(out_scales);
  MOE_CUDA_CHECK(launchCast(a, stream));
  return ncclSuccess;
}

}  // namespace nccl_moe
