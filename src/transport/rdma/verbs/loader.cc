#include "transport/rdma/verbs/loader.h"

#include <dlfcn.h>
#include <link.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>

#include "core/error.h"
#include "core/log.h"

namespace nccl_moe::verbs {

namespace {

// IBVERBS_1.1 predates rdma-core (libibverbs 1.1.6).
constexpr int kEveryRelease = 0;

// One entry point: its symbol, the version node it is bound at, the rdma-core release that introduced that node
// (Debian's libibverbs1 / ibverbs-providers symbols files), and where its address goes.
struct Symbol {
  const char* name;
  const char* version;
  int since_release;
  void** slot;
  bool optional;
};

// Where dlopen found `handle` (for messages), else `soname`.
std::string libraryPath(void* handle, const char* soname) {
  link_map* map = nullptr;
  if (handle != nullptr && dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map != nullptr && map->l_name != nullptr &&
      map->l_name[0] != '\0')
    return map->l_name;
  return soname;
}

// Opens `soname` and binds every symbol; on failure nothing is bound (the slots are cleared) and the message names
// the library, the symbol and the release needed. `what` says what the library is for.
ncclResult_t openAndBind(const char* soname, const char* what, Symbol* symbols, size_t num_symbols, void** handle) {
  *handle = nullptr;
  for (size_t i = 0; i < num_symbols; ++i) *symbols[i].slot = nullptr;
  void* h = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr) {
    const char* err = dlerror();
    return setLastError(ncclSystemError,
                        "%s could not be loaded (%s): %s needs rdma-core %d or newer (Debian/Ubuntu: libibverbs1 and "
                        "ibverbs-providers; RHEL: libibverbs). Communicators of one node do not need it",
                        soname, err != nullptr ? err : "no error text", what, kMinRdmaCoreRelease);
  }
  for (size_t i = 0; i < num_symbols; ++i) {
    const Symbol& s = symbols[i];
    dlerror();  // clear
    void* address = dlvsym(h, s.name, s.version);
    if (address != nullptr) {
      *s.slot = address;
      continue;
    }
    if (s.optional) {
      MOE_INFO("%s has no %s@%s (rdma-core %d or newer); going without it", libraryPath(h, soname).c_str(), s.name,
               s.version, s.since_release);
      continue;
    }
    const char* err = dlerror();
    const std::string reason = err != nullptr ? err : "not found";  // copied before dlinfo may reuse the buffer
    const std::string path = libraryPath(h, soname);
    for (size_t j = 0; j < num_symbols; ++j) *symbols[j].slot = nullptr;
    dlclose(h);
    char since[96];
    if (s.since_release == kEveryRelease)
      std::snprintf(since, sizeof(since), "every rdma-core release has it, so this is not rdma-core's library");
    else
      std::snprintf(since, sizeof(since), "that symbol came with rdma-core %d", s.since_release);
    return setLastError(ncclSystemError, "%s has no %s@%s (%s): %s; %s needs rdma-core %d or newer", path.c_str(),
                        s.name, s.version, reason.c_str(), since, what, kMinRdmaCoreRelease);
  }
  *handle = h;
  return ncclSuccess;
}

template <typename Fn>
void** slot(Fn* field) {
  return reinterpret_cast<void**>(field);
}

// A process-wide load: its result, message and table, computed once.
template <typename Api>
struct Loaded {
  ncclResult_t result = ncclSuccess;
  std::string message;
  Api api;
};

template <typename Api>
Loaded<Api> loadOnce(ncclResult_t (*load)(const char*, Api*), const char* soname) {
  Loaded<Api> l;
  l.result = load(soname, &l.api);
  if (l.result != ncclSuccess) {
    l.message = threadLastError();
    MOE_INFO("%s", l.message.c_str());
  } else {
    MOE_INFO("loaded %s (%s)", soname, libraryPath(l.api.handle, soname).c_str());
  }
  return l;
}

template <typename Api>
ncclResult_t report(const Loaded<Api>& l, const Api** out) {
  if (l.result != ncclSuccess) {
    *out = nullptr;
    return setLastError(l.result, "%s", l.message.c_str());
  }
  *out = &l.api;
  return ncclSuccess;
}

}  // namespace

