// Fake verbs, mlx5 direct verbs and CUDA operations for the verbs backend's unit tests
// (tests/unit/verbs_backend_test.cc: the host layer; tests/unit/verbs_comm_test.cc: whole worlds of fake devices).
// The doubles are C-style functions the IbvApi / Mlx5Api / CudaOps tables point at (installFakes); they act on the
// calling thread's Fake (g, thread_local), so each rank thread of an in-process world has its own NIC: they record
// calls, hand out fake objects (counted, so a test can check nothing outlives its owner), and fail the call named
// in g->fail with g->fail_errno. Nothing here touches a NIC or a GPU.
#pragma once

#include <endian.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <infiniband/mlx5dv.h>
#include <infiniband/verbs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "transport/rdma/verbs/gpu_mapping.h"
#include "transport/rdma/verbs/loader.h"
#include "transport/rdma/verbs/qp_attr.h"

namespace nccl_moe::verbs::fake {

inline constexpr uintptr_t kDevOffset = 0x100000000000ull;  // fake device address = host address + this

// ---- the fake world: one instance per test, reached from the C-style doubles through g ----

struct Page {
  void* p;
  explicit Page(size_t bytes) : p(std::aligned_alloc(4096, bytes)) { std::memset(p, 0, bytes); }
  ~Page() { std::free(p); }
};

struct Fake {
  std::vector<std::string> calls;
  std::string fail;  // the call (as recorded) that fails
  int fail_errno = EPERM;
  // devices
  std::vector<std::string> names = {"mlx5_0", "mlx5_1"};
  std::vector<ibv_device> devices;
  std::vector<ibv_device*> list;
  bool mlx5 = true;
  ibv_device_attr device_attr{};
  std::vector<ibv_port_attr> ports;
  std::vector<ibv_gid> gids;
  // live objects
  int contexts = 0, pds = 0, mrs = 0, cqs = 0, qps = 0;
  uint32_t next_key = 0x100, next_qpn = 0x1200;
  struct Reg {
    std::string call;
    void* addr;
    uint64_t offset;
    size_t length;
    uint64_t iova;
    int fd;
    unsigned access;
  };
  std::vector<Reg> regs;
  std::vector<ibv_qp_init_attr> qp_inits;
  int cqe_asked = 0;
  struct Mod {
    ibv_qp_attr attr;
    int mask;
    uint32_t qpn = 0;  // the QP modified
  };
  std::vector<Mod> mods;
  // what mlx5dv_init_obj reports; the dbrec page and the UAR page are shared by every QP, as libmlx5 does
  uint32_t wqe_cnt = 128, stride = 64, cqe_cnt = 256, cqe_size = 64;
  bool corrupt_cqe = false;
  Page dbrec_page{4096}, uar_page{4096};
  std::vector<std::unique_ptr<Page>> buffers;
  int dbrecs_used = 0;
  // CUDA
  std::map<uintptr_t, std::pair<size_t, unsigned>> host_regs;
  std::string dmabuf_fail;
  std::vector<int> dmabuf_fds;
  std::map<void*, size_t> device_allocs;  // fake device memory: host memory
};
inline thread_local Fake* g = nullptr;  // each rank thread of a fake world has its own

inline bool failing(const std::string& call) {
  g->calls.push_back(call);
  if (g->fail != call) return false;
  errno = g->fail_errno;
  return true;
}

inline ibv_device** fGetDeviceList(int* n) {
  if (failing("ibv_get_device_list")) return nullptr;
  g->devices.assign(g->names.size(), ibv_device{});
  g->list.clear();
  for (size_t i = 0; i < g->names.size(); ++i) {
    std::strncpy(g->devices[i].name, g->names[i].c_str(), sizeof(g->devices[i].name) - 1);
    g->list.push_back(&g->devices[i]);
  }
  g->list.push_back(nullptr);
  *n = static_cast<int>(g->names.size());
  return g->list.data();
}
inline void fFreeDeviceList(ibv_device** list) { g->calls.push_back("ibv_free_device_list"); }
inline const char* fGetDeviceName(ibv_device* d) { return d->name; }
inline ibv_context* fOpenDevice(ibv_device* d) {
  if (failing("ibv_open_device")) return nullptr;
  auto* c = new ibv_context{};
  c->device = d;
  ++g->contexts;
  return c;
}
inline int fCloseDevice(ibv_context* c) {
  g->calls.push_back("ibv_close_device");
  delete c;
  --g->contexts;
  return 0;
}
inline int fQueryDevice(ibv_context*, ibv_device_attr* a) {
  if (failing("ibv_query_device")) return g->fail_errno;
  *a = g->device_attr;
  return 0;
}
inline int fQueryPort(ibv_context*, uint8_t port, _compat_ibv_port_attr* a) {
  if (failing("ibv_query_port")) return g->fail_errno;
  *reinterpret_cast<ibv_port_attr*>(a) = g->ports.at(port - 1u);  // queryPort() passes a whole ibv_port_attr
  return 0;
}
inline int fQueryGid(ibv_context*, uint8_t, int index, ibv_gid* gid) {
  if (failing("ibv_query_gid")) return g->fail_errno;
  *gid = g->gids.at(static_cast<size_t>(index));
  return 0;
}
inline ibv_pd* fAllocPd(ibv_context* c) {
  if (failing("ibv_alloc_pd")) return nullptr;
  auto* pd = new ibv_pd{};
  pd->context = c;
  ++g->pds;
  return pd;
}
inline int fDeallocPd(ibv_pd* pd) {
  g->calls.push_back("ibv_dealloc_pd");
  delete pd;
  --g->pds;
  return 0;
}
inline ibv_mr* newMr(ibv_pd* pd, void* addr, size_t length) {
  auto* mr = new ibv_mr{};
  mr->pd = pd;
  mr->addr = addr;
  mr->length = length;
  mr->lkey = g->next_key++;
  mr->rkey = g->next_key++;
  ++g->mrs;
  return mr;
}
inline ibv_mr* fRegMr(ibv_pd* pd, void* addr, size_t length, int access) {
  if (failing("ibv_reg_mr")) return nullptr;
  g->regs.push_back({"ibv_reg_mr", addr, 0, length, reinterpret_cast<uintptr_t>(addr), -1, unsigned(access)});
  return newMr(pd, addr, length);
}
inline ibv_mr* fRegMrIova2(ibv_pd* pd, void* addr, size_t length, uint64_t iova, unsigned access) {
  if (failing("ibv_reg_mr_iova2")) return nullptr;
  g->regs.push_back({"ibv_reg_mr_iova2", addr, 0, length, iova, -1, access});
  return newMr(pd, addr, length);
}
inline ibv_mr* fRegDmabufMr(ibv_pd* pd, uint64_t offset, size_t length, uint64_t iova, int fd, int access) {
  if (failing("ibv_reg_dmabuf_mr")) return nullptr;
  g->regs.push_back({"ibv_reg_dmabuf_mr", nullptr, offset, length, iova, fd, unsigned(access)});
  return newMr(pd, reinterpret_cast<void*>(iova), length);
}
inline int fDeregMr(ibv_mr* mr) {
  g->calls.push_back("ibv_dereg_mr");
  delete mr;
  --g->mrs;
  return 0;
}
inline ibv_cq* fCreateCq(ibv_context* c, int cqe, void*, ibv_comp_channel*, int) {
  if (failing("ibv_create_cq")) return nullptr;
  g->cqe_asked = cqe;
  auto* cq = new ibv_cq{};
  cq->context = c;
  cq->cqe = cqe;
  ++g->cqs;
  return cq;
}
inline int fDestroyCq(ibv_cq* cq) {
  g->calls.push_back("ibv_destroy_cq");
  delete cq;
  --g->cqs;
  return 0;
}
inline ibv_qp* fCreateQp(ibv_pd* pd, ibv_qp_init_attr* init) {
  if (failing("ibv_create_qp")) return nullptr;
  g->qp_inits.push_back(*init);
  auto* qp = new ibv_qp{};
  qp->pd = pd;
  qp->qp_num = g->next_qpn++;
  qp->qp_type = init->qp_type;
  ++g->qps;
  return qp;
}
inline int fModifyQp(ibv_qp* qp, ibv_qp_attr* attr, int mask) {
  if (failing(std::string("ibv_modify_qp ") + qpStateName(attr->qp_state))) return g->fail_errno;
  g->mods.push_back({*attr, mask, qp->qp_num});
  qp->state = attr->qp_state;
  return 0;
}
inline int fDestroyQp(ibv_qp* qp) {
  g->calls.push_back("ibv_destroy_qp");
  delete qp;
  --g->qps;
  return 0;
}
inline bool fIsSupported(ibv_device*) {
  g->calls.push_back("mlx5dv_is_supported");
  return g->mlx5;
}
inline int fInitObj(mlx5dv_obj* obj, uint64_t type) {
  if (failing("mlx5dv_init_obj")) return g->fail_errno;
  EXPECT_EQ(uint64_t{MLX5DV_OBJ_QP | MLX5DV_OBJ_CQ}, type);
  // Like libmlx5: a page-aligned buffer per QP and per CQ, doorbell records packed into one page, one UAR page.
  g->buffers.emplace_back(new Page(size_t{g->wqe_cnt} * g->stride));
  obj->qp.out->sq.buf = g->buffers.back()->p;
  obj->qp.out->sq.wqe_cnt = g->wqe_cnt;
  obj->qp.out->sq.stride = g->stride;
  obj->qp.out->dbrec = reinterpret_cast<__be32*>(static_cast<uint8_t*>(g->dbrec_page.p) + 64 * g->dbrecs_used++);
  obj->qp.out->bf.reg = static_cast<uint8_t*>(g->uar_page.p) + 0x800;
  obj->qp.out->bf.size = 256;
  g->buffers.emplace_back(new Page(size_t{g->cqe_cnt} * g->cqe_size));
  auto* cqes = static_cast<uint8_t*>(g->buffers.back()->p);
  for (uint32_t i = 0; i < g->cqe_cnt; ++i) cqes[size_t{i} * g->cqe_size + g->cqe_size - 1] = 0xf0;  // INVALID << 4
  if (g->corrupt_cqe) cqes[3 * g->cqe_size + g->cqe_size - 1] = 0x00;
  obj->cq.out->buf = cqes;
  obj->cq.out->cqe_cnt = g->cqe_cnt;
  obj->cq.out->cqe_size = g->cqe_size;
  obj->cq.out->dbrec = reinterpret_cast<__be32*>(static_cast<uint8_t*>(g->dbrec_page.p) + 64 * g->dbrecs_used++);
  obj->cq.out->cqn = 7;
  return 0;
}

inline cudaError_t fHostRegister(void* p, size_t bytes, unsigned flags) {
  if (failing((flags & cudaHostRegisterIoMemory) != 0 ? "cudaHostRegister io" : "cudaHostRegister"))
    return cudaErrorNotSupported;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (const auto& r : g->host_regs)  // CUDA refuses overlapping registrations
    if (a < r.first + r.second.first && r.first < a + bytes) return cudaErrorHostMemoryAlreadyRegistered;
  g->host_regs[a] = {bytes, flags};
  return cudaSuccess;
}
inline cudaError_t fHostUnregister(void* p) {
  g->calls.push_back("cudaHostUnregister");
  return g->host_regs.erase(reinterpret_cast<uintptr_t>(p)) == 1 ? cudaSuccess : cudaErrorHostMemoryNotRegistered;
}
inline cudaError_t fHostGetDevicePointer(void** dev, void* host, unsigned) {
  *dev = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(host) + kDevOffset);
  return cudaSuccess;
}
inline const char* fErrorString(cudaError_t e) {
  return e == cudaErrorNotSupported ? "operation not supported" : "error";
}
inline std::string fDmabufFd(void* base, size_t bytes, int* fd) {
  g->calls.push_back("dmabuf_fd");
  EXPECT_EQ(0u, reinterpret_cast<uintptr_t>(base) % 4096);
  EXPECT_EQ(0u, bytes % 4096);
  if (!g->dmabuf_fail.empty()) return g->dmabuf_fail;
  *fd = open("/dev/null", O_RDONLY);
  g->dmabuf_fds.push_back(*fd);
  return "";
}

