/* Minimal NCCL-MoE program: one process per GPU (launch with mpirun or set NCCL_COMM_ID, RANK and WORLD_SIZE).
 * Creates the MoE communicator from an NCCL one, dispatches bf16 tokens to their experts' ranks and combines
 * them back. Built by the test suite (tests/CMakeLists.txt) so it always matches the header.
 *
 *   cc minimal.c -I<prefix>/include -I/usr/local/cuda/include -L<prefix>/lib -lnccl_moe -lnccl -lcudart
 */
#include <nccl_moe.h>
#include <stdio.h>
#include <stdlib.h>

#define CHECK(call)                                                                                        \
  do {                                                                                                     \
    ncclResult_t r_ = (call);                                                                              \
    if (r_ != ncclSuccess) {                                                                               \
      fprintf(stderr, "%s failed: %s: %s\n", #call, ncclMoeGetErrorString(r_), ncclMoeGetLastError(NULL)); \
      return 1;                                                                                            \
    }                                                                                                      \
  } while (0)

static int envInt(const char* name, int fallback) {
  const char* v = getenv(name);
  return v ? atoi(v) : fallback;
}

int main(void) {
  const int rank = envInt("RANK", envInt("OMPI_COMM_WORLD_RANK", 0));
  const int world = envInt("WORLD_SIZE", envInt("OMPI_COMM_WORLD_SIZE", 1));
  const int tokens = 128, hidden = 1024, topk = 2, experts = 8 * world;
  cudaSetDevice(rank);

  ncclUniqueId id;
  ncclComm_t nccl;
  if (ncclGetUniqueId(&id) != ncclSuccess || ncclCommInitRank(&nccl, world, id, rank) != ncclSuccess) {
    fprintf(stderr, "NCCL init failed (set NCCL_COMM_ID=host:port on every rank)\n");
    return 1;
  }

  ncclMoeConfig_t config = NCCL_MOE_CONFIG_INITIALIZER;
  config.num_experts = experts;
  config.hidden = hidden;
  config.max_topk = topk;
  config.max_tokens_per_rank = tokens;
  ncclMoeComm_t moe;
  CHECK(ncclMoeCommInit(&moe, nccl, &config));
  ncclMoeHandle_t handle;
  CHECK(ncclMoeHandleCreate(moe, &handle));

  /* Routing: token t goes to experts t % E and (t + 1) % E. */
  int64_t* topk_host = malloc(sizeof(int64_t) * tokens * topk);
  for (int t = 0; t < tokens; ++t) {
    topk_host[t * topk] = t % experts;
    topk_host[t * topk + 1] = (t + 1) % experts;
  }
  void *topk_idx, *x, *recv_x, *out;
  cudaMalloc(&topk_idx, sizeof(int64_t) * tokens * topk);
  cudaMemcpy(topk_idx, topk_host, sizeof(int64_t) * tokens * topk, cudaMemcpyHostToDevice);
  cudaMalloc(&x, (size_t)tokens * hidden * 2);
  cudaMemset(x, 0, (size_t)tokens * hidden * 2);
  cudaMalloc(&out, (size_t)tokens * hidden * 2);

  cudaStream_t stream;
  cudaStreamCreate(&stream);
  ncclMoeNotifyArgs_t notify = NCCL_MOE_NOTIFY_ARGS_INITIALIZER;
  int num_recv = 0;
  notify.topk_idx = topk_idx;
  notify.num_tokens = tokens;
  notify.topk = topk;
  notify.num_recv_tokens = &num_recv; /* host-count mode: waits until the count is known */
  CHECK(ncclMoeDispatchNotify(moe, handle, &notify, stream));

  cudaMalloc(&recv_x, (size_t)(num_recv > 0 ? num_recv : 1) * hidden * 2);
  ncclMoeDispatchArgs_t dispatch = NCCL_MOE_DISPATCH_ARGS_INITIALIZER;
  dispatch.x = x;
  dispatch.hidden = hidden;
  dispatch.recv_x = recv_x;
  CHECK(ncclMoeDispatch(moe, handle, &dispatch, stream));

  /* ... run the local experts on recv_x (weighting their outputs) ... */

  ncclMoeCombineArgs_t combine = NCCL_MOE_COMBINE_ARGS_INITIALIZER;
  combine.x = recv_x;
  combine.hidden = hidden;
  combine.combined_x = out;
  CHECK(ncclMoeCombine(moe, handle, &combine, stream));
  cudaStreamSynchronize(stream);
  printf("rank %d received %d rows\n", rank, num_recv);

  CHECK(ncclMoeHandleDestroy(handle));
  CHECK(ncclMoeCommDestroy(moe));
  ncclCommDestroy(nccl);
  free(topk_host);
  return 0;
}
