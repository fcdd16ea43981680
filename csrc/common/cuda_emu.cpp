// The CPU execution tier's scheduler (cuda_emu.h says what is emulated and how faithfully).
//
// Each CUDA thread of a block is a fiber with its own stack; a hand-written x86-64 context switch (ucontext
// elsewhere) moves between the scheduler and the fibers. A fiber runs until it returns, waits at __syncthreads,
// or waits in a warp collective for the other lanes of its mask; the scheduler then runs the next runnable
// fiber in the schedule's order. Blocks run one after another, on SMTC_FAST_EMU_THREADS OS threads (default 1):
// with more than one, blocks of a launch run concurrently, so ThreadSanitizer sees races between blocks on
// global memory, and the host atomics behind atomicAdd are exercised for real.
#include "common/cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, std::size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, std::size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, std::size_t size);
}
#endif
#if defined(__SANITIZE_THREAD__)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
}
#endif

namespace cuda_emu {

thread_local ThreadView* g_view = nullptr;

namespace {

// ------------------------------------------------------------------------------------------- context switch
#if defined(__x86_64__)
extern "C" void smtc_cuda_emu_switch(void** save_sp, void* new_sp);
// Saves the callee-saved registers of the System V ABI on the current stack, stores the stack pointer in
// *save_sp, loads new_sp and restores the registers saved there. A fresh stack is laid out so that the `ret`
// enters fiber_main with the alignment of a call.
asm(R"(
  .text
  .globl smtc_cuda_emu_switch
  .hidden smtc_cuda_emu_switch
  .type smtc_cuda_emu_switch,@function
smtc_cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size smtc_cuda_emu_switch, .-smtc_cuda_emu_switch
)");
struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { smtc_cuda_emu_switch(&from.sp, to.sp); }
inline void make_context(Context& c, char* stack, std::size_t size, void (*entry)()) {
  auto top = reinterpret_cast<std::uintptr_t>(stack + size) & ~std::uintptr_t(15);
  auto* p = reinterpret_cast<void**>(top);
  *--p = nullptr;                               // fake return address of fiber_main (it never returns)
  *--p = reinterpret_cast<void*>(entry);        // popped by `ret`
  for (int i = 0; i < 6; ++i) *--p = nullptr;   // rbp rbx r12 r13 r14 r15
  c.sp = p;
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, char* stack, std::size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// ------------------------------------------------------------------------------------------- the block's state
enum class State { kRunnable, kBarrier, kWarp, kDone };

struct Fiber {
  Context ctx;
  ThreadView view;
  State state = State::kRunnable;
  int linear = 0, warp = 0, lane = 0;
  const char* file = nullptr;  // where it waits
  int line = 0;
  std::uint64_t value = 0, result = 0;
  int arg = 0;
  char* stack = nullptr;
  void* asan_fake = nullptr;
  void* tsan_fiber = nullptr;
};

struct PendingWarpOp {
  WarpOp op;
  const char* file;
  int line;
  unsigned mask, arrived;
  int width;
};

struct Block {
  const char* kernel = nullptr;
  const char* launch_file = nullptr;
  int launch_line = 0;
  uint3 block_idx{0, 0, 0};
  int nthreads = 0, live = 0, at_barrier = 0;
  std::vector<Fiber> fibers;
  std::vector<int> order;
  std::vector<std::vector<PendingWarpOp>> warps;  // per warp, the collectives waiting for lanes
  Context sched;
  Fiber* current = nullptr;
  std::string error;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  std::uint64_t rng = 0;
  bool shuffle = false;
  const void* sched_stack_bottom = nullptr;
  std::size_t sched_stack_size = 0;
  void* tsan_sched = nullptr;
};

thread_local Block* g_block = nullptr;

// ------------------------------------------------------------------------------------------- errors and state
thread_local cudaError_t g_last_error = cudaSuccess;
thread_local std::string g_last_message;
std::atomic<std::uint64_t> g_launches{0};
std::mutex g_attr_mutex;
std::unordered_map<const void*, std::size_t>& max_dynamic_shared() {
  static std::unordered_map<const void*, std::size_t> m;
  return m;
}

void record_error(cudaError_t code, const std::string& msg) {
  g_last_error = code;
  g_last_message = msg;
}

std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <typename V> void shuffle_in_place(V& v, std::uint64_t& rng) {
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[splitmix(rng) % i]);
}

struct Schedule {
  enum Kind { kForward, kReverse, kRandom } kind = kForward;
  std::uint64_t seed = 0;
  std::string error;
};

Schedule read_schedule() {
  Schedule s;
  const char* env = std::getenv("SMTC_FAST_EMU_SCHEDULE");
  const std::string v = env ? env : "forward";
  if (v.empty() || v == "forward") {
    s.kind = Schedule::kForward;
  } else if (v == "reverse") {
    s.kind = Schedule::kReverse;
  } else if (v.rfind("random", 0) == 0) {
    s.kind = Schedule::kRandom;
    if (v.size() > 6) {
      char* end = nullptr;
      const char* digits = v.c_str() + 7;
      s.seed = std::strtoull(digits, &end, 10);
      if (v[6] != ':' || end == digits || *end != '\0') s.error = "SMTC_FAST_EMU_SCHEDULE='" + v + "' is not forward, reverse or random:SEED";
    }
  } else {
    s.error = "SMTC_FAST_EMU_SCHEDULE='" + v + "' is not forward, reverse or random:SEED";
  }
  return s;
}

std::string where(const Block& b) {
  std::ostringstream o;
  o << "kernel " << b.kernel << " (launched at " << b.launch_file << ":" << b.launch_line << "), block ("
    << b.block_idx.x << "," << b.block_idx.y << "," << b.block_idx.z << ")";
  return o.str();
}

std::string thread_name(const Fiber& f) {
  std::ostringstream o;
  o << "thread (" << f.view.thread_idx.x << "," << f.view.thread_idx.y << "," << f.view.thread_idx.z << ")";
  return o.str();
}

// -------------------------------------------------------------------------------------------- stacks (per OS thread)
std::size_t stack_bytes() {
  static const std::size_t bytes = [] {
    const char* env = std::getenv("SMTC_FAST_EMU_STACK_KB");
    std::size_t kb = env ? std::strtoull(env, nullptr, 10) : 0;
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    if (kb == 0) kb = 1024;
#else
    if (kb == 0) kb = 256;
#endif
    return kb * 1024;
  }();
  return bytes;
}

struct StackPool {
  std::vector<char*> stacks;
  ~StackPool() {
    for (char* s : stacks) munmap(s, stack_bytes());
  }
  char* get(std::size_t i) {
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, stack_bytes(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("emulated CUDA: cannot map a fiber stack");
      mprotect(p, static_cast<std::size_t>(sysconf(_SC_PAGESIZE)), PROT_NONE);  // guard page: overflow faults
      stacks.push_back(static_cast<char*>(p));
    }
    return stacks[i];
  }
};
thread_local StackPool g_stacks;

// -------------------------------------------------------------------------------------------- switching
void enter_fiber(Block& b, Fiber& f) {
  b.current = &f;
  g_view = &f.view;
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, stack_bytes());
#endif
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(f.tsan_fiber, 0);
#endif
  switch_context(b.sched, f.ctx);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_view = nullptr;
  b.current = nullptr;
}

// From a fiber back to the scheduler. A fiber that is done never comes back.
void leave_fiber(Block& b, Fiber& f, bool done) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(done ? nullptr : &f.asan_fake, b.sched_stack_bottom, b.sched_stack_size);
#endif
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(b.tsan_sched, 0);
#endif
  switch_context(f.ctx, b.sched);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.asan_fake, nullptr, nullptr);
