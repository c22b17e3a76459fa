// The tuner plugin libnccl-tuner-moe.so, exercised the way NCCL uses it: ELF exports and dependencies,
// dlopen(RTLD_NOW | RTLD_LOCAL) + dlsym of both tables, init/getCollInfo/finalize through them with a fake
// NCCL logger, many communicators, concurrent getCollInfo calls, the channel-cap arithmetic, and (when this
// executable exports ncclMoePluginAttach, i.e. is linked with ENABLE_EXPORTS) the bridge to the library:
// registry, logger hand-over, SM reservations pushed from the library.
//
// Needs NCCL_MOE_PLUGIN_PATH (tests/CMakeLists.txt defines it when the plugin target exists); without it
// every test that loads the plugin skips.
#include <dlfcn.h>
#include <elf.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "../../plugin/channel_cap.h"
#include "../../plugin/nccl_tuner_abi.h"
#include "core/plugin_bridge.h"
#include "harness/scoped_env.h"

namespace {

using nccl_moe::tuner::channelCap;
using nccl_moe::tuner::channelsToWrite;
using nccl_moe::tuner::cheapestAlgorithm;
using nccl_moe::tuner::kNcclMaxChannels;

#ifdef NCCL_MOE_PLUGIN_PATH
constexpr const char* kPluginPath = NCCL_MOE_PLUGIN_PATH;
#else
constexpr const char* kPluginPath = nullptr;
#endif

#define REQUIRE_PLUGIN()                                                                         \
  do {                                                                                           \
    if (kPluginPath == nullptr) GTEST_SKIP() << "NCCL_MOE_PLUGIN_PATH not defined by the build"; \
  } while (0)

// ---- fake NCCL logger ------------------------------------------------------------------------------------

struct LogRecord {
  int level;
  unsigned long flags;
  std::string message;
};

std::mutex g_log_mutex;
std::vector<LogRecord> g_log;

void fakeLogger(ncclDebugLogLevel level, unsigned long flags, const char* /*file*/, int /*line*/, const char* fmt,
                ...) {
  char buffer[2048];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buffer, sizeof(buffer), fmt, ap);
  va_end(ap);
  std::lock_guard<std::mutex> lock(g_log_mutex);
  g_log.push_back({static_cast<int>(level), flags, buffer});
}

void clearLog() {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  g_log.clear();
}

std::vector<LogRecord> logLinesContaining(const std::string& needle) {
  std::lock_guard<std::mutex> lock(g_log_mutex);
  std::vector<LogRecord> out;
  for (const LogRecord& r : g_log) {
    if (r.message.find(needle) != std::string::npos) out.push_back(r);
  }
  return out;
}

// ---- helpers ---------------------------------------------------------------------------------------------

struct Plugin {
  void* handle = nullptr;
  const ncclTuner_v5_t* v5 = nullptr;
  const ncclTuner_v6_t* v6 = nullptr;
};

Plugin openPlugin() {
  Plugin p;
  p.handle = dlopen(kPluginPath, RTLD_NOW | RTLD_LOCAL);  // as NCCL opens it
  if (p.handle == nullptr) return p;
  p.v5 = static_cast<const ncclTuner_v5_t*>(dlsym(p.handle, "ncclTunerPlugin_v5"));
  p.v6 = static_cast<const ncclTuner_v6_t*>(dlsym(p.handle, "ncclTunerPlugin_v6"));
  return p;
}

bool bridgeExported() { return dlsym(RTLD_DEFAULT, NCCL_MOE_PLUGIN_ATTACH_SYMBOL) != nullptr; }

// A cost table (float[7][3]) in which only `algo`/`proto` is allowed.
struct CostTable {
  float cost[NCCL_MOE_ABI_NUM_ALGORITHMS][NCCL_MOE_ABI_NUM_PROTOCOLS];
  explicit CostTable(int algo, int proto = NCCL_MOE_ABI_PROTO_SIMPLE) {
    for (auto& row : cost)
      for (float& c : row) c = NCCL_MOE_ABI_ALGO_PROTO_IGNORE;
    cost[algo][proto] = 10.0f;
  }
  float** arg() { return reinterpret_cast<float**>(cost); }
};

int collChannels(const ncclTuner_v5_t* t, void* ctx, size_t bytes, int algo) {
  CostTable table(algo);
  int channels = 0;
  EXPECT_EQ(ncclSuccess, t->getCollInfo(ctx, ncclFuncAllReduce, bytes, 1, table.arg(), NCCL_MOE_ABI_NUM_ALGORITHMS,
                                        NCCL_MOE_ABI_NUM_PROTOCOLS, 0, &channels));
  return channels;
}

void* initV5(const Plugin& p, uint64_t hash, size_t ranks = 8, size_t nodes = 1) {
  void* ctx = nullptr;
  ncclNvlDomainInfo_v5_t nvl{1, static_cast<int>(ranks), static_cast<int>(ranks)};
  ncclTunerConstants_v5_t constants{};
  EXPECT_EQ(ncclSuccess, p.v5->init(&ctx, hash, ranks, nodes, fakeLogger, &nvl, &constants));
  return ctx;
}

// ---- ELF inspection --------------------------------------------------------------------------------------

struct ElfFacts {
  bool ok = false;
  std::vector<std::pair<std::string, Elf64_Sym>> defined_globals;
  std::vector<std::string> needed;
  bool nodelete = false;
};

