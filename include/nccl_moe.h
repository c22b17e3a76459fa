/*
 * NCCL-MoE: Mixture-of-Experts expert-parallel collectives next to NCCL.
 *
 * This is the whole public API. It follows NCCL's conventions:
 *   - every function returns ncclResult_t; ncclMoeGetLastError() gives the text of the last failure;
 *   - a communicator (ncclMoeComm_t) is created collectively from the caller's ncclComm_t;
 *   - operations are enqueued on the caller's cudaStream_t and return (stream-ordered). The only host
 *     synchronisation is the one documented on ncclMoeDispatchNotify() in host-count mode;
 *   - all input/output tensors are caller-owned device memory; the library owns its communication buffers.
 *
 * Notation used in the comments: R ranks, r this rank, T tokens on this rank, H hidden size (elements),
 * K top-k, E experts (E % R == 0, expert e lives on rank e / (E/R)), E_l = E/R local experts,
 * N_recv rows received by a high-throughput dispatch.
 *
 * Argument structs are versioned: each starts with `size` (sizeof the struct the caller was compiled
 * with) and `version` (NCCL_MOE_VERSION_CODE). Initialise them with the matching *_INITIALIZER macro,
 * which also sets every optional field to its documented default.
 */
#ifndef NCCL_MOE_H_
#define NCCL_MOE_H_

#include <cuda_runtime.h>
#include <nccl.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NCCL_MOE_MAJOR 0
#define NCCL_MOE_MINOR 1
#define NCCL_MOE_PATCH 0
#define NCCL_MOE_VERSION_CODE (NCCL_MOE_MAJOR * 10000 + NCCL_MOE_MINOR * 100 + NCCL_MOE_PATCH)

/* Largest supported values; inputs beyond them are rejected with ncclInvalidArgument.
 * A communicator's ranks are grouped into nodes (ranks with the same host identity: NCCL_MOE_HOSTID, else
 * NCCL_HOSTID, else the host name). Inside a node ranks talk over NVLink (or share a GPU); across nodes they
 * need the scale-out transport: this build has only the software NIC (NCCL_MOE_NET=emulated, ranks of one process
 * on one GPU; docs/environment.md); other multi-node communicators are refused. */
#define NCCL_MOE_MAX_RANKS 256   /* ranks of one communicator, over all its nodes */
#define NCCL_MOE_MAX_NVL_PEERS 8 /* ranks of one node (NVLink domain), the rank itself included */
#define NCCL_MOE_MAX_TOPK 16
#define NCCL_MOE_MAX_EXPERTS 4096

typedef struct ncclMoeComm* ncclMoeComm_t;
/* Routing state of one dispatch, reused by combine and by cached re-dispatch. Not thread-safe. */
typedef struct ncclMoeHandle* ncclMoeHandle_t;

typedef enum {
  ncclMoeBfloat16 = 0, /* bf16 activations */
  ncclMoeFp8E4M3 = 1   /* fp8 e4m3 activations with per-128-channel scales */
} ncclMoeDataType_t;

typedef enum {
  ncclMoeScaleFloat = 0,     /* float32, one per 128 channels: amax/448 */
  ncclMoeScaleFloatPow2 = 1, /* float32 rounded up to a power of two (low-latency cast only) */
  ncclMoeScaleUe8m0 = 2      /* power-of-two exponent bytes (value 2^(b-127)), four packed per int32 */
} ncclMoeScaleFormat_t;

typedef enum {
  ncclMoeIndexInt64 = 0, /* topk_idx as int64_t */
  ncclMoeIndexInt32 = 1  /* topk_idx as int32_t */
} ncclMoeIndexType_t;

/* Low-latency calls may be split in two: the send half returns once the data is posted; the receive
 * half, called later on any stream ordered after it, waits for arrival and writes the outputs. */
typedef enum { ncclMoePhaseBoth = 3, ncclMoePhaseSend = 1, ncclMoePhaseRecv = 2 } ncclMoePhase_t;

