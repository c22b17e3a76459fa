// The host object behind ncclMoeHandle_t: routing of one dispatch (HT or LL), reused by combine.
#pragma once

#include "core/routing.h"

struct ncclMoeComm;

struct ncclMoeHandle {
  ncclMoeComm* comm = nullptr;
  nccl_moe::HtRouting ht;  // valid after ncclMoeDispatchNotify
  nccl_moe::LlRouting ll;  // valid after ncclMoeLowLatencyDispatch
};