ElfFacts readElf(const char* path) {
  ElfFacts facts;
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() < sizeof(Elf64_Ehdr)) return facts;
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(bytes.data());
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64) return facts;
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(bytes.data() + eh->e_shoff);
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type == SHT_DYNSYM) {
      const char* strtab = bytes.data() + sh[sh[i].sh_link].sh_offset;
      const auto* sym = reinterpret_cast<const Elf64_Sym*>(bytes.data() + sh[i].sh_offset);
      const size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
      for (size_t k = 1; k < n; ++k) {
        const int bind = ELF64_ST_BIND(sym[k].st_info);
        if (sym[k].st_shndx == SHN_UNDEF || (bind != STB_GLOBAL && bind != STB_WEAK)) continue;
        facts.defined_globals.emplace_back(strtab + sym[k].st_name, sym[k]);
      }
    } else if (sh[i].sh_type == SHT_DYNAMIC) {
      const char* strtab = bytes.data() + sh[sh[i].sh_link].sh_offset;
      const auto* dyn = reinterpret_cast<const Elf64_Dyn*>(bytes.data() + sh[i].sh_offset);
      for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Dyn) && dyn[k].d_tag != DT_NULL; ++k) {
        if (dyn[k].d_tag == DT_NEEDED) facts.needed.emplace_back(strtab + dyn[k].d_un.d_val);
        if (dyn[k].d_tag == DT_FLAGS_1 && (dyn[k].d_un.d_val & DF_1_NODELETE)) facts.nodelete = true;
      }
    }
  }
  facts.ok = true;
  return facts;
}

// ==========================================================================================================
// Channel-cap arithmetic (plugin/channel_cap.h)
// ==========================================================================================================

TEST(PluginCap, CapIsFreeSmsClampedAndOnlyWhenBinding) {
  EXPECT_EQ(0, channelCap(-1, 132));  // nothing reserved
  EXPECT_EQ(0, channelCap(0, 132));
  EXPECT_EQ(0, channelCap(24, 0));    // SM count unknown
  EXPECT_EQ(0, channelCap(24, 132));  // 108 free >= 64: NCCL can never exceed it
  EXPECT_EQ(0, channelCap(68, 132));  // exactly 64 free
  EXPECT_EQ(63, channelCap(69, 132));
  EXPECT_EQ(32, channelCap(100, 132));
  EXPECT_EQ(12, channelCap(120, 132));
  EXPECT_EQ(1, channelCap(131, 132));
  EXPECT_EQ(1, channelCap(132, 132));  // never 0 channels
  EXPECT_EQ(1, channelCap(500, 132));
  for (int sms = 1; sms <= 200; ++sms) {
    for (int reserve = 1; reserve <= 250; ++reserve) {
      const int cap = channelCap(reserve, sms);
      if (sms - reserve >= kNcclMaxChannels) {
        ASSERT_EQ(0, cap);
      } else {
        ASSERT_GE(cap, 1);
        ASSERT_LT(cap, kNcclMaxChannels);
        if (reserve < sms) {
          ASSERT_EQ(sms - reserve, cap);  // co-residency: cap + reserve == sms
        }
      }
    }
  }
}

TEST(PluginCap, CheapestAlgorithmFollowsNcclSelection) {
  float table[7][3];
  for (auto& row : table)
    for (float& c : row) c = -1.0f;
  EXPECT_EQ(-1, cheapestAlgorithm(&table[0][0], 7, 3));
  EXPECT_EQ(-1, cheapestAlgorithm(nullptr, 7, 3));
  EXPECT_EQ(-1, cheapestAlgorithm(&table[0][0], 0, 3));
  table[NCCL_MOE_ABI_ALGO_RING][NCCL_MOE_ABI_PROTO_SIMPLE] = 30.0f;
  table[NCCL_MOE_ABI_ALGO_TREE][NCCL_MOE_ABI_PROTO_LL] = 40.0f;
  EXPECT_EQ(NCCL_MOE_ABI_ALGO_RING, cheapestAlgorithm(&table[0][0], 7, 3));
  table[NCCL_MOE_ABI_ALGO_NVLS][NCCL_MOE_ABI_PROTO_SIMPLE] = 5.0f;
  EXPECT_EQ(NCCL_MOE_ABI_ALGO_NVLS, cheapestAlgorithm(&table[0][0], 7, 3));
  table[NCCL_MOE_ABI_ALGO_PAT][NCCL_MOE_ABI_PROTO_SIMPLE] = 0.0f;  // zero cost is allowed
  EXPECT_EQ(NCCL_MOE_ABI_ALGO_PAT, cheapestAlgorithm(&table[0][0], 7, 3));
  // A smaller table than NCCL's current one is indexed with its own stride.
  float small[2][2] = {{-1.0f, 7.0f}, {3.0f, -1.0f}};
  EXPECT_EQ(1, cheapestAlgorithm(&small[0][0], 2, 2));
}