/* ------------------------------------------------------------------------------------------------ */
/* Version, errors                                                                                  */
/* ------------------------------------------------------------------------------------------------ */

/* *version = NCCL_MOE_VERSION_CODE of the loaded library. */
ncclResult_t ncclMoeGetVersion(int* version);
/* Static text for a result code (like ncclGetErrorString). */
const char* ncclMoeGetErrorString(ncclResult_t result);
/* Detailed message of the last failure: of `comm` when not NULL, else of the calling thread.
 * Never NULL; "" when nothing failed. Valid until the next call on the same comm/thread. */
const char* ncclMoeGetLastError(ncclMoeComm_t comm);

/* ------------------------------------------------------------------------------------------------ */
/* Communicator                                                                                     */
/* ------------------------------------------------------------------------------------------------ */

typedef struct {
  size_t size;                /* sizeof(ncclMoeConfig_t) */
  unsigned int version;       /* NCCL_MOE_VERSION_CODE */
  int num_experts;            /* E: total experts, E % R == 0, E >= R, E <= NCCL_MOE_MAX_EXPERTS. Required. */
  int hidden;                 /* largest H any call will use (elements, H % 8 == 0). Required. */
  int max_topk;               /* largest K any call will use, 1..NCCL_MOE_MAX_TOPK. Default 8. */
  int max_tokens_per_rank;    /* high-throughput capacity: largest T of a HT call on any rank; 0 = no HT. */
  int ll_max_tokens_per_rank; /* low-latency capacity: largest T of a LL call (same on every rank); 0 = no LL. */
  int num_sms;                /* default SM budget of HT kernels; 0 = chosen from the hardware. */
  int ll_num_sms;             /* SMs of this rank's LL kernels; 0 = all of the rank's SMs (its GPU's, or its share when
                               * ranks share the GPU), larger values are capped there. A budget below that leaves SMs
                               * to other work (e.g. compute kernels on other streams during decode) and makes an LL
                               * call with both phases two kernels (send, then receive), so that it completes however
                               * few of its blocks are resident. May differ between ranks. */
  int enable_rank_masks;      /* 0 (default): a device wait that times out fails the communicator. 1: rank masks for
                               * low-latency calls (see "Rank masks" below): an LL wait that times out on a peer masks
                               * that peer instead, and later LL calls skip masked ranks. Same on every rank. */
} ncclMoeConfig_t;

#define NCCL_MOE_CONFIG_INITIALIZER \
  { sizeof(ncclMoeConfig_t), NCCL_MOE_VERSION_CODE, 0, 0, 8, 0, 0, 0, 0, 0 }

/* Bytes of device memory one rank's communication buffer needs for `config` on `num_ranks` ranks of one node
 * (what ncclMoeCommInit allocates per rank; 1 <= num_ranks <= NCCL_MOE_MAX_NVL_PEERS). Pure host arithmetic,
 * callable before init. */
ncclResult_t ncclMoeGetBufferSize(const ncclMoeConfig_t* config, int num_ranks, size_t* bytes);

/* Collective over every rank of `nccl_comm`: learns rank, size and CUDA device from it, allocates this
 * rank's communication buffer on that device and exchanges access to it with every peer through NCCL
 * collectives on `nccl_comm` (CUDA IPC for peers in other processes, peer access for peers in this
 * process, plain pointers for ranks that share this GPU). All ranks must pass equal configs (checked). The
 * calling thread's current device must be the communicator's device (checked; the caller's current device is
 * left as it was). A rank whose config or local setup fails still takes part in the collective exchange: every
 * other rank then returns ncclRemoteError and none hangs. Only NULL comm / nccl_comm / config return at once
 * on that rank. `nccl_comm` must outlive the MoE communicator; the library never destroys it and uses it only
 * inside ncclMoeCommInit/Destroy.
 * Nodes: ranks with the same host identity (NCCL_MOE_HOSTID, else NCCL_HOSTID, else the host name and boot
 * id) form a node; at most NCCL_MOE_MAX_NVL_PEERS ranks per node, every pair with NVLink/P2P access or on the
 * same GPU. A communicator of several nodes is refused with ncclInvalidUsage naming what is missing (no verbs
 * backend yet; NCCL_MOE_NET=emulated, the software NIC, serves only ranks of one process on one GPU, i.e.
 * ncclMoeCommInitAll with NCCL_MOE_EMULATE_NODES). On a multi-node communicator the LL and HT calls run the
 * internode kernels over the scale-out transport (HT: nodes of equal size; its combine is the two-level sum of
 * docs/reference.md); the dispatch layout and the queries (ncclMoeCommNodeCount among them) work.
 * Ranks that share a GPU (several processes on one GPU, e.g. under MPS) split its SMs: each rank's kernels
 * use at most SMs / (ranks on that GPU), so that every rank's blocks can be resident at once. */
