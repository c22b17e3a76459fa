#include "core/env.h"

#include <cstdlib>
#include <cstring>

#include "core/log.h"

namespace nccl_moe {

const std::vector<EnvVar>& envRegistry() {
  static const std::vector<EnvVar> registry = {
      {"NCCL_MOE_DEBUG", EnvType::kString, "WARN",
       "Log level: NONE, WARN, INFO or TRACE. Lines use NCCL's format; through NCCL's logger when the tuner "
       "plugin is loaded."},
      {"NCCL_MOE_DEBUG_FILE", EnvType::kString, "",
       "Write NCCL-MoE's log lines to this file instead of stderr (%h = hostname, %p = pid)."},
      {"NCCL_MOE_TIMEOUT_S", EnvType::kInt, "100",
       "Bound of every device and host wait, in seconds. On expiry the call (or the next) returns an error "
       "naming phase, rank, peer and counter."},
      {"NCCL_MOE_NUM_SMS", EnvType::kInt, "0",
       "Default SM budget of high-throughput kernels when the config and the call pass 0 (0 = automatic)."},
      {"NCCL_MOE_LL_SPLIT_LAUNCH", EnvType::kInt, "0",
       "1: an LL call with both phases runs as a send kernel then a receive kernel, so that no block waits for "
       "another block of its own grid (always so when ranks share a GPU or config.ll_num_sms leaves SMs free)."},
      {"NCCL_MOE_SM_RESERVE", EnvType::kInt, "0",
       "SMs the tuner plugin keeps free of NCCL's collectives for NCCL-MoE kernels running alongside."},
      {"NCCL_MOE_HT_KERNEL", EnvType::kString, "fast",
       "High-throughput dispatch/combine kernels: fast (dispatch.cu, combine.cu) or educational (educational.cu, "
       "the plain one-role version; same results, slower). Read on every call."},
      {"NCCL_MOE_HOSTID", EnvType::kString, "",
       "Host identity of this process for NCCL-MoE's node map (ranks with one identity form a node). Empty: "
       "NCCL_HOSTID if set, else the host name and boot id."},
      {"NCCL_MOE_EMULATE_NODES", EnvType::kInt, "0",
       "Split a communicator whose ranks are threads of one process into this many nodes of consecutive ranks "
       "(the rank count must be a multiple); 0 = nodes from the host identity. Refused when the ranks live in "
       "several processes (use NCCL_HOSTID per process there)."},
      {"NCCL_MOE_IB_SL", EnvType::kInt, "",
       "InfiniBand service level (0..15) of the scale-out QPs. Unset: NCCL_IB_SL, else 0."},
      {"NCCL_MOE_IB_TC", EnvType::kInt, "",
       "Traffic class (0..255) of the scale-out QPs (GRH: RoCE, IB across subnets). Unset: NCCL_IB_TC, else 0."},
      {"NCCL_MOE_IB_LL_SL", EnvType::kInt, "",
       "Service level (0..15) of the low-latency kernels' QPs. Unset: the value of NCCL_MOE_IB_SL."},
      {"NCCL_MOE_IB_LL_TC", EnvType::kInt, "",
       "Traffic class (0..255) of the low-latency kernels' QPs. Unset: the value of NCCL_MOE_IB_TC."},
      {"NCCL_MOE_IB_HCA", EnvType::kString, "",
       "The verbs device (and port) of this rank's scale-out QPs: mlx5_0 or mlx5_0:1 (NCCL_IB_HCA's syntax without "
       "lists or exclusions). Unset: the NIC nearest the GPU, else the first device."},
      {"NCCL_MOE_IB_GID_INDEX", EnvType::kInt, "",
       "GID index of the scale-out QPs (RoCE, IB with a GRH). Unset: NCCL_IB_GID_INDEX, else (or -1) InfiniBand 0, "
       "RoCE the first RoCE v2 IPv4 GID."},
      {"NCCL_MOE_NET", EnvType::kString, "auto",
       "Scale-out network of communicators that span several nodes: auto or ib (a verbs NIC through rdma-core, "
       "loaded at run time: written and tested against fake verbs tables only, never run on a NIC; refused with a "
       "message where no library or mlx5 device is found), emulated (the software NIC: correctness only, for ranks "
       "on one GPU, split by NCCL_MOE_EMULATE_NODES or NCCL_HOSTID per process). Read at init; every rank must "
       "agree."},
      {"NCCL_MOE_NET_MODE", EnvType::kString, "ibgda",
       "How the GPU drives the scale-out QPs: ibgda (the GPU writes work requests and rings the doorbell), dbproxy "
       "(the GPU writes work requests, a CPU thread of the rank rings the doorbell: where the doorbell page cannot be "
       "mapped to the GPU) or proxy (the GPU writes descriptors into a mapped ring and a CPU thread of the rank posts "
       "the work requests). Unset: ibgda, falling back to dbproxy on every rank when a rank cannot map its doorbell "
       "page (verbs backend). Read at init; every rank must agree."},
      {"NCCL_MOE_NET_PURE_RDMA", EnvType::kInt, "0",
       "1: on a communicator of several nodes, the internode low-latency kernels reach the ranks of their own node "
       "through the NIC too (a QP to every other rank), as DeepEP's pure-RDMA mode does; 0: through NVLink. The "
       "high-throughput kernels forward over NVLink either way. Read at init; every rank must agree."},
      {"NCCL_MOE_EMU_CHAOS", EnvType::kInt, "0",
       "Seed of the software NIC's chaos mode (random WRITE chunking and placement order, late source reads, "
       "QP interleaving, delays); 0 = off. Failure messages name the seed."},
  };
  return registry;
}

static const EnvVar* findVar(const char* name) {
  for (const EnvVar& v : envRegistry())
    if (std::strcmp(v.name, name) == 0) return &v;
  return nullptr;
}

std::string envString(const char* name) {
  const EnvVar* var = findVar(name);
  if (var == nullptr) return std::string();
  const char* value = std::getenv(name);
  return value != nullptr ? std::string(value) : std::string(var->default_value);
}

int64_t envInt(const char* name) {
  const EnvVar* var = findVar(name);
  if (var == nullptr) return 0;
  const int64_t fallback = std::strtoll(var->default_value, nullptr, 10);
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  if (end == value || *end != '\0') {
    MOE_WARN("%s=\"%s\" is not an integer; using the default %lld", name, value, static_cast<long long>(fallback));
    return fallback;
  }
  return parsed;
}

}  // namespace nccl_moe