TEST(PluginCap, WritesOnlyWhatKeepsNcclWithinTheCapWithoutRaisingIt) {
  const int ring = NCCL_MOE_ABI_ALGO_RING;
  const int tree = NCCL_MOE_ABI_ALGO_TREE;
  // No cap: whatever is there stays.
  EXPECT_EQ(0, channelsToWrite(0, ring, 1 << 30, true, 0));
  EXPECT_EQ(5, channelsToWrite(0, ring, 1 << 30, true, 5));
  // Ring/Tree: NCCL's own count <= max(1, bytes / 4096); leave it when that already fits.
  EXPECT_EQ(0, channelsToWrite(8, ring, 0, true, 0));
  EXPECT_EQ(0, channelsToWrite(8, ring, 8 * 4096, true, 0));
  EXPECT_EQ(8, channelsToWrite(8, ring, 8 * 4096 + 4096, true, 0));
  EXPECT_EQ(8, channelsToWrite(8, tree, 1 << 30, true, 0));
  EXPECT_EQ(0, channelsToWrite(1, ring, 8191, true, 0));
  EXPECT_EQ(1, channelsToWrite(1, ring, 8192, true, 0));
  // Non-default NCCL thread settings: the size rule is void, always write a binding cap.
  EXPECT_EQ(8, channelsToWrite(8, ring, 16, false, 0));
  // Algorithms whose count does not shrink with the size, or unknown: always write.
  for (int algo : {NCCL_MOE_ABI_ALGO_NVLS, NCCL_MOE_ABI_ALGO_NVLS_TREE, NCCL_MOE_ABI_ALGO_COLLNET_DIRECT,
                   NCCL_MOE_ABI_ALGO_COLLNET_CHAIN, NCCL_MOE_ABI_ALGO_PAT, -1}) {
    EXPECT_EQ(8, channelsToWrite(8, algo, 16, true, 0)) << "algo " << algo;
  }
  // A value already set (by NCCL or a chained tuner) is only lowered.
  EXPECT_EQ(4, channelsToWrite(8, ring, 1 << 30, true, 4));
  EXPECT_EQ(8, channelsToWrite(8, ring, 1 << 30, true, 20));
  // Exhaustive: never above the cap, never 0 once written.
  for (int cap = 1; cap < kNcclMaxChannels; ++cap) {
    for (size_t bytes :
         {size_t{0}, size_t{1}, size_t{4095}, size_t{4096}, size_t{65536}, size_t{1} << 20, size_t{1} << 34}) {
      for (int algo = -1; algo < NCCL_MOE_ABI_NUM_ALGORITHMS; ++algo) {
        const int v = channelsToWrite(cap, algo, bytes, true, 0);
        ASSERT_TRUE(v == 0 || (v >= 1 && v <= cap));
        if (v == 0) {
          ASSERT_TRUE(algo == ring || algo == tree);
          ASSERT_LE(std::max<size_t>(1, bytes / 4096), static_cast<size_t>(cap));
        }
      }
    }
  }
}

// ==========================================================================================================
// The built library
// ==========================================================================================================

TEST(PluginLibrary, ExportsExactlyTheTunerTablesAndLinksNoNccl) {
  REQUIRE_PLUGIN();
  const std::string path(kPluginPath);
  EXPECT_EQ("libnccl-tuner-moe.so", path.substr(path.rfind('/') + 1));
  const ElfFacts elf = readElf(kPluginPath);
  ASSERT_TRUE(elf.ok) << "cannot parse " << kPluginPath;
  std::set<std::string> names;
  for (const auto& [name, sym] : elf.defined_globals) {
    names.insert(name);
    EXPECT_EQ(STT_OBJECT, ELF64_ST_TYPE(sym.st_info)) << name << " must be a data symbol";
    if (name == "ncclTunerPlugin_v5") {
      EXPECT_EQ(sizeof(ncclTuner_v5_t), sym.st_size);
    }
    if (name == "ncclTunerPlugin_v6") {
      EXPECT_EQ(sizeof(ncclTuner_v6_t), sym.st_size);
    }
  }
  EXPECT_EQ((std::set<std::string>{"ncclTunerPlugin_v5", "ncclTunerPlugin_v6"}), names);
  for (const std::string& lib : elf.needed) {
    EXPECT_NE(0u, lib.rfind("libnccl", 0)) << "the plugin must not link " << lib;
    EXPECT_NE(0u, lib.rfind("libcuda", 0)) << "the plugin must not link " << lib;
  }
  EXPECT_TRUE(elf.nodelete) << "the plugin must be linked with -z nodelete";
}

TEST(PluginLibrary, TablesAreCompleteAndNamed) {
  REQUIRE_PLUGIN();
  Plugin p = openPlugin();
  ASSERT_NE(nullptr, p.handle) << dlerror();
  ASSERT_NE(nullptr, p.v5);
  ASSERT_NE(nullptr, p.v6);
  EXPECT_NE(nullptr, p.v5->name);
  EXPECT_NE(nullptr, p.v5->init);
  EXPECT_NE(nullptr, p.v5->getCollInfo);
  EXPECT_NE(nullptr, p.v5->finalize);
  EXPECT_NE(nullptr, p.v6->name);
  EXPECT_NE(nullptr, p.v6->init);
  EXPECT_NE(nullptr, p.v6->getCollInfo);
  EXPECT_NE(nullptr, p.v6->finalize);
  EXPECT_NE(nullptr, p.v6->getChunkSize);
  EXPECT_STREQ(p.v5->name, p.v6->name);
  EXPECT_EQ(nullptr, dlsym(p.handle, "ncclTunerPlugin_v4"));  // older NCCL: silently skipped, by design
  EXPECT_EQ(nullptr, dlsym(p.handle, NCCL_MOE_PLUGIN_ATTACH_SYMBOL));
  dlclose(p.handle);
}