#endif
  (void)done;
}

[[noreturn]] void fiber_main() {
  Block& b = *g_block;
  Fiber& f = *b.current;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack_bottom, &b.sched_stack_size);
#endif
  b.body(b.body_ctx);
  f.state = State::kDone;
  --b.live;
  leave_fiber(b, f, true);
  std::abort();  // a finished fiber is never resumed
}

// An emulated fault inside a fiber: record it and park the fiber for good (the scheduler abandons the block).
void fault(Block& b, Fiber& f, const std::string& msg) {
  if (b.error.empty()) b.error = msg;
  f.state = State::kDone;
  leave_fiber(b, f, false);
  std::abort();
}

// -------------------------------------------------------------------------------------------- the scheduler
void release_barrier(Block& b) {
  const Fiber* first = nullptr;
  for (const Fiber& f : b.fibers) {
    if (f.state != State::kBarrier) continue;
    if (!first) {
      first = &f;
    } else if (f.line != first->line || std::strcmp(f.file, first->file) != 0) {
      std::ostringstream o;
      o << "emulated CUDA: divergent __syncthreads in " << where(b) << ": " << thread_name(*first) << " waits at "
        << first->file << ":" << first->line << " while " << thread_name(f) << " waits at " << f.file << ":" << f.line;
      b.error = o.str();
      return;
    }
  }
  for (Fiber& f : b.fibers)
    if (f.state == State::kBarrier) f.state = State::kRunnable;
  b.at_barrier = 0;
  if (b.shuffle) shuffle_in_place(b.order, b.rng);
}

