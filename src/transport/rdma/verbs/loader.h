// rdma-core at run time: libibverbs.so.1 and libmlx5.so.1 are opened with dlopen on first use and their entry points
// bound with dlvsym, the way NCCL does it (src/misc/ibvsymbols.cc), so libnccl_moe.so does not link them: it loads
// and runs intranode on machines without rdma-core, and only a communicator that needs the scale-out transport
// fails, with a message naming the library, the symbol and the rdma-core release that has it.
//
// Contract
//   - THE door to rdma-core. Nothing in src/ calls an ibv_* / mlx5dv_* function itself (tests/unit/
//     verbs_loader_test.cc greps src/ for it); <infiniband/verbs.h> and <infiniband/mlx5dv.h> are included for their
//     types, constants and structs only. The library does not link libibverbs or libmlx5 (the same test reads the
//     NEEDED entries of libnccl_moe.so; the link uses --no-undefined, so a direct call does not even link).
//   - Exported entry points are fields of IbvApi / Mlx5Api, typed from the header's own declarations
//     (decltype) and bound at the symbol version that declaration belongs to (dlvsym), so a newer rdma-core
//     cannot hand us a function with another ABI. The version nodes and the rdma-core release that introduced each
//     (Debian's libibverbs1 / ibverbs-providers symbols files) are in the tables below and in every error message.
//   - verbs.h implements several entry points as static inline functions that reach the provider through the
//     ops tables of the context or the QP: ibv_post_send, ibv_poll_cq, ibv_create_qp_ex, ibv_query_port,
//     ibv_alloc_td, ibv_dealloc_td, ibv_alloc_parent_domain, and the ibv_wr_* family. They are no symbols of
//     libibverbs, and some of them fall back to exported symbols (ibv_query_port -> ibv_query_port@IBVERBS_1.1,
//     ibv_create_qp_ex -> ibv_create_qp), which would bind us at link time. IbvApi's member functions are those
//     dispatchers, written out with the fallbacks going through the table. ibv_wr_* need no wrapper: they are
//     function pointers of struct ibv_qp_ex (from qpToQpEx) that the provider fills; call qpx->wr_start(qpx), ...
//   - Loading happens once per process (std::call_once semantics), on the first call of ibverbs() / mlx5(), from
//     any thread. A failure is remembered: every later call returns the same result and message. Handles are never
//     closed (providers keep state for the process's lifetime; NCCL does not close them either).
//   - Errors: ncclSystemError with the message recorded by setLastError() (src/core/error.h). Nothing aborts.
//
// libibverbs.so.1, required (rdma-core 28 or newer for all of them):
//   ibv_get_device_list, ibv_free_device_list, ibv_get_device_name, ibv_open_device, ibv_close_device,
//   ibv_query_device, ibv_query_port, ibv_query_gid, ibv_alloc_pd, ibv_dealloc_pd, ibv_reg_mr, ibv_dereg_mr,
//   ibv_create_cq, ibv_destroy_cq, ibv_create_qp, ibv_modify_qp, ibv_destroy_qp, ibv_wc_status_str
//                                                                              IBVERBS_1.1   (every rdma-core)
//   ibv_qp_to_qp_ex                                                            IBVERBS_1.6   rdma-core 24
//   ibv_reg_mr_iova2                                                           IBVERBS_1.8   rdma-core 28
// libibverbs.so.1, optional (nullptr when the installed rdma-core predates it; the caller falls back):
//   ibv_reg_dmabuf_mr                                                          IBVERBS_1.12  rdma-core 34
// libmlx5.so.1, required by the mlx5 paths (GPU-initiated verbs, doorbell proxy); the request proxy needs
// libibverbs only:
//   mlx5dv_init_obj                                                            MLX5_1.2      rdma-core 15
//   mlx5dv_create_qp                                                           MLX5_1.3      rdma-core 16
//   mlx5dv_is_supported                                                        MLX5_1.8      rdma-core 22
#pragma once

#include <infiniband/mlx5dv.h>
#include <infiniband/verbs.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>

