// The environment of the GPU test binary, set before main (and before the CUDA runtime initialises): ranks sharing
// a GPU need their streams on distinct hardware queues (gpu_world.h). A namespace-scope static of a .cc file is
// always initialised at start-up (an unused inline variable in a header is not: it may never be emitted).
#include <cstdlib>

namespace {
const bool kMaxConnectionsRequested = (setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0), true);
}  // namespace