ncclResult_t loadIbverbs(const char* soname, IbvApi* out) {
  *out = IbvApi{};
  Symbol symbols[] = {
      {"ibv_get_device_list", "IBVERBS_1.1", kEveryRelease, slot(&out->get_device_list), false},
      {"ibv_free_device_list", "IBVERBS_1.1", kEveryRelease, slot(&out->free_device_list), false},
      {"ibv_get_device_name", "IBVERBS_1.1", kEveryRelease, slot(&out->get_device_name), false},
      {"ibv_open_device", "IBVERBS_1.1", kEveryRelease, slot(&out->open_device), false},
      {"ibv_close_device", "IBVERBS_1.1", kEveryRelease, slot(&out->close_device), false},
      {"ibv_query_device", "IBVERBS_1.1", kEveryRelease, slot(&out->query_device), false},
      {"ibv_query_port", "IBVERBS_1.1", kEveryRelease, slot(&out->query_port_compat), false},
      {"ibv_query_gid", "IBVERBS_1.1", kEveryRelease, slot(&out->query_gid), false},
      {"ibv_alloc_pd", "IBVERBS_1.1", kEveryRelease, slot(&out->alloc_pd), false},
      {"ibv_dealloc_pd", "IBVERBS_1.1", kEveryRelease, slot(&out->dealloc_pd), false},
      {"ibv_reg_mr", "IBVERBS_1.1", kEveryRelease, slot(&out->reg_mr), false},
      {"ibv_reg_mr_iova2", "IBVERBS_1.8", 28, slot(&out->reg_mr_iova2), false},
      {"ibv_reg_dmabuf_mr", "IBVERBS_1.12", 34, slot(&out->reg_dmabuf_mr), true},
      {"ibv_dereg_mr", "IBVERBS_1.1", kEveryRelease, slot(&out->dereg_mr), false},
      {"ibv_create_cq", "IBVERBS_1.1", kEveryRelease, slot(&out->create_cq), false},
      {"ibv_destroy_cq", "IBVERBS_1.1", kEveryRelease, slot(&out->destroy_cq), false},
      {"ibv_create_qp", "IBVERBS_1.1", kEveryRelease, slot(&out->create_qp), false},
      {"ibv_modify_qp", "IBVERBS_1.1", kEveryRelease, slot(&out->modify_qp), false},
      {"ibv_destroy_qp", "IBVERBS_1.1", kEveryRelease, slot(&out->destroy_qp), false},
      {"ibv_qp_to_qp_ex", "IBVERBS_1.6", 24, slot(&out->qp_to_qp_ex), false},
      {"ibv_wc_status_str", "IBVERBS_1.1", kEveryRelease, slot(&out->wc_status_str), false},
  };
  return openAndBind(soname, "the scale-out (RDMA) transport", symbols, sizeof(symbols) / sizeof(symbols[0]),
                     &out->handle);
}

ncclResult_t loadMlx5(const char* soname, Mlx5Api* out) {
  *out = Mlx5Api{};
  Symbol symbols[] = {
      {"mlx5dv_is_supported", "MLX5_1.8", 22, slot(&out->is_supported), false},
      {"mlx5dv_create_qp", "MLX5_1.3", 16, slot(&out->create_qp), false},
      {"mlx5dv_init_obj", "MLX5_1.2", 15, slot(&out->init_obj), false},
  };
  return openAndBind(soname, "the mlx5 scale-out transport (GPU-initiated verbs, doorbell proxy)", symbols,
                     sizeof(symbols) / sizeof(symbols[0]), &out->handle);
}

ncclResult_t ibverbs(const IbvApi** out) {
  static const Loaded<IbvApi> loaded = loadOnce<IbvApi>(&loadIbverbs, kIbverbsSoname);  // once, thread-safe
  return report(loaded, out);
}

ncclResult_t mlx5(const Mlx5Api** out) {
  static const Loaded<Mlx5Api> loaded = loadOnce<Mlx5Api>(&loadMlx5, kMlx5Soname);
  return report(loaded, out);
}

// ---- verbs.h's inline entry points, as rdma-core 44's header writes them, with exported fallbacks from the table.
// verbs_get_ctx_op(ctx, op) is the header's check that the provider's verbs_context is large enough to have `op`
// and fills it.

int IbvApi::queryPort(ibv_context* context, uint8_t port_num, ibv_port_attr* port_attr) const {
  verbs_context* vctx = verbs_get_ctx_op(context, query_port);
  if (vctx == nullptr) {
    std::memset(port_attr, 0, sizeof(*port_attr));
    return query_port_compat(context, port_num, reinterpret_cast<_compat_ibv_port_attr*>(port_attr));
  }
  return vctx->query_port(context, port_num, port_attr, sizeof(*port_attr));
}

ibv_qp* IbvApi::createQpEx(ibv_context* context, ibv_qp_init_attr_ex* attr) const {
  if (attr->comp_mask == IBV_QP_INIT_ATTR_PD) return create_qp(attr->pd, reinterpret_cast<ibv_qp_init_attr*>(attr));
  verbs_context* vctx = verbs_get_ctx_op(context, create_qp_ex);
  if (vctx == nullptr) {
    errno = EOPNOTSUPP;
    return nullptr;
  }
  return vctx->create_qp_ex(context, attr);
}

ibv_mr* IbvApi::regMr(ibv_pd* pd, void* addr, size_t length, unsigned int access) const {
  if ((access & IBV_ACCESS_OPTIONAL_RANGE) == 0) return reg_mr(pd, addr, length, static_cast<int>(access));
  return reg_mr_iova2(pd, addr, length, reinterpret_cast<uintptr_t>(addr), access);
}

ibv_td* IbvApi::allocTd(ibv_context* context, ibv_td_init_attr* attr) const {
  verbs_context* vctx = verbs_get_ctx_op(context, alloc_td);
  if (vctx == nullptr) {
    errno = EOPNOTSUPP;
    return nullptr;
  }
  return vctx->alloc_td(context, attr);
}

int IbvApi::deallocTd(ibv_td* td) const {
  verbs_context* vctx = verbs_get_ctx_op(td->context, dealloc_td);
  if (vctx == nullptr) return EOPNOTSUPP;
  return vctx->dealloc_td(td);
}

ibv_pd* IbvApi::allocParentDomain(ibv_context* context, ibv_parent_domain_init_attr* attr) const {
  verbs_context* vctx = verbs_get_ctx_op(context, alloc_parent_domain);
  if (vctx == nullptr) {
    errno = EOPNOTSUPP;
    return nullptr;
  }
  return vctx->alloc_parent_domain(context, attr);
}

int IbvApi::postSend(ibv_qp* qp, ibv_send_wr* wr, ibv_send_wr** bad_wr) {
  return qp->context->ops.post_send(qp, wr, bad_wr);
}

int IbvApi::pollCq(ibv_cq* cq, int num_entries, ibv_wc* wc) { return cq->context->ops.poll_cq(cq, num_entries, wc); }

}  // namespace nccl_moe::verbs