TEST(PluginLibrary, InitCollInfoFinalizeThroughBothTables) {
  REQUIRE_PLUGIN();
  harness::ScopedEnv env("NCCL_MOE_SM_RESERVE", nullptr);
  Plugin p = openPlugin();
  ASSERT_NE(nullptr, p.v5);
  clearLog();

  void* ctx5 = initV5(p, 0x1234abcdULL, 8, 1);
  ASSERT_NE(nullptr, ctx5);
  void* ctx6 = nullptr;
  ncclNvlDomainInfo_v6_t nvl{2, 4, 4};
  ncclTunerConstants_v6_t constants{};
  constants.baseLatencies[1][2] = 42.0;
  ASSERT_EQ(ncclSuccess, p.v6->init(&ctx6, 0x5678ULL, 8, 2, fakeLogger, &nvl, &constants));
  ASSERT_NE(nullptr, ctx6);
  EXPECT_EQ(42.0, constants.baseLatencies[1][2]);  // NCCL's model constants are left alone

  const auto init_lines = logLinesContaining("NCCL-MoE tuner: init comm");
  ASSERT_EQ(2u, init_lines.size());
  EXPECT_EQ(NCCL_LOG_INFO, init_lines[0].level);
  EXPECT_NE(0u, init_lines[0].flags & NCCL_INIT);
  EXPECT_NE(0u, init_lines[0].flags & NCCL_TUNING);
  EXPECT_NE(std::string::npos, init_lines[0].message.find("0x1234abcd"));
  EXPECT_NE(std::string::npos, init_lines[0].message.find("tuner v5"));
  EXPECT_NE(std::string::npos, init_lines[1].message.find("nvlDomains 2"));
  EXPECT_NE(std::string::npos, init_lines[1].message.find("tuner v6"));

  // Nothing reserved: the tuner changes nothing, for every collective and size.
  for (ncclFunc_t f :
       {ncclFuncBroadcast, ncclFuncReduce, ncclFuncAllGather, ncclFuncReduceScatter, ncclFuncAllReduce}) {
    for (size_t bytes : {size_t{0}, size_t{8}, size_t{1} << 20, size_t{1} << 33}) {
      CostTable table(NCCL_MOE_ABI_ALGO_RING);
      const CostTable before = table;
      int channels = 0;
      ASSERT_EQ(ncclSuccess, p.v5->getCollInfo(ctx5, f, bytes, 1, table.arg(), 7, 3, 0, &channels));
      EXPECT_EQ(0, channels);
      ASSERT_EQ(ncclSuccess, p.v6->getCollInfo(ctx6, f, bytes, 2, table.arg(), 7, 3, 1, &channels));
      EXPECT_EQ(0, channels);
      EXPECT_EQ(0, std::memcmp(before.cost, table.cost, sizeof(table.cost)));  // cost table untouched
    }
  }
  size_t chunk = 131072;
  EXPECT_EQ(ncclSuccess, p.v6->getChunkSize(ctx6, ncclFuncAllReduce, 1 << 20, NCCL_MOE_ABI_ALGO_RING,
                                            NCCL_MOE_ABI_PROTO_SIMPLE, 16, &chunk));
  EXPECT_EQ(131072u, chunk);

  EXPECT_EQ(ncclSuccess, p.v5->finalize(ctx5));
  EXPECT_EQ(ncclSuccess, p.v6->finalize(ctx6));
  const auto fin = logLinesContaining("NCCL-MoE tuner: finalize comm");
  ASSERT_EQ(2u, fin.size());
  EXPECT_NE(std::string::npos, fin[0].message.find("consulted 20 times, channels capped 0 times"));
  dlclose(p.handle);
}

TEST(PluginLibrary, NeverFailsOnOddInputs) {
  REQUIRE_PLUGIN();
  Plugin p = openPlugin();
  ASSERT_NE(nullptr, p.v5);
  int channels = 0;
  EXPECT_EQ(ncclSuccess, p.v5->getCollInfo(nullptr, ncclFuncAllReduce, 1 << 20, 1, nullptr, 7, 3, 0, &channels));
  EXPECT_EQ(0, channels);
  EXPECT_EQ(ncclSuccess, p.v5->finalize(nullptr));
  EXPECT_EQ(ncclSuccess, p.v6->getChunkSize(nullptr, ncclFuncAllReduce, 0, 0, 0, 0, nullptr));
  EXPECT_EQ(ncclSuccess, p.v5->init(nullptr, 1, 2, 1, fakeLogger, nullptr, nullptr));
  // No logger, no NVLink-domain info, no constants.
  void* ctx = nullptr;
  ASSERT_EQ(ncclSuccess, p.v6->init(&ctx, 7, 2, 1, nullptr, nullptr, nullptr));
  ASSERT_NE(nullptr, ctx);
  EXPECT_EQ(ncclSuccess, p.v6->getCollInfo(ctx, ncclFuncAllGather, 64, 1, nullptr, 0, 0, 0, nullptr));
  EXPECT_EQ(ncclSuccess, p.v6->getCollInfo(ctx, ncclFuncAllGather, 64, 1, nullptr, 0, 0, 0, &channels));
  EXPECT_EQ(ncclSuccess, p.v6->finalize(ctx));
  dlclose(p.handle);
}

TEST(PluginLibrary, ReopensAfterDlclose) {
  REQUIRE_PLUGIN();
  for (int round = 0; round < 3; ++round) {
    Plugin p = openPlugin();
    ASSERT_NE(nullptr, p.v5);
    void* ctx = initV5(p, 100 + round);
    ASSERT_NE(nullptr, ctx);
    EXPECT_EQ(0, collChannels(p.v5, ctx, 1 << 20, NCCL_MOE_ABI_ALGO_RING));
    EXPECT_EQ(ncclSuccess, p.v5->finalize(ctx));
    EXPECT_EQ(0, dlclose(p.handle));
  }
}