inline ibv_port_attr activePort(uint8_t link_layer, uint16_t lid, int gid_tbl_len) {
  ibv_port_attr p{};
  p.state = IBV_PORT_ACTIVE;
  p.link_layer = link_layer;
  p.lid = lid;
  p.active_mtu = IBV_MTU_4096;
  p.gid_tbl_len = gid_tbl_len;
  return p;
}

inline ibv_gid ipv4Gid(uint8_t last) {
  ibv_gid gid{};
  gid.raw[10] = gid.raw[11] = 0xff;
  gid.raw[12] = 10;
  gid.raw[15] = last;
  return gid;
}
inline ibv_gid ipv6Gid() {
  ibv_gid gid{};
  gid.raw[0] = 0xfe;
  gid.raw[1] = 0x80;
  gid.raw[15] = 1;
  return gid;
}

// Fake device memory (CudaOps::device_alloc etc.): page-aligned host memory, counted per fake.
inline cudaError_t fDeviceAlloc(void** p, size_t bytes) {
  if (failing("cudaMalloc")) return cudaErrorMemoryAllocation;
  *p = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
  g->device_allocs[*p] = bytes;
  return cudaSuccess;
}
inline cudaError_t fDeviceFree(void* p) {
  g->calls.push_back("cudaFree");
  if (g->device_allocs.erase(p) != 1) return cudaErrorInvalidValue;
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t fCopyToDevice(void* dst, const void* src, size_t bytes) {
  if (failing("cudaMemcpy")) return cudaErrorInvalidValue;
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t fSetDevice(void* dst, int value, size_t bytes) {
  std::memset(dst, value, bytes);
  return cudaSuccess;
}

// Points the tables at the fakes (which act on the calling thread's g).
inline void installFakes(IbvApi* ibv, Mlx5Api* dv, CudaOps* cuda) {
  ibv->get_device_list = &fGetDeviceList;
  ibv->free_device_list = &fFreeDeviceList;
  ibv->get_device_name = &fGetDeviceName;
  ibv->open_device = &fOpenDevice;
  ibv->close_device = &fCloseDevice;
  ibv->query_device = &fQueryDevice;
  ibv->query_port_compat = &fQueryPort;
  ibv->query_gid = &fQueryGid;
  ibv->alloc_pd = &fAllocPd;
  ibv->dealloc_pd = &fDeallocPd;
  ibv->reg_mr = &fRegMr;
  ibv->reg_mr_iova2 = &fRegMrIova2;
  ibv->reg_dmabuf_mr = &fRegDmabufMr;
  ibv->dereg_mr = &fDeregMr;
  ibv->create_cq = &fCreateCq;
  ibv->destroy_cq = &fDestroyCq;
  ibv->create_qp = &fCreateQp;
  ibv->modify_qp = &fModifyQp;
  ibv->destroy_qp = &fDestroyQp;
  dv->is_supported = &fIsSupported;
  dv->init_obj = &fInitObj;
  cuda->host_register = &fHostRegister;
  cuda->host_unregister = &fHostUnregister;
  cuda->host_get_device_pointer = &fHostGetDevicePointer;
  cuda->error_string = &fErrorString;
  cuda->dmabuf_fd = &fDmabufFd;
  cuda->device_alloc = &fDeviceAlloc;
  cuda->device_free = &fDeviceFree;
  cuda->copy_to_device = &fCopyToDevice;
  cuda->set_device = &fSetDevice;
}

// A fake with an InfiniBand default: 2 devices, port 1 down, port 2 active with LID `lid`, 2 GIDs; atomics.
inline void setInfiniBandDefaults(Fake* f, uint16_t lid = 0x11) {
  f->device_attr.phys_port_cnt = 2;
  f->device_attr.atomic_cap = IBV_ATOMIC_HCA;
  f->device_attr.max_qp_rd_atom = 16;
  f->device_attr.max_qp_init_rd_atom = 8;
  f->device_attr.max_qp_wr = 32768;
  f->device_attr.max_cqe = 4194303;
  f->device_attr.node_guid = htobe64(0x0102030405060708ull);
  ibv_port_attr down{};
  down.state = IBV_PORT_DOWN;
  f->ports = {down, activePort(IBV_LINK_LAYER_INFINIBAND, lid, 2)};
  f->gids = {ipv6Gid(), ibv_gid{}};
}

}  // namespace nccl_moe::verbs::fake
