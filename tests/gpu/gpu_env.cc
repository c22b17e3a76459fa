// The environment of the GPU test binary, set before main (and before the CUDA runtime initialises), for ranks
// that share a GPU and wait for each other there (gpu_world.h):
//   CUDA_DEVICE_MAX_CONNECTIONS=32  their streams on distinct hardware queues;
//   CUDA_MODULE_LOADING=EAGER       every kernel loaded at start: a lazily loaded kernel (the tests' own, or one of
//                                   the runtime's memset kernels) waits for the device at its first launch, and a
//                                   peer's kernel spinning until this rank's next call then never ends (the library
//                                   loads its own kernels at init, src/ops/load.cc; the tests' memsets are theirs).
// A value already in the environment is kept. A namespace-scope static of a .cc file is always initialised at
// start-up (an unused inline variable in a header may never be emitted).
#include <cstdlib>

namespace {
const bool kEnvironmentSet =
    (setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0), setenv("CUDA_MODULE_LOADING", "EAGER", 0), true);
}  // namespace