TEST(PluginLibrary, MalformedReserveIsIgnoredWithAnInfoLine) {
  REQUIRE_PLUGIN();
  harness::ScopedEnv env("NCCL_MOE_SM_RESERVE", "lots");
  Plugin p = openPlugin();
  clearLog();
  void* ctx = initV5(p, 77);
  ASSERT_NE(nullptr, ctx);
  const auto lines = logLinesContaining("ignoring NCCL_MOE_SM_RESERVE=\"lots\"");
  ASSERT_EQ(1u, lines.size());
  EXPECT_EQ(NCCL_LOG_INFO, lines[0].level);  // WARN would overwrite NCCL's last-error string
  EXPECT_EQ(0, collChannels(p.v5, ctx, 1 << 30, NCCL_MOE_ABI_ALGO_NVLS));
  EXPECT_EQ(ncclSuccess, p.v5->finalize(ctx));
  dlclose(p.handle);
}

TEST(PluginLibrary, ManyCommunicatorsAndConcurrentCollInfo) {
  REQUIRE_PLUGIN();
  harness::ScopedEnv env("NCCL_MOE_SM_RESERVE", nullptr);
  Plugin p = openPlugin();
  ASSERT_NE(nullptr, p.v5);
  constexpr int kComms = 256;
  std::vector<void*> contexts;
  for (int i = 0; i < kComms; ++i) {
    void* ctx = nullptr;
    ncclNvlDomainInfo_v5_t nvl{1, 8, 8};
    ncclTunerConstants_v5_t constants{};
    if (i % 2 == 0) {
      ASSERT_EQ(ncclSuccess, p.v5->init(&ctx, 0xC0000000ULL + i, 2 + i % 7, 1, fakeLogger, &nvl, &constants));
    } else {
      ASSERT_EQ(ncclSuccess, p.v6->init(&ctx, 0xC0000000ULL + i, 2 + i % 7, 1, fakeLogger, &nvl, &constants));
    }
    ASSERT_NE(nullptr, ctx);
    contexts.push_back(ctx);
  }
  const bool bridge = bridgeExported();
  if (bridge) {
    EXPECT_EQ(kComms, nccl_moe::registeredCommCount());
    nccl_moe::setPluginSmReserve(-1, 100, 132);  // cap 32
  }

  // Threads hammer getCollInfo on shared and private contexts while (with the bridge) the reservation flips.
  constexpr int kThreads = 8;
  constexpr int kCalls = 20000;
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::thread flipper([&] {
    int i = 0;
    while (!stop.load()) {
      if (bridge) nccl_moe::setPluginSmReserve(-1, (i++ % 2) ? 100 : 120, 132);  // cap 32 or 12
      std::this_thread::yield();
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      CostTable table(NCCL_MOE_ABI_ALGO_RING);
      for (int k = 0; k < kCalls; ++k) {
        void* ctx = contexts[(k % 2) ? t : (k * 7 + t) % kComms];
        int channels = 0;
        if (p.v5->getCollInfo(ctx, ncclFuncAllReduce, size_t{1} << 30, 1, table.arg(), 7, 3, 0, &channels) !=
            ncclSuccess) {
          bad.fetch_add(1);
        }
        const bool ok = bridge ? (channels == 32 || channels == 12) : channels == 0;
        if (!ok) bad.fetch_add(1);
      }
    });
  }
  for (auto& th : threads) th.join();
  stop.store(true);
  flipper.join();
  EXPECT_EQ(0, bad.load());

  clearLog();
  for (void* ctx : contexts) EXPECT_EQ(ncclSuccess, p.v5->finalize(ctx));
  unsigned long total = 0;
  for (const LogRecord& r : logLinesContaining("NCCL-MoE tuner: finalize comm")) {
    unsigned long calls = 0;
    const size_t at = r.message.find("consulted ");
    ASSERT_NE(std::string::npos, at);
    ASSERT_EQ(1, std::sscanf(r.message.c_str() + at, "consulted %lu", &calls));
    total += calls;
  }
  EXPECT_EQ(static_cast<unsigned long>(kThreads) * kCalls, total);  // no lost counter updates
  if (bridge) {
    EXPECT_EQ(0, nccl_moe::registeredCommCount());
    nccl_moe::setPluginSmReserve(-1, -1, 0);
  }
  dlclose(p.handle);
}

TEST(PluginLibrary, WarnsOnceWhenTwoLibncclCopiesAreLoaded) {
  REQUIRE_PLUGIN();
  // Two different files named libnccl.so.2 (copies of the plugin: small, and loadable anywhere).
  char dir_a[] = "/tmp/moe_nccl_a_XXXXXX";
  char dir_b[] = "/tmp/moe_nccl_b_XXXXXX";
  ASSERT_NE(nullptr, mkdtemp(dir_a));
  ASSERT_NE(nullptr, mkdtemp(dir_b));
  std::vector<std::string> copies;
  for (const char* dir : {dir_a, dir_b}) {
    const std::string dst = std::string(dir) + "/libnccl.so.2";
    std::ifstream src(kPluginPath, std::ios::binary);
    std::ofstream out(dst, std::ios::binary);
    out << src.rdbuf();
    out.close();
    copies.push_back(dst);
  }
  std::vector<void*> handles;
  for (const std::string& c : copies) {
    void* h = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
    ASSERT_NE(nullptr, h) << dlerror();
    handles.push_back(h);
  }
  Plugin p = openPlugin();
  harness::ScopedEnv debug("NCCL_DEBUG", "WARN");  // keep the stderr fallback quiet
  clearLog();
  void* a = initV5(p, 1);
  void* b = initV5(p, 2);
  EXPECT_EQ(ncclSuccess, p.v5->finalize(a));
  EXPECT_EQ(ncclSuccess, p.v5->finalize(b));
  const auto warns = logLinesContaining("different libnccl copies are loaded");
  // Once per process: a repeated run (--gtest_repeat) in the same process sees no second warning.
  static bool warned_before = false;
  ASSERT_EQ(warned_before ? 0u : 1u, warns.size()) << "warned " << warns.size() << " times";
  if (!warned_before) {
    EXPECT_EQ(NCCL_LOG_WARN, warns[0].level);
    EXPECT_NE(std::string::npos, warns[0].message.find("libnccl.so.2"));
  }
  warned_before = true;
  for (const std::string& c : copies) unlink(c.c_str());
  rmdir(dir_a);
  rmdir(dir_b);
  dlclose(p.handle);
}