ncclResult_t ncclMoeCommInit(ncclMoeComm_t* comm, ncclComm_t nccl_comm, const ncclMoeConfig_t* config);
/* Single-process world, in the spirit of ncclCommInitAll: creates num_ranks communicators in one call, rank r
 * on CUDA device devices[r] (NULL: rank r on device r). Devices may repeat: ranks on one device share that GPU.
 * No NCCL communicator is involved: the ranks bootstrap through this process's memory. The world is one node,
 * unless NCCL_MOE_EMULATE_NODES=n splits it into n nodes of num_ranks / n consecutive ranks (virtual nodes on one
 * GPU, with NCCL_MOE_NET=emulated; docs/environment.md). comms[r] is then driven from its own host thread (the ranks'
 * calls wait for each other on the device, so one thread cannot enqueue for all ranks), with the contract of every
 * other communicator. Ranks that share a GPU split its SMs (see ncclMoeCommInit): HT calls accept num_sms up to SMs /
 * (ranks on that GPU), LL kernels use that many SMs. Such worlds are for functional runs and tests: their timings say
 * nothing about NVLink. Set CUDA_DEVICE_MAX_CONNECTIONS=32 in the environment before the process first uses
 * CUDA: with the default of 8 hardware queues, the streams of two ranks may share a queue, and a kernel that
 * waits for its peer queued behind that peer's kernel times out (NCCL_MOE_TIMEOUT_S). The library loads its
 * own kernels at init; kernels of the application that run between collective calls should be loaded early too
 * (CUDA_MODULE_LOADING=EAGER): a lazily loaded kernel waits for the device at its first launch, where a peer's
 * kernel may be waiting for this rank's next call. For the same reason, do not allocate or free device memory
 * (cudaMalloc, cudaFree, ncclMoeHandleCreate/Destroy) or use the legacy default stream on one rank's thread while
 * a peer may have calls enqueued that wait for this rank's next call: those CUDA calls wait for the whole device.
 * Synchronise the ranks' threads (every rank's calls enqueued, or its stream drained) first.
 * LL kernels of ranks sharing a GPU run one block per SM (two otherwise), and an LL call with both phases runs
 * as a send kernel then a receive kernel (NCCL_MOE_LL_SPLIT_LAUNCH=1 asks for that anywhere), so that no
 * block waits for a block of its own grid that may not be resident.
 * On failure no communicator is returned (comms[] all NULL) and ncclMoeGetLastError(NULL) says why. */
ncclResult_t ncclMoeCommInitAll(ncclMoeComm_t* comms, int num_ranks, const int* devices, const ncclMoeConfig_t* config);
/* Waits for outstanding work, then frees everything the communicator owns. Collective for communicators made
 * by ncclMoeCommInit (a barrier over nccl_comm before the buffer goes). Not collective for those made by
 * ncclMoeCommInitAll: they may be destroyed in any order from any thread; the world's buffers are released
 * with its last communicator. */