void report_deadlock(Block& b) {
  std::ostringstream o;
  o << "emulated CUDA: deadlock in " << where(b) << ": no thread can proceed;";
  int shown = 0;
  for (const Fiber& f : b.fibers) {
    if (f.state == State::kDone) continue;
    if (shown++ == 8) {
      o << " ...";
      break;
    }
    o << " " << thread_name(f) << (f.state == State::kBarrier ? " at __syncthreads " : " in a warp collective at ")
      << f.file << ":" << f.line;
    if (f.state == State::kWarp) {
      for (const PendingWarpOp& p : b.warps[f.warp]) {
        if (!(p.mask >> f.lane & 1u)) continue;
        o << " (mask 0x" << std::hex << p.mask << ", lanes arrived 0x" << p.arrived << std::dec << ")";
      }
    }
    o << ";";
  }
  b.error = o.str();
}

void run_block(Block& b) {
  const std::size_t guard = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  for (Fiber& f : b.fibers) {
    f.state = State::kRunnable;
    f.view.block_idx = b.block_idx;
#if defined(__SANITIZE_ADDRESS__)
    // A fiber abandoned after a fault left its frames' redzones poisoned; the reused stack starts clean.
    __asan_unpoison_memory_region(f.stack + guard, stack_bytes() - guard);
#endif
    make_context(f.ctx, f.stack, stack_bytes(), fiber_main);
  }
  (void)guard;
  for (auto& w : b.warps) w.clear();
  b.live = b.nthreads;
  b.at_barrier = 0;
  for (;;) {
    for (int i : b.order) {
      Fiber& f = b.fibers[i];
      if (f.state != State::kRunnable) continue;
      enter_fiber(b, f);
      if (!b.error.empty()) return;
    }
    if (b.live == 0) return;
    if (b.at_barrier == b.live) {
      release_barrier(b);
      if (!b.error.empty()) return;
      continue;
    }
    bool runnable = false;
    for (const Fiber& f : b.fibers) runnable |= f.state == State::kRunnable;
    if (!runnable) {
      report_deadlock(b);
      return;
    }
  }
}

}  // namespace

// -------------------------------------------------------------------------------------------- device calls
void syncthreads(const char* file, int line) {
  Block& b = *g_block;
  Fiber& f = *b.current;
  f.state = State::kBarrier;
  f.file = file;
  f.line = line;
  ++b.at_barrier;
  leave_fiber(b, f, false);
}

void syncwarp(const char* file, int line, unsigned mask) { warp_collective(WarpOp::kSync, file, line, mask, 0, 0, 32); }