namespace nccl_moe::verbs {

// The sonames opened by ibverbs() and mlx5(): the ABI-versioned names the runtime packages install (the unversioned
// libibverbs.so is a development symlink).
constexpr const char* kIbverbsSoname = "libibverbs.so.1";
constexpr const char* kMlx5Soname = "libmlx5.so.1";
// The oldest rdma-core that has every required entry point (ibv_reg_mr_iova2).
constexpr int kMinRdmaCoreRelease = 28;

// libibverbs.so.1. Fields are named after the symbol without its ibv_ prefix.
struct IbvApi {
  void* handle = nullptr;  // of dlopen; never closed
  decltype(&::ibv_get_device_list) get_device_list = nullptr;
  decltype(&::ibv_free_device_list) free_device_list = nullptr;
  decltype(&::ibv_get_device_name) get_device_name = nullptr;
  decltype(&::ibv_open_device) open_device = nullptr;
  decltype(&::ibv_close_device) close_device = nullptr;
  decltype(&::ibv_query_device) query_device = nullptr;
  // The exported ibv_query_port@IBVERBS_1.1 fills the pre-extension part of ibv_port_attr only; call queryPort().
  decltype(&::ibv_query_port) query_port_compat = nullptr;
  decltype(&::ibv_query_gid) query_gid = nullptr;
  decltype(&::ibv_alloc_pd) alloc_pd = nullptr;
  decltype(&::ibv_dealloc_pd) dealloc_pd = nullptr;  // also frees a parent domain
  decltype(&::ibv_reg_mr) reg_mr = nullptr;          // plain access flags; regMr() picks this or reg_mr_iova2
  decltype(&::ibv_reg_mr_iova2) reg_mr_iova2 = nullptr;
  decltype(&::ibv_reg_dmabuf_mr) reg_dmabuf_mr = nullptr;  // optional: nullptr before rdma-core 34
  decltype(&::ibv_dereg_mr) dereg_mr = nullptr;
  decltype(&::ibv_create_cq) create_cq = nullptr;
  decltype(&::ibv_destroy_cq) destroy_cq = nullptr;
  decltype(&::ibv_create_qp) create_qp = nullptr;  // createQpEx()'s path for a plain QP
  decltype(&::ibv_modify_qp) modify_qp = nullptr;  // with the attributes of qp_attr.h's buildQpTransition
  decltype(&::ibv_destroy_qp) destroy_qp = nullptr;
  decltype(&::ibv_qp_to_qp_ex) qp_to_qp_ex = nullptr;  // for the ibv_wr_* members of struct ibv_qp_ex
  decltype(&::ibv_wc_status_str) wc_status_str = nullptr;

  // verbs.h's inline entry points (see the contract). Same arguments and results as the functions they replace;
  // errno is set as they set it.
  int queryPort(ibv_context* context, uint8_t port_num, ibv_port_attr* port_attr) const;
  ibv_qp* createQpEx(ibv_context* context, ibv_qp_init_attr_ex* attr) const;
  // ibv_reg_mr's macro: access flags in IBV_ACCESS_OPTIONAL_RANGE (relaxed ordering) need ibv_reg_mr_iova2,
  // with iova = addr (windows are addressed by the owner's virtual address).
  ibv_mr* regMr(ibv_pd* pd, void* addr, size_t length, unsigned int access) const;
  ibv_td* allocTd(ibv_context* context, ibv_td_init_attr* attr) const;
  int deallocTd(ibv_td* td) const;
  ibv_pd* allocParentDomain(ibv_context* context, ibv_parent_domain_init_attr* attr) const;
  static int postSend(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad_wr);
  static int pollCq(ibv_cq* cq, int num_entries, ibv_wc* wc);
};

// libmlx5.so.1 (mlx5 direct verbs). Fields are named after the symbol without its mlx5dv_ prefix.
struct Mlx5Api {
  void* handle = nullptr;  // of dlopen; never closed
  decltype(&::mlx5dv_is_supported) is_supported = nullptr;
  decltype(&::mlx5dv_create_qp) create_qp = nullptr;
  decltype(&::mlx5dv_init_obj) init_obj = nullptr;
};

// The process's libibverbs / libmlx5, loaded on the first call (thread-safe). On success *out points to a table
// that lives until the process ends. On failure (library absent, a required symbol missing) returns
// ncclSystemError with the message, the same on every call.
ncclResult_t ibverbs(const IbvApi** out);
ncclResult_t mlx5(const Mlx5Api** out);

// The work of ibverbs() / mlx5() for a given library name or path, uncached: for tests (a path that does not exist,
// a library without the symbols). The handle of a successful load is never closed.
ncclResult_t loadIbverbs(const char* soname, IbvApi* out);
ncclResult_t loadMlx5(const char* soname, Mlx5Api* out);

}  // namespace nccl_moe::verbs