// ==========================================================================================================
// The library side of the bridge, driven directly (a fake plugin; no plugin binary or exports needed)
// ==========================================================================================================

std::mutex g_hook_mutex;
std::vector<std::vector<int>> g_hook_calls;  // {cuda_device, reserve_sms, device_sms}

void fakeSetSmReserve(int cuda_device, int reserve_sms, int device_sms) {
  std::lock_guard<std::mutex> lock(g_hook_mutex);
  g_hook_calls.push_back({cuda_device, reserve_sms, device_sms});
}

ncclMoePluginCommInfo_t commInfo(uint64_t hash, int ranks, int device) {
  ncclMoePluginCommInfo_t info{};
  info.comm_hash = hash;
  info.num_ranks = ranks;
  info.num_nodes = 1;
  info.num_nvl_domains = 1;
  info.min_ranks_per_nvl_domain = ranks;
  info.max_ranks_per_nvl_domain = ranks;
  info.cuda_device = device;
  info.tuner_version = 6;
  return info;
}

TEST(PluginBridgeLibrary, AttachReplaysReservationsAndRegistryCountsCommunicators) {
  ASSERT_FALSE(nccl_moe::pluginAttached()) << "a previous test left the bridge attached";
  EXPECT_EQ(nullptr, ncclMoePluginAttach(nullptr));
  ncclMoePluginHooks_t hooks{};
  hooks.size = sizeof(hooks);
  hooks.version = 0;  // unknown version: refused
  EXPECT_EQ(nullptr, ncclMoePluginAttach(&hooks));
  hooks.version = NCCL_MOE_PLUGIN_BRIDGE_VERSION;
  hooks.size = 8;  // too small for version 1: refused
  EXPECT_EQ(nullptr, ncclMoePluginAttach(&hooks));
  EXPECT_FALSE(nccl_moe::pluginAttached());

  nccl_moe::setPluginSmReserve(3, 50, 132);  // before any plugin: stored
  {
    std::lock_guard<std::mutex> lock(g_hook_mutex);
    g_hook_calls.clear();
  }
  hooks.size = sizeof(hooks);
  hooks.plugin_name = "fake";
  hooks.logger = reinterpret_cast<ncclMoeNcclLogger_t>(fakeLogger);
  hooks.set_sm_reserve = fakeSetSmReserve;
  const ncclMoePluginBridge_t* bridge = ncclMoePluginAttach(&hooks);
  ASSERT_NE(nullptr, bridge);
  struct DetachAtExit {  // a failed assertion must not leave the bridge attached for later tests
    const ncclMoePluginBridge_t* bridge;
    ~DetachAtExit() { bridge->detach(); }
  } detach_at_exit{bridge};
  EXPECT_EQ(NCCL_MOE_PLUGIN_BRIDGE_VERSION, bridge->version);
  ASSERT_NE(nullptr, bridge->comm_added);
  ASSERT_NE(nullptr, bridge->comm_removed);
  ASSERT_NE(nullptr, bridge->detach);
  EXPECT_TRUE(nccl_moe::pluginAttached());
  EXPECT_EQ(reinterpret_cast<ncclMoeNcclLogger_t>(fakeLogger), nccl_moe::pluginLogger());
  size_t replayed = 0;
  {
    std::lock_guard<std::mutex> lock(g_hook_mutex);
    replayed = g_hook_calls.size();  // every slot ever written (earlier tests may have written others)
    EXPECT_EQ(1, std::count(g_hook_calls.begin(), g_hook_calls.end(), std::vector<int>{3, 50, 132}));
  }
  nccl_moe::setPluginSmReserve(-1, 10, 0);  // forwarded at once
  nccl_moe::setPluginSmReserve(64, 10, 0);  // no such slot: ignored
  {
    std::lock_guard<std::mutex> lock(g_hook_mutex);
    ASSERT_EQ(replayed + 1, g_hook_calls.size());
    EXPECT_EQ((std::vector<int>{-1, 10, 0}), g_hook_calls.back());
  }

  // One 2-rank communicator with a rank on devices 0 and 1 of this process, one 2-rank on device 0 only.
  const ncclMoePluginCommInfo_t a0 = commInfo(0xA, 2, 0), a1 = commInfo(0xA, 2, 1), b0 = commInfo(0xB, 2, 0);
  bridge->comm_added(&a0);
  bridge->comm_added(&a1);
  nccl_moe::RegisteredComm rc;
  EXPECT_EQ(1, nccl_moe::registeredCommCount());
  EXPECT_EQ(1, nccl_moe::findRegisteredComms(2, -1, &rc));  // two entries, one communicator: not ambiguous
  EXPECT_EQ(2, rc.num_local_ranks);
  EXPECT_EQ(1, nccl_moe::findRegisteredComms(2, 1, &rc));
  EXPECT_EQ(1, rc.cuda_device);
  bridge->comm_added(&b0);
  EXPECT_EQ(2, nccl_moe::registeredCommCount());
  EXPECT_EQ(2, nccl_moe::findRegisteredComms(2, 0, &rc));  // ambiguous on device 0
  EXPECT_EQ(0xBu, rc.comm_hash);
  EXPECT_EQ(1, nccl_moe::findRegisteredComms(2, 1, &rc));  // device 1 only has A
  EXPECT_EQ(0xAu, rc.comm_hash);
  bridge->comm_removed(0xA, 0);
  ASSERT_TRUE(nccl_moe::lookupRegisteredComm(0xA, &rc));
  EXPECT_EQ(1, rc.num_local_ranks);
  EXPECT_EQ(1, rc.cuda_device);
  bridge->comm_removed(0xA, 0);  // already gone: no effect
  bridge->comm_removed(0xA, 1);
  bridge->comm_removed(0xB, 0);
  bridge->comm_added(nullptr);
  EXPECT_EQ(0, nccl_moe::registeredCommCount());
  EXPECT_FALSE(nccl_moe::lookupRegisteredComm(0xA, nullptr));

  bridge->detach();
  EXPECT_FALSE(nccl_moe::pluginAttached());
  EXPECT_EQ(nullptr, nccl_moe::pluginLogger());
  nccl_moe::setPluginSmReserve(3, -1, 0);  // detached: stored, not forwarded
  nccl_moe::setPluginSmReserve(-1, -1, 0);
  {
    std::lock_guard<std::mutex> lock(g_hook_mutex);
    EXPECT_EQ(replayed + 1, g_hook_calls.size());
  }
}