std::uint64_t warp_collective(WarpOp op, const char* file, int line, unsigned mask, std::uint64_t value, int arg,
                              int width) {
  Block& b = *g_block;
  Fiber& f = *b.current;
  auto fail = [&](const std::string& what) {
    std::ostringstream o;
    o << "emulated CUDA: " << what << " in " << where(b) << ", " << thread_name(f) << " (warp " << f.warp << ", lane "
      << f.lane << ") at " << file << ":" << line;
    fault(b, f, o.str());
  };
  if (!(mask >> f.lane & 1u)) fail("a warp collective whose mask does not name the calling lane");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail("a shuffle width that is not a power of two <= 32");
  const int base = f.warp * kWarpSize;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    if (base + l >= b.nthreads) fail("a warp collective in a partial warp whose mask names lanes that do not exist");
    if (b.fibers[base + l].state == State::kDone) fail("a warp collective whose mask names lane " + std::to_string(l) + ", which has returned");
  }
  auto& pending = b.warps[f.warp];
  PendingWarpOp* p = nullptr;
  // Collectives are told apart by their masks: lanes of disjoint (or, in turn, overlapping) masks may wait in
  // different collectives, as two half-warps shuffling apart do. A lane named by a collective that waits somewhere
  // else never arrives: that shows up as a deadlock.
  for (PendingWarpOp& q : pending)
    if (q.mask == mask) p = &q;
  if (!p) {
    pending.push_back(PendingWarpOp{op, file, line, mask, 0u, width});
    p = &pending.back();
  } else if (p->op != op || p->line != line || std::strcmp(p->file, file) != 0 || p->width != width) {
    std::ostringstream o;
    o << "lanes of mask 0x" << std::hex << mask << std::dec << " in different warp collectives (" << p->file << ":"
      << p->line << " and this one)";
    fail(o.str());
  }
  f.value = value;
  f.arg = arg;
  p->arrived |= 1u << f.lane;
  if (p->arrived != mask) {
    f.state = State::kWarp;
    f.file = file;
    f.line = line;
    leave_fiber(b, f, false);
    return f.result;
  }
  // The last lane to arrive computes every lane's result and wakes the others.
  unsigned ballot = 0;
  if (op == WarpOp::kBallot)
    for (int l = 0; l < kWarpSize; ++l)
      if ((mask >> l & 1u) && b.fibers[base + l].value) ballot |= 1u << l;
  for (int l = 0; l < kWarpSize; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& g = b.fibers[base + l];
    const int seg = l / width * width;
    int src = l;
    switch (op) {
      case WarpOp::kSync: break;
      case WarpOp::kBallot: break;
      case WarpOp::kShflXor: src = l ^ g.arg; src = src >= seg + width ? l : src; break;
      case WarpOp::kShflDown: src = l + g.arg; src = src >= seg + width ? l : src; break;
      case WarpOp::kShflUp: src = l - g.arg; src = src < seg ? l : src; break;
      case WarpOp::kShflIdx: src = seg + ((g.arg % width) + width) % width; break;
    }
    if (src < 0 || src >= kWarpSize || !(mask >> src & 1u)) {
      fail("a shuffle reading lane " + std::to_string(src) + ", which is not in the mask (undefined on a GPU)");
    }
    g.result = op == WarpOp::kBallot ? ballot : op == WarpOp::kSync ? 0 : b.fibers[base + src].value;
    if (&g != &f) g.state = State::kRunnable;
  }
  pending.erase(pending.begin() + (p - pending.data()));
  return f.result;
}

// -------------------------------------------------------------------------------------------- host calls
cudaError_t get_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  return g_last_message.c_str();
}

cudaError_t set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<std::size_t>(bytes) > kMaxDynamicShared) {
    record_error(cudaErrorInvalidValue, "emulated CUDA: cudaFuncSetAttribute(MaxDynamicSharedMemorySize = " +
                                            std::to_string(bytes) + ") exceeds the device's 227 KB per block");
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  max_dynamic_shared()[kernel] = static_cast<std::size_t>(bytes);
  return cudaSuccess;
}

std::uint64_t launch_count() { return g_launches.load(); }

std::string schedule_name() {
  const Schedule s = read_schedule();
  if (!s.error.empty()) return s.error;
  if (s.kind == Schedule::kForward) return "forward";
  if (s.kind == Schedule::kReverse) return "reverse";
  return "random:" + std::to_string(s.seed);
}

