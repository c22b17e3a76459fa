#include "transport/rdma/verbs/memory.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"
#include "core/log.h"

namespace nccl_moe::verbs {

const char* registrationPathName(RegistrationPath path) {
  return path == RegistrationPath::kDmaBuf ? "dma-buf" : "peer memory (ibv_reg_mr)";
}

unsigned registrationAccess(uint32_t access, uint32_t flags, bool relaxed_ordering) {
  unsigned a = access & ~static_cast<uint32_t>(IBV_ACCESS_RELAXED_ORDERING);
  if (relaxed_ordering && (flags & rdma::kWindowSignal) == 0) a |= IBV_ACCESS_RELAXED_ORDERING;
  return a;
}

ncclResult_t MemoryRegion::create(Device& device, const RegistrationSpec& spec, std::unique_ptr<MemoryRegion>* out) {
  MOE_ARG_CHECK(out != nullptr && spec.addr != nullptr && spec.bytes != 0,
                "MemoryRegion::create(%s): null address, empty range or no output", spec.what);
  const IbvApi& ibv = device.ibv();
  const unsigned access = registrationAccess(spec.access, spec.flags, spec.relaxed_ordering);
  std::unique_ptr<MemoryRegion> m(new MemoryRegion(device));

  std::string dmabuf_why;
  if (spec.force_peer_memory) {
    dmabuf_why = "skipped (peer memory forced)";
  } else if (ibv.reg_dmabuf_mr == nullptr) {
    dmabuf_why = "libibverbs has no ibv_reg_dmabuf_mr (rdma-core 34 or newer)";
  } else if (device.cuda().dmabuf_fd == nullptr) {
    dmabuf_why = "no dma-buf exporter";
  } else {
    const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
    const uint64_t addr = reinterpret_cast<uintptr_t>(spec.addr);
    const uint64_t base = addr / page * page;
    const uint64_t end = (addr + spec.bytes + page - 1) / page * page;
    int fd = -1;
    dmabuf_why = device.cuda().dmabuf_fd(reinterpret_cast<void*>(base), end - base, &fd);
    if (dmabuf_why.empty()) {
      errno = 0;
      m->mr_ = ibv.reg_dmabuf_mr(device.pd(), addr - base, spec.bytes, addr, fd, static_cast<int>(access));
      const int err = errno;
      close(fd);
      if (m->mr_ != nullptr)
        m->path_ = RegistrationPath::kDmaBuf;
      else
        dmabuf_why = std::string("ibv_reg_dmabuf_mr failed: ") + std::strerror(err != 0 ? err : EINVAL);
    }
  }
  if (m->mr_ == nullptr) {
    MOE_INFO("verbs: %s on %s: dma-buf registration not used (%s); trying ibv_reg_mr (needs nvidia-peermem)", spec.what,
             device.where().c_str(), dmabuf_why.c_str());
    errno = 0;
    m->mr_ = ibv.regMr(device.pd(), spec.addr, spec.bytes, access);
    if (m->mr_ == nullptr)
      return verbsFailure(
          (access & IBV_ACCESS_OPTIONAL_RANGE) != 0 ? "ibv_reg_mr_iova2" : "ibv_reg_mr", device.where(), errno,
          std::string(" registering ") + spec.what + " [" + std::to_string(spec.bytes) +
              " bytes]; dma-buf: " + dmabuf_why + " (GPU memory needs dma-buf or the nvidia-peermem module)");
    m->path_ = RegistrationPath::kPeerMemory;
  }
  device.retain();
  m->window_.addr = reinterpret_cast<uintptr_t>(spec.addr);
  m->window_.bytes = spec.bytes;
  m->window_.lkey = m->mr_->lkey;
  m->window_.rkey = m->mr_->rkey;
  m->window_.access = access;
  m->window_.flags = spec.flags;
  MOE_INFO("verbs: %s on %s registered through %s: [%p, +%llu) lkey 0x%x rkey 0x%x access 0x%x%s", spec.what,
           device.where().c_str(), registrationPathName(m->path_), spec.addr,
           static_cast<unsigned long long>(spec.bytes), m->window_.lkey, m->window_.rkey, access,
           (access & IBV_ACCESS_RELAXED_ORDERING) != 0 ? " (relaxed ordering)" : " (strongly ordered)");
  *out = std::move(m);
  return ncclSuccess;
}

MemoryRegion::~MemoryRegion() {
  if (mr_ == nullptr) return;
  const int rc = device_.ibv().dereg_mr(mr_);
  if (rc != 0)
    MOE_WARN("ibv_dereg_mr failed on %s (rkey 0x%x): %s", device_.where().c_str(), window_.rkey,
             std::strerror(rc > 0 ? rc : errno));
  device_.release();
}

}  // namespace nccl_moe::verbs