// ==========================================================================================================
// Bridge to the library (needs this executable to export ncclMoePluginAttach: ENABLE_EXPORTS)
// ==========================================================================================================

#define REQUIRE_BRIDGE()                                                                          \
  do {                                                                                            \
    REQUIRE_PLUGIN();                                                                             \
    if (!bridgeExported()) GTEST_SKIP() << "test executable does not export ncclMoePluginAttach"; \
  } while (0)

TEST(PluginBridge, RegistryAndLoggerFollowCommunicatorLifetime) {
  REQUIRE_BRIDGE();
  Plugin p = openPlugin();
  ASSERT_NE(nullptr, p.v5);
  ASSERT_EQ(nullptr, nccl_moe::pluginLogger());
  EXPECT_FALSE(nccl_moe::pluginAttached());
  clearLog();

  void* ctx = nullptr;
  ncclNvlDomainInfo_v5_t nvl{2, 4, 4};
  ncclTunerConstants_v5_t constants{};
  ASSERT_EQ(ncclSuccess, p.v5->init(&ctx, 0xABCDEF01ULL, 8, 2, fakeLogger, &nvl, &constants));
  EXPECT_TRUE(nccl_moe::pluginAttached());
  EXPECT_EQ(1u, logLinesContaining("libnccl_moe attached").size());

  // NCCL-MoE's own lines now go through NCCL's logger.
  ncclMoeNcclLogger_t logger = nccl_moe::pluginLogger();
  ASSERT_NE(nullptr, logger);
  logger(nccl_moe::kNcclLogInfo, nccl_moe::kNcclSubsysInit, __FILE__, __LINE__, "NCCL-MoE %s %d", "hello", 7);
  const auto hello = logLinesContaining("NCCL-MoE hello 7");
  ASSERT_EQ(1u, hello.size());
  EXPECT_EQ(NCCL_LOG_INFO, hello[0].level);

  nccl_moe::RegisteredComm rc;
  ASSERT_TRUE(nccl_moe::lookupRegisteredComm(0xABCDEF01ULL, &rc));
  EXPECT_EQ(8, rc.num_ranks);
  EXPECT_EQ(2, rc.num_nodes);
  EXPECT_EQ(2, rc.num_nvl_domains);
  EXPECT_EQ(4, rc.min_ranks_per_nvl_domain);
  EXPECT_EQ(4, rc.max_ranks_per_nvl_domain);
  EXPECT_EQ(5, rc.tuner_version);
  EXPECT_EQ(1, rc.num_local_ranks);
  EXPECT_FALSE(nccl_moe::lookupRegisteredComm(0x42, &rc));

  // A second rank of the same communicator in this process (ncclCommInitAll), and another 8-rank comm.
  void* ctx_same = nullptr;
  ASSERT_EQ(ncclSuccess, p.v6->init(&ctx_same, 0xABCDEF01ULL, 8, 2, fakeLogger, &nvl, &constants));
  ASSERT_TRUE(nccl_moe::lookupRegisteredComm(0xABCDEF01ULL, &rc));
  EXPECT_EQ(2, rc.num_local_ranks);
  EXPECT_EQ(1, nccl_moe::registeredCommCount());
  EXPECT_EQ(1, nccl_moe::findRegisteredComms(8, -1, &rc));
  void* ctx_other = nullptr;
  ASSERT_EQ(ncclSuccess, p.v6->init(&ctx_other, 0x99ULL, 8, 1, fakeLogger, nullptr, &constants));
  EXPECT_EQ(2, nccl_moe::findRegisteredComms(8, -1, &rc));  // ambiguous by shape
  EXPECT_EQ(0x99ULL, rc.comm_hash);                         // the newest first
  EXPECT_EQ(-1, rc.num_nvl_domains);                        // NCCL gave no NVLink-domain info
  EXPECT_EQ(0, nccl_moe::findRegisteredComms(4, -1, nullptr));

  EXPECT_EQ(ncclSuccess, p.v6->finalize(ctx_other));
  EXPECT_EQ(ncclSuccess, p.v5->finalize(ctx));
  ASSERT_TRUE(nccl_moe::lookupRegisteredComm(0xABCDEF01ULL, &rc));
  EXPECT_EQ(1, rc.num_local_ranks);
  EXPECT_NE(nullptr, nccl_moe::pluginLogger());  // a communicator is still alive
  EXPECT_EQ(ncclSuccess, p.v6->finalize(ctx_same));
  EXPECT_EQ(0, nccl_moe::registeredCommCount());
  EXPECT_EQ(nullptr, nccl_moe::pluginLogger());  // detached with the last communicator
  EXPECT_FALSE(nccl_moe::pluginAttached());
  dlclose(p.handle);
}