ncclResult_t ncclMoeCommDestroy(ncclMoeComm_t comm);
ncclResult_t ncclMoeCommRank(ncclMoeComm_t comm, int* rank);
ncclResult_t ncclMoeCommCount(ncclMoeComm_t comm, int* num_ranks);
ncclResult_t ncclMoeCommCuDevice(ncclMoeComm_t comm, int* device);
/* *num_nodes = the nodes the communicator's ranks form (see "Nodes" on ncclMoeCommInit): 1 for a single-node
 * communicator; n for a world split by NCCL_MOE_EMULATE_NODES=n (node i = ranks i*R/n .. (i+1)*R/n - 1, reached
 * from other nodes through the scale-out transport, in this build the software NIC). Host-side, not collective,
 * stream-independent; equal on every rank. ncclInvalidArgument when comm or num_nodes is NULL. */
ncclResult_t ncclMoeCommNodeCount(ncclMoeComm_t comm, int* num_nodes);
/* ncclSuccess, or the error a kernel recorded: a device-side wait timed out (ncclRemoteError: phase, rank, peer),
 * more rows arrived than recv_capacity (ncclInvalidUsage), or a top-k id in device memory is neither -1 nor in
 * [0, num_experts) (ncclInvalidArgument: phase, token, slot and the id; the slot was read as unused). Top-k ids
 * live in device memory, so they are checked by the kernel that first reads them (layout, HT notify, LL dispatch
 * and LL combine), not before the call. Non-blocking. Once an asynchronous error is recorded every later call on
 * the communicator returns it; destroy the comm. */
ncclResult_t ncclMoeCommGetAsyncError(ncclMoeComm_t comm, ncclResult_t* async_error);

/* A handle keeps the routing of one dispatch for combine and cached re-dispatch. It is sized from the
 * communicator's config, owned by the library, and may be reused for any number of dispatches. */
ncclResult_t ncclMoeHandleCreate(ncclMoeComm_t comm, ncclMoeHandle_t* handle);
ncclResult_t ncclMoeHandleDestroy(ncclMoeHandle_t handle);

/* ------------------------------------------------------------------------------------------------ */
/* Layout                                                                                            */
/* ------------------------------------------------------------------------------------------------ */

typedef struct {
  size_t size;
  unsigned int version;
  const void* topk_idx; /* [T, K] int64 or int32 (topk_idx_type), -1 = unused slot; device */
  ncclMoeIndexType_t topk_idx_type;
  int num_tokens;             /* T >= 0 */
  int topk;                   /* K, 1..max_topk */
  int* num_tokens_per_rank;   /* out: [R] int32, device, caller-owned */
  int* num_tokens_per_expert; /* out: [E] int32, device, caller-owned (may be NULL) */
  uint8_t* is_token_in_rank;  /* out: [T, R] bool bytes, device, caller-owned (may be NULL) */
} ncclMoeLayoutArgs_t;

#define NCCL_MOE_LAYOUT_ARGS_INITIALIZER \
  { sizeof(ncclMoeLayoutArgs_t), NCCL_MOE_VERSION_CODE, NULL, ncclMoeIndexInt64, 0, 0, NULL, NULL, NULL }

/* Local, not collective: counts of this rank's tokens per destination rank and expert. A token counts
 * once per rank even when several of its experts live there. */
