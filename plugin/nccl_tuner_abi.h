// The part of NCCL's tuner-plugin ABI that libnccl-tuner-moe.so implements, declared here because NCCL does
// not install these headers. Written from the layouts in NCCL's sources (src/include/nccl_common.h and
// src/include/plugin/tuner/tuner_v5.h, tuner_v6.h at tags v2.28.3-1 ... v2.30.7-1): member order, types and
// enumerator values must stay identical to NCCL's, nothing else is shared with it.
//
//   ncclTunerPlugin_v5  loaded by NCCL 2.28, 2.29 (and by 2.30+ when v6 is missing)
//   ncclTunerPlugin_v6  loaded by NCCL >= 2.30 (same as v5 plus getChunkSize; NULL allowed there, but we fill it)
//
// NCCL looks the tables up by name with dlsym and calls through them: every pointer must be non-NULL, and
// an error returned from init or getCollInfo fails the user's communicator or collective.
#pragma once

#include <nccl.h>  // ncclResult_t
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---- nccl_common.h --------------------------------------------------------------------------------------
typedef enum {
  NCCL_LOG_NONE = 0,
  NCCL_LOG_VERSION = 1,
  NCCL_LOG_WARN = 2,
  NCCL_LOG_INFO = 3,
  NCCL_LOG_ABORT = 4,
  NCCL_LOG_TRACE = 5
} ncclDebugLogLevel;

// Subsystem bits of the logger's `flags` (matched against NCCL_DEBUG_SUBSYS).
enum { NCCL_INIT = 0x1, NCCL_COLL = 0x2, NCCL_ENV = 0x80, NCCL_TUNING = 0x40 };

typedef void (*ncclDebugLogger_t)(ncclDebugLogLevel level, unsigned long flags, const char* file, int line,
                                  const char* fmt, ...);

// Values 0..10 are identical in 2.28 and 2.30 (2.30 appended more). The tuner only sees 0..4.
typedef enum {
  ncclFuncBroadcast = 0,
  ncclFuncReduce = 1,
  ncclFuncAllGather = 2,
  ncclFuncReduceScatter = 3,
  ncclFuncAllReduce = 4,
  ncclFuncSendRecv = 5,
  ncclFuncSend = 6,
  ncclFuncRecv = 7,
  ncclFuncAlltoAll = 8,
  ncclFuncScatter = 9,
  ncclFuncGather = 10
} ncclFunc_t;

// Rows and columns of the cost table getCollInfo receives (float[numAlgo][numProto], passed as float**).
#define NCCL_MOE_ABI_ALGO_TREE 0
#define NCCL_MOE_ABI_ALGO_RING 1
#define NCCL_MOE_ABI_ALGO_COLLNET_DIRECT 2
#define NCCL_MOE_ABI_ALGO_COLLNET_CHAIN 3
#define NCCL_MOE_ABI_ALGO_NVLS 4
#define NCCL_MOE_ABI_ALGO_NVLS_TREE 5
#define NCCL_MOE_ABI_ALGO_PAT 6
#define NCCL_MOE_ABI_NUM_ALGORITHMS 7
#define NCCL_MOE_ABI_PROTO_LL 0
#define NCCL_MOE_ABI_PROTO_LL128 1
#define NCCL_MOE_ABI_PROTO_SIMPLE 2
#define NCCL_MOE_ABI_NUM_PROTOCOLS 3
#define NCCL_MOE_ABI_NUM_HW_LINKS 3
#define NCCL_MOE_ABI_NUM_COMPCAPS 4
#define NCCL_MOE_ABI_NUM_TUNING_SCALES 3
// Entries NCCL excludes carry this cost.
#define NCCL_MOE_ABI_ALGO_PROTO_IGNORE (-1.0f)

// ---- tuner v5 (v6 reuses both structs) ------------------------------------------------------------------
typedef struct {
  int nNvlDomains;
  int minRanksPerNvlDomain;
  int maxRanksPerNvlDomain;
} ncclNvlDomainInfo_v5_t;

typedef struct {
  double baseLatencies[NCCL_MOE_ABI_NUM_ALGORITHMS][NCCL_MOE_ABI_NUM_PROTOCOLS];
  double hwLatencies[NCCL_MOE_ABI_NUM_HW_LINKS][NCCL_MOE_ABI_NUM_ALGORITHMS][NCCL_MOE_ABI_NUM_PROTOCOLS];
  double llMaxBws[NCCL_MOE_ABI_NUM_COMPCAPS][NCCL_MOE_ABI_NUM_TUNING_SCALES];
  double perChMaxRingLL128Bws[NCCL_MOE_ABI_NUM_COMPCAPS][NCCL_MOE_ABI_NUM_TUNING_SCALES];
  double perChMaxTreeLL128Bws[NCCL_MOE_ABI_NUM_COMPCAPS][NCCL_MOE_ABI_NUM_TUNING_SCALES];
  double perChMaxTreeBws[NCCL_MOE_ABI_NUM_COMPCAPS][NCCL_MOE_ABI_NUM_TUNING_SCALES];
  double perChMaxNVLSTreeBws[NCCL_MOE_ABI_NUM_COMPCAPS][NCCL_MOE_ABI_NUM_TUNING_SCALES];
} ncclTunerConstants_v5_t;

typedef ncclNvlDomainInfo_v5_t ncclNvlDomainInfo_v6_t;
typedef ncclTunerConstants_v5_t ncclTunerConstants_v6_t;

typedef struct {
  const char* name;
  // Once per communicator, late in its init, with the communicator's CUDA device current. commId is the
  // communicator hash (equal on all its ranks).
  ncclResult_t (*init)(void** context, uint64_t commId, size_t nRanks, size_t nNodes, ncclDebugLogger_t logFunction,
                       ncclNvlDomainInfo_v5_t* nvlDomainInfo, ncclTunerConstants_v5_t* constants);
  // Per collective on the enqueue path. nChannels arrives as 0 (= NCCL decides); a non-zero value replaces
  // the count NCCL's own heuristic would have picked.
  ncclResult_t (*getCollInfo)(void* context, ncclFunc_t collType, size_t nBytes, int numPipeOps, float** collCostTable,
                              int numAlgo, int numProto, int regBuff, int* nChannels);
  ncclResult_t (*finalize)(void* context);
} ncclTuner_v5_t;

typedef struct {
  const char* name;
  ncclResult_t (*init)(void** context, uint64_t commId, size_t nRanks, size_t nNodes, ncclDebugLogger_t logFunction,
                       ncclNvlDomainInfo_v6_t* nvlDomainInfo, ncclTunerConstants_v6_t* constants);
  ncclResult_t (*getCollInfo)(void* context, ncclFunc_t collType, size_t nBytes, int numPipeOps, float** collCostTable,
                              int numAlgo, int numProto, int regBuff, int* nChannels);
  ncclResult_t (*finalize)(void* context);
  // After algorithm, protocol and channel count are fixed; *chunkSize may be changed (NCCL clamps it).
  ncclResult_t (*getChunkSize)(void* context, ncclFunc_t collType, size_t nBytes, int algo, int proto, int nChannels,
                               size_t* chunkSize);
} ncclTuner_v6_t;

#ifdef __cplusplus
}  // extern "C"
#endif