void run_launch(const char* kernel_name, const char* file, int line, const void* kernel, dim3 grid, dim3 block,
                std::size_t dynamic_shared, void (*body)(void*), void* ctx) {
  g_launches.fetch_add(1);
  std::ostringstream head;
  head << "emulated CUDA: launch of " << kernel_name << " at " << file << ":" << line << " with grid (" << grid.x
       << "," << grid.y << "," << grid.z << "), block (" << block.x << "," << block.y << "," << block.z << "), "
       << dynamic_shared << " B dynamic shared memory: ";
  const std::uint64_t threads = std::uint64_t(block.x) * block.y * block.z;
  std::string bad;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) bad = "a zero-size grid or block";
  else if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > 1024) bad = "more than 1024 threads per block (or a block dimension over its limit: x, y <= 1024, z <= 64)";
  else if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) bad = "a grid dimension over its limit (x <= 2^31 - 1, y and z <= 65535)";
  if (!bad.empty()) {
    record_error(cudaErrorInvalidConfiguration, head.str() + "invalid configuration argument: " + bad);
    return;
  }
  std::size_t smem_limit = kDefaultDynamicShared;
  {
    std::lock_guard<std::mutex> lock(g_attr_mutex);
    auto it = max_dynamic_shared().find(kernel);
    if (it != max_dynamic_shared().end()) smem_limit = std::max(smem_limit, it->second);
  }
  if (dynamic_shared > smem_limit) {
    record_error(cudaErrorInvalidValue, head.str() + "more dynamic shared memory than the kernel may use (" +
                                            std::to_string(smem_limit) + " B; above 48 KB the launcher must opt in "
                                            "with cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))");
    return;
  }
  const Schedule sched = read_schedule();
  if (!sched.error.empty()) {
    record_error(cudaErrorInvalidValue, head.str() + sched.error);
    return;
  }

  const std::uint64_t nblocks = std::uint64_t(grid.x) * grid.y * grid.z;
  std::vector<std::uint64_t> block_order;
  const bool permute = sched.kind != Schedule::kForward && nblocks <= (1u << 22);
  if (permute) {
    block_order.resize(nblocks);
    for (std::uint64_t i = 0; i < nblocks; ++i) block_order[i] = i;
    if (sched.kind == Schedule::kReverse) std::reverse(block_order.begin(), block_order.end());
    std::uint64_t rng = sched.seed * 0x2545f4914f6cdd1dull + g_launches.load();
    if (sched.kind == Schedule::kRandom) shuffle_in_place(block_order, rng);
  }
  const char* env_threads = std::getenv("SMTC_FAST_EMU_THREADS");
  const int os_threads = std::max(1, std::min(64, env_threads ? std::atoi(env_threads) : 1));

  std::mutex error_mutex;
  std::string first_error;
  std::atomic<std::uint64_t> next{0};
  auto worker = [&](int worker_id) {
    Block b;
    b.kernel = kernel_name;
    b.launch_file = file;
    b.launch_line = line;
    b.body = body;
    b.body_ctx = ctx;
    b.nthreads = static_cast<int>(threads);
    b.fibers.resize(threads);
    b.warps.resize((threads + kWarpSize - 1) / kWarpSize);
    b.order.resize(threads);
    b.shuffle = sched.kind == Schedule::kRandom;
    b.rng = sched.seed ^ (0x9e3779b97f4a7c15ull * (worker_id + 1)) ^ g_launches.load();
    std::vector<unsigned char> shared(dynamic_shared + 16);
    auto* shared_base = reinterpret_cast<unsigned char*>((reinterpret_cast<std::uintptr_t>(shared.data()) + 15) & ~std::uintptr_t(15));
    for (std::uint64_t t = 0; t < threads; ++t) {
      Fiber& f = b.fibers[t];
      f.linear = static_cast<int>(t);
      f.warp = static_cast<int>(t / kWarpSize);
      f.lane = static_cast<int>(t % kWarpSize);
      f.view.thread_idx = uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                                static_cast<unsigned>(t / (std::uint64_t(block.x) * block.y))};
      f.view.block_dim = uint3{block.x, block.y, block.z};
      f.view.grid_dim = uint3{grid.x, grid.y, grid.z};
      f.view.dynamic_shared = shared_base;
      f.stack = g_stacks.get(t);
#if defined(__SANITIZE_THREAD__)
      f.tsan_fiber = __tsan_create_fiber(0);
#endif
    }
#if defined(__SANITIZE_THREAD__)
    b.tsan_sched = __tsan_get_current_fiber();
#endif
    Block* saved = g_block;
    g_block = &b;
    for (;;) {
      const std::uint64_t k = next.fetch_add(1);
      if (k >= nblocks) break;
      {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!first_error.empty()) break;
      }
      const std::uint64_t id = permute ? block_order[k] : k;
      b.block_idx = uint3{static_cast<unsigned>(id % grid.x), static_cast<unsigned>(id / grid.x % grid.y),
                          static_cast<unsigned>(id / (std::uint64_t(grid.x) * grid.y))};
      for (int t = 0; t < b.nthreads; ++t) b.order[t] = sched.kind == Schedule::kReverse ? b.nthreads - 1 - t : t;
      if (b.shuffle) shuffle_in_place(b.order, b.rng);
      std::memset(shared_base, 0xff, dynamic_shared);  // NaN poison: a read before any write shows
      b.error.clear();
      run_block(b);
      if (!b.error.empty()) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (first_error.empty()) first_error = b.error;
        break;
      }
    }
    g_block = saved;
#if defined(__SANITIZE_THREAD__)
    for (Fiber& f : b.fibers) __tsan_destroy_fiber(f.tsan_fiber);
#endif
  };
  if (os_threads == 1 || nblocks == 1) {
    worker(0);
  } else {
    std::vector<std::thread> pool;
    for (int i = 0; i < os_threads; ++i) pool.emplace_back(worker, i);
    for (auto& t : pool) t.join();
  }
  if (!first_error.empty()) record_error(cudaErrorLaunchFailure, first_error);
}

}  // namespace cuda_emu