ncclResult_t ncclMoeGetDispatchLayout(ncclMoeComm_t comm, const ncclMoeLayoutArgs_t* args, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------ */
/* High-throughput dispatch and combine                                                              */
/* ------------------------------------------------------------------------------------------------ */
/* Contract of every HT (and LL) call, not checkable on one rank alone:
 *   - every rank makes the same sequence of calls on a communicator, with the same topk and hidden per
 *     call and the same choice of passing topk_weights or not; num_tokens, num_sms and recv_capacity may
 *     differ between ranks;
 *   - the calls of one communicator are ordered on the device (one stream, or streams joined by events);
 *   - a call's blocks must all be resident at once (they wait for each other through the peers): other
 *     kernels that keep every SM busy at the same time can delay it until its device waits time out
 *     (NCCL_MOE_TIMEOUT_S; the error then names the phase, the rank and the peer it waited for). */

typedef struct {
  size_t size;
  unsigned int version;
  const void* topk_idx; /* [T, K] int64 or int32, -1 = unused slot; device */
  ncclMoeIndexType_t topk_idx_type;
  int num_tokens;       /* T, 0..max_tokens_per_rank (may differ between ranks) */
  int topk;             /* K, 1..max_topk (same on every rank) */
  int expert_alignment; /* per-expert receive counts rounded up to this multiple; >= 1 */
  /* 0: host-count mode: the call waits (host synchronisation) until this rank's receive count is known
   *    and returns it in *num_recv_tokens.
   * >0: worst-case mode: the caller's outputs have room for recv_capacity rows; nothing waits on the
   *    host (CUDA-graph capturable). The real count is in ncclMoeHandleRecvCountDevice(). A count over
   *    recv_capacity becomes an asynchronous error on the device (no row past capacity is written). */
  int recv_capacity;
  int* num_recv_tokens;            /* out (host, host-count mode only): N_recv */
  int* num_recv_tokens_per_expert; /* out (host, optional, host-count mode only): [E_l] aligned counts */
} ncclMoeNotifyArgs_t;

#define NCCL_MOE_NOTIFY_ARGS_INITIALIZER \
  { sizeof(ncclMoeNotifyArgs_t), NCCL_MOE_VERSION_CODE, NULL, ncclMoeIndexInt64, 0, 0, 1, 0, NULL, NULL }

/* Collective. Computes the layout of this rank's tokens, exchanges counts with every rank and stores the
 * routing in `handle`. Must be followed by ncclMoeDispatch with the same handle. */
ncclResult_t ncclMoeDispatchNotify(ncclMoeComm_t comm, ncclMoeHandle_t handle, const ncclMoeNotifyArgs_t* args,
                                   cudaStream_t stream);

/* Device pointers owned by the handle, valid until it is destroyed; filled by the stream-ordered notify:
 *   recv_count:            [1] int32, N_recv of the last notify
 *   recv_count_per_expert: [E_l] int32, aligned per-local-expert receive counts
 *   recv_src_info:         [recv capacity] int32, source (rank << 24 | token) of each received row */
ncclResult_t ncclMoeHandleRecvCountDevice(ncclMoeHandle_t handle, const int** recv_count,
                                          const int** recv_count_per_expert, const int** recv_src_info);

typedef struct {
  size_t size;
  unsigned int version;
  const void* x; /* [T, H] bf16 or fp8 e4m3 (dtype), row stride H elements; device */
  ncclMoeDataType_t dtype;
  int hidden;                        /* H, H % 8 == 0 (bf16) / H % 16 == 0 (fp8), <= config hidden */
  const void* x_scales;              /* fp8 only: float [T, ceil(H/128)] or packed ue8m0 int32 [T, ceil(H/512)] */
  ncclMoeScaleFormat_t scale_format; /* ncclMoeScaleFloat or ncclMoeScaleUe8m0 */
  int64_t x_scales_token_stride;     /* elements (float or int32) between tokens; 0 = packed */
  int64_t x_scales_channel_stride;   /* elements between scale columns; 0 = 1 */
  const float* topk_weights;         /* [T, K] float32 or NULL; device */
  void* recv_x;                      /* out: [N_recv or capacity, H] same dtype as x; caller-owned device */
  void* recv_x_scales;               /* out (fp8): [rows, ceil(H/128)] float or [rows, ceil(H/512)] int32, packed */
  void* recv_topk_idx;               /* out (optional): [rows, K] local expert ids (same index type as the
                                        notify's topk_idx), -1 where not local; rows past N_recv all -1 */
  float* recv_topk_weights;          /* out (optional, needs topk_weights): [rows, K] */
  int num_sms;                       /* SM budget, 0 = communicator default */
} ncclMoeDispatchArgs_t;

#define NCCL_MOE_DISPATCH_ARGS_INITIALIZER                                                                         \
  {                                                                                                                \
    sizeof(ncclMoeDispatchArgs_t), NCCL_MOE_VERSION_CODE, NULL, ncclMoeBfloat16, 0, NULL, ncclMoeScaleFloat, 0, 0, \
        NULL, NULL, NULL, NULL, NULL, 0                                                                            \
  }

/* Collective. Sends each token's row to every rank holding one of its experts (once per rank) using the
 * routing in `handle`. Receive order: source rank ascending, then source token ascending. Calling it again
 * with the same handle and new data is a cached re-dispatch (no layout, no notify, no host wait). */
ncclResult_t ncclMoeDispatch(ncclMoeComm_t comm, ncclMoeHandle_t handle, const ncclMoeDispatchArgs_t* args,
                             cudaStream_t stream);

typedef struct {
  size_t size;
  unsigned int version;
  const void* x;                /* [N_recv, H] bf16 in dispatch's output order; device */
  int hidden;                   /* H, as in the dispatch */
  const float* topk_weights;    /* optional [N_recv, K] float32 (backward of dispatch) */
  const void* bias_0;           /* optional [T, H] bf16 added after the sum */
  const void* bias_1;           /* optional [T, H] bf16 added after bias_0 */
  void* combined_x;             /* out: [T, H] bf16; caller-owned device */
  float* combined_topk_weights; /* out (with topk_weights): [T, K] */
  int num_sms;                  /* SM budget, 0 = communicator default */
} ncclMoeCombineArgs_t;

#define NCCL_MOE_COMBINE_ARGS_INITIALIZER \
  { sizeof(ncclMoeCombineArgs_t), NCCL_MOE_VERSION_CODE, NULL, 0, NULL, NULL, NULL, NULL, NULL, 0 }

/* Collective. Reverse of the dispatch recorded in `handle`: out[t] = sum over the ranks s that received
 * token t (s ascending) of x_s[row of t] in FP32, then + bias_0[t], then + bias_1[t], rounded to bf16. */
ncclResult_t ncclMoeCombine(ncclMoeComm_t comm, ncclMoeHandle_t handle, const ncclMoeCombineArgs_t* args,
                            cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------ */
/* Low-latency dispatch and combine (decode)                                                         */
/* ------------------------------------------------------------------------------------------------ */
/* The communicator holds two low-latency buffers and alternates between them on every LL dispatch, so
 * at most two low-latency results (dispatch outputs awaiting their combine) may be alive at once. A third
 * dispatch reuses the first one's buffer. HT and LL calls may alternate when the config sizes both. */

typedef struct {
  size_t size;
  unsigned int version;
  const void* x;        /* [T, H] bf16; device */
  const void* topk_idx; /* [T, K] int64 or int32, -1 = unused; device */
  ncclMoeIndexType_t topk_idx_type;
  int num_tokens;                    /* T, 0..ll_max_tokens_per_rank */
  int hidden;                        /* H, H % 128 == 0 */
  int topk;                          /* K */
  int use_fp8;                       /* 0: recv_x bf16; 1: cast to fp8 e4m3 in the kernel */
  ncclMoeScaleFormat_t scale_format; /* with use_fp8: float, float rounded to powers of two, or ue8m0 */
  void* recv_x;                      /* out: [E_l, R * ll_max_tokens_per_rank, H] bf16 or fp8 */
  void* recv_x_scales;               /* out (fp8): float [E_l, R*max, H/128] or int32 [E_l, R*max, H/512] */
  int* recv_count;                   /* out: [E_l] int32 rows received per local expert; device */
  int* cumulative_recv_stats;        /* optional in/out: [E_l] int32, recv counts added to it */
  ncclMoePhase_t phase;              /* both, or send then (later) recv */
  const float* topk_weights;         /* optional (send half): [T, K] float32, device. Carried with the tokens so the
                                      * matching LL combine may pass topk_weights = NULL and skip its weight exchange */
} ncclMoeLLDispatchArgs_t;

#define NCCL_MOE_LL_DISPATCH_ARGS_INITIALIZER                                                          \
  {                                                                                                    \
    sizeof(ncclMoeLLDispatchArgs_t), NCCL_MOE_VERSION_CODE, NULL, NULL, ncclMoeIndexInt64, 0, 0, 0, 0, \
        ncclMoeScaleFloat, NULL, NULL, NULL, NULL, ncclMoePhaseBoth, NULL                              \
  }

ncclResult_t ncclMoeLowLatencyDispatch(ncclMoeComm_t comm, ncclMoeHandle_t handle, const ncclMoeLLDispatchArgs_t* args,
                                       cudaStream_t stream);

typedef struct {
  size_t size;
  unsigned int version;
  const void* x;             /* [E_l, R*max, H] bf16 in dispatch's layout, or NULL with zero_copy */
  int zero_copy;             /* 1: the expert outputs were written into ncclMoeLowLatencyCombineBuffer() */
  const void* topk_idx;      /* [T, K] as given to the dispatch */
  const float* topk_weights; /* [T, K] float32; NULL = use the weights the dispatch carried (send half) */
  int num_tokens;            /* T, as in the dispatch */
  int hidden;
  int topk;
  void* out; /* out: [T, H] bf16, out[t] = sum over expert ranks d ascending of
                bf16(fmaf chain over d's valid slots k ascending of w[t,k] * y(t,k)), in FP32
                (docs/reference.md: bitwise-reproducible order) */
  ncclMoePhase_t phase;
} ncclMoeLLCombineArgs_t;

#define NCCL_MOE_LL_COMBINE_ARGS_INITIALIZER \
  { sizeof(ncclMoeLLCombineArgs_t), NCCL_MOE_VERSION_CODE, NULL, 0, NULL, NULL, 0, 0, 0, NULL, ncclMoePhaseBoth }

ncclResult_t ncclMoeLowLatencyCombine(ncclMoeComm_t comm, ncclMoeHandle_t handle, const ncclMoeLLCombineArgs_t* args,
                                      cudaStream_t stream);

/* Library-owned [E_l, R*max, H] bf16 region the expert GEMM may write into for a zero-copy combine of the
 * dispatch recorded in `handle`. Valid until the next-but-one LL dispatch. */
ncclResult_t ncclMoeLowLatencyCombineBuffer(ncclMoeComm_t comm, ncclMoeHandle_t handle, void** buffer);

/* Device array owned by the handle: the source of every row the LL dispatch recorded in `handle` received,
 * [E_l, R * ll_max_tokens_per_rank] int32, row j of local expert e at e * R * ll_max_tokens_per_rank + j, as
 * (source rank << 24 | source token) for j < recv_count[e] (unspecified beyond). Written by the dispatch's receive
 * half (stream-ordered); valid until the next LL dispatch with this handle. */
ncclResult_t ncclMoeLowLatencyRecvSrcInfo(ncclMoeComm_t comm, ncclMoeHandle_t handle, const int** recv_src_info);

/* Explicitly reset the low-latency region (needed when switching a shared buffer from HT back to LL). Collective,
 * stream-ordered, with no LL result alive. With rank masks it is collective over the ranks this rank's mask holds
 * active (read on the device when the reset runs). */
ncclResult_t ncclMoeLowLatencyReset(ncclMoeComm_t comm, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------ */
/* Rank masks (config.enable_rank_masks = 1): low-latency calls that keep serving without a lost rank */
/* ------------------------------------------------------------------------------------------------ */
/* Every rank keeps a device-resident mask of the communicator's ranks (0 = active, 1 = masked), all 0 at init. It is
 * this rank's view: ranks do not exchange it.
 *   - An LL wait (dispatch or combine, send or receive half) that times out (NCCL_MOE_TIMEOUT_S) on a peer masks that
 *     peer in this rank's mask and the call goes on without it; no error is recorded. A wait on a peer that another
 *     block of the rank masked meanwhile stops at once. A timeout on the rank itself (a block of its own) still
 *     fails the communicator, and so do all other device errors.
 *   - LL calls skip the ranks masked when they start (and those masked during the call, from then on): nothing is
 *     sent to them or awaited from them. A masked rank's experts receive nothing (recv_count counts no row from or
 *     for it); its combine contribution is absent: out[t] sums the partials of the active expert ranks only
 *     (docs/reference.md). The results of the call during which a peer becomes masked are those of the reference
 *     without that peer only if the peer sent nothing of that call; from the next call on they are.
 *   - The mask after a call, read stream-ordered with ncclMoeQueryRankMask, says which ranks that call (and the
 *     next) left out: the per-call output of the masks.
 *   - A masked rank's own LL calls, if it still makes any, wait for ranks that no longer send to it, time out and
 *     mask them in turn; its results are undefined until it rejoins. Its late writes land only in the parts of the
 *     active ranks' buffers indexed by the masked rank, which they do not read until a set/clear unmasks it.
 *   - Views can disagree when a peer is slow rather than gone (one rank masks it, another sees it in time). Query
 *     the masks and agree on one with ncclMoeSetRankMask.
 *   - High-throughput calls ignore the mask: every rank must take part, and a HT timeout fails the communicator as
 *     without masks (every rank returns an error naming the phase and the peer it waited for).
 * Set and clear are collective (over the ranks the new mask holds active), stream-ordered and reset the LL state of
 * the participants (as ncclMoeLowLatencyReset: epochs restart, the next LL dispatch uses half 0, no LL result may be
 * alive): this is how a rank rejoins. A wait timing out inside set/clear fails the communicator. */

/* Copies this rank's mask: mask[r] = 1 when rank r is masked, 0 when active, r < R.
 *   comm:           a communicator created with config.enable_rank_masks = 1 (ncclInvalidUsage otherwise)
 *   mask:           out: [R] int32; device memory when mask_on_device = 1 (caller-owned, written stream-ordered on
 *                   `stream`, CUDA-graph capturable), host memory when 0 (the call then waits for `stream`'s earlier
 *                   work: one documented host synchronisation)
 *   mask_on_device: 1 (device) or 0 (host)
 *   stream:         the stream the LL calls were enqueued on (the mask is read after them) */
ncclResult_t ncclMoeQueryRankMask(ncclMoeComm_t comm, int* mask, int mask_on_device, cudaStream_t stream);

/* Collective over the ranks with mask[r] == 0: sets every participant's mask to `mask` and resets the LL state of the
 * participants (see above). Ranks masked in `mask` do not call it (they may be gone). Every participant passes the
 * same mask (not checked).
 *   comm:   a communicator created with config.enable_rank_masks = 1 and LL capacity (ncclInvalidUsage otherwise)
 *   mask:   [R] int32 host memory, each 0 (active) or 1 (masked); mask[this rank] must be 0
 *   stream: stream the reset and the new mask are enqueued on; later LL calls must be ordered after it */
ncclResult_t ncclMoeSetRankMask(ncclMoeComm_t comm, const int* mask, cudaStream_t stream);

/* ncclMoeSetRankMask with every rank active: collective over ALL ranks, masked ones included (this is how they
 * rejoin: the LL state of every rank is reset, so a rank that stopped calling resynchronises).
 *   comm:   as for ncclMoeSetRankMask
 *   stream: as for ncclMoeSetRankMask */
ncclResult_t ncclMoeClearRankMask(ncclMoeComm_t comm, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------ */
/* Helpers                                                                                           */
/* ------------------------------------------------------------------------------------------------ */

/* Cast bf16 [T, H] to fp8 e4m3 with one scale per 128 channels (amax/448; ue8m0 rounds the scale up to
 * a power of two and packs exponent bytes four per int32). Local, stream-ordered. */
ncclResult_t ncclMoeCastToFp8(const void* x, int num_tokens, int hidden, ncclMoeScaleFormat_t scale_format,
                              void* out_fp8, void* out_scales, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* NCCL_MOE_H_ */