TEST(PluginBridge, ReservationFromTheLibraryCapsChannels) {
  REQUIRE_BRIDGE();
  harness::ScopedEnv env("NCCL_MOE_SM_RESERVE", nullptr);
  // Registered before NCCL created any communicator: replayed into the plugin at attach.
  nccl_moe::setPluginSmReserve(-1, 100, 132);
  Plugin p = openPlugin();
  clearLog();
  void* ctx = initV5(p, 0x77);
  ASSERT_NE(nullptr, ctx);
  EXPECT_EQ(1u, logLinesContaining("SM reserve 100 (registered) -> channel cap 32").size());

  EXPECT_EQ(32, collChannels(p.v5, ctx, size_t{1} << 30, NCCL_MOE_ABI_ALGO_RING));
  EXPECT_EQ(32, collChannels(p.v5, ctx, size_t{1} << 30, NCCL_MOE_ABI_ALGO_TREE));
  EXPECT_EQ(0, collChannels(p.v5, ctx, 32 * 4096, NCCL_MOE_ABI_ALGO_RING));  // NCCL already uses <= 32
  EXPECT_EQ(32, collChannels(p.v5, ctx, 33 * 4096, NCCL_MOE_ABI_ALGO_RING));
  EXPECT_EQ(32, collChannels(p.v5, ctx, 8, NCCL_MOE_ABI_ALGO_NVLS));  // NVLS ignores the size
  EXPECT_EQ(32, collChannels(p.v5, ctx, 8, NCCL_MOE_ABI_ALGO_PAT));

  // Changes reach live communicators at once.
  nccl_moe::setPluginSmReserve(-1, 128, 132);
  EXPECT_EQ(4, collChannels(p.v5, ctx, size_t{1} << 30, NCCL_MOE_ABI_ALGO_RING));
  nccl_moe::setPluginSmReserve(-1, 24, 132);  // 108 free: nothing to cap
  EXPECT_EQ(0, collChannels(p.v5, ctx, size_t{1} << 30, NCCL_MOE_ABI_ALGO_NVLS));
  nccl_moe::setPluginSmReserve(-1, 200, 132);  // more than the GPU: 1 channel
  EXPECT_EQ(1, collChannels(p.v5, ctx, size_t{1} << 30, NCCL_MOE_ABI_ALGO_RING));
  nccl_moe::setPluginSmReserve(-1, -1, 132);  // cleared
  EXPECT_EQ(0, collChannels(p.v5, ctx, size_t{1} << 30, NCCL_MOE_ABI_ALGO_NVLS));
  // A device the context is not on (on a CPU machine the context has no device) does not apply.
  nccl_moe::setPluginSmReserve(63, 120, 132);
  EXPECT_EQ(0, collChannels(p.v5, ctx, size_t{1} << 30, NCCL_MOE_ABI_ALGO_NVLS));
  nccl_moe::setPluginSmReserve(63, -1, 0);
  EXPECT_EQ(ncclSuccess, p.v5->finalize(ctx));

  // The environment overrides the registered value (operator's word).
  nccl_moe::setPluginSmReserve(-1, 100, 132);
  {
    harness::ScopedEnv reserve("NCCL_MOE_SM_RESERVE", "120");
    void* ctx_env = initV5(p, 0x78);
    EXPECT_EQ(12, collChannels(p.v5, ctx_env, size_t{1} << 30, NCCL_MOE_ABI_ALGO_RING));
    EXPECT_EQ(ncclSuccess, p.v5->finalize(ctx_env));
  }
  {
    harness::ScopedEnv reserve("NCCL_MOE_SM_RESERVE", "0");  // explicit 0: no cap despite the registration
    void* ctx_env = initV5(p, 0x79);
    EXPECT_EQ(0, collChannels(p.v5, ctx_env, size_t{1} << 30, NCCL_MOE_ABI_ALGO_NVLS));
    EXPECT_EQ(ncclSuccess, p.v5->finalize(ctx_env));
  }
  nccl_moe::setPluginSmReserve(-1, -1, 0);
  dlclose(p.handle);
}

TEST(PluginBridge, NonDefaultNcclThreadSettingsAlwaysWriteTheCap) {
  REQUIRE_BRIDGE();
  harness::ScopedEnv threads("NCCL_NTHREADS", "64");
  nccl_moe::setPluginSmReserve(-1, 120, 132);
  Plugin p = openPlugin();
  void* ctx = initV5(p, 0x80);
  EXPECT_EQ(12, collChannels(p.v5, ctx, 64, NCCL_MOE_ABI_ALGO_RING));
  EXPECT_EQ(ncclSuccess, p.v5->finalize(ctx));
  nccl_moe::setPluginSmReserve(-1, -1, 0);
  dlclose(p.handle);
}

}  // namespace
