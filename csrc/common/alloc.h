// Output allocation for the CPU kernels (torch side; include from .cpp files only).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>

#include "common/cpu.h"

namespace smtc {

// A cache of the CPU kernels' large output buffers (>= 4 MB), in the spirit of PyTorch's CUDA caching allocator.
//
// Why: on this class of machine (a KVM guest) the first touch of fresh memory costs more than the kernels'
// arithmetic. A fresh 50 MB d_values takes ~17 ms of 4 KB page faults (~6 ms with transparent huge pages), while
// writing into memory that is already mapped takes ~1.7 ms (performance_anchors.md §6 measured the same effect on
// the references' 100 MB temporaries). glibc hands every block above its mmap threshold (at most 32 MB by default) back to the
// OS on free, so a training loop pays those faults again at every step for the same shapes.
//
// Freed output blocks are kept, keyed by their size rounded up to 2 MB, and handed out again for the same size.
// The bytes kept are capped (SMTC_FAST_CPU_CACHE_MB, default 1024; 0 turns the cache off); past the cap the
// oldest kept blocks are freed first. smtc_fast.release_cpu_cache() frees them all. New blocks are 2 MB aligned
// and advised for transparent huge pages (common/cpu.h). Only the kernels' own outputs come from here; the rest
// of torch is untouched.
class OutputCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(4) << 20;
  static constexpr size_t kAlign = size_t(2) << 20;

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors may be freed after static teardown
    return *cache;
  }

  // The cap in bytes (0: off), read once from SMTC_FAST_CPU_CACHE_MB.
  static size_t limit_bytes() {
    static const size_t limit = [] {
      const char* env = std::getenv("SMTC_FAST_CPU_CACHE_MB");
      const long long mb = env ? std::atoll(env) : 1024;
      return mb > 0 ? size_t(mb) << 20 : size_t(0);
    }();
    return limit;
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kAlign - 1) / kAlign * kAlign;
    void* p = take(bytes);
    if (p == nullptr) {
      if (posix_memalign(&p, kAlign, bytes) != 0) p = nullptr;
      TORCH_CHECK(p != nullptr, "smtc_fast: out of CPU memory allocating ", n, " bytes");
      advise_huge_pages(p, bytes);
    }
    return {p, new Block{p, bytes}, &OutputCache::on_free, at::Device(at::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  // Frees every kept block; returns the bytes given back to the OS.
  size_t release() {
    std::list<Block> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      out.swap(kept_);
      kept_bytes_ = 0;
    }
    size_t total = 0;
    for (const Block& b : out) {
      total += b.bytes;
      std::free(b.ptr);
    }
    return total;
  }

  size_t kept_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return kept_bytes_;
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  // A kept block of exactly `bytes`, newest first (its pages are the likeliest to be warm), or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = kept_.begin(); it != kept_.end(); ++it) {
      if (it->bytes == bytes) {
        void* p = it->ptr;
        kept_bytes_ -= bytes;
        kept_.erase(it);
        return p;
      }
    }
    return nullptr;
  }

  static void on_free(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    get().keep(*b);
    delete b;
  }

  void keep(const Block& b) {
    std::list<Block> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const size_t limit = limit_bytes();
      if (b.bytes > limit) {
        evicted.push_back(b);
      } else {
        while (kept_bytes_ + b.bytes > limit) {  // the oldest go first
          kept_bytes_ -= kept_.back().bytes;
          evicted.splice(evicted.end(), kept_, std::prev(kept_.end()));
        }
        kept_.push_front(b);
        kept_bytes_ += b.bytes;
      }
    }
    for (const Block& e : evicted) std::free(e.ptr);  // outside the lock: munmap can take a while
  }

  std::mutex mu_;
  std::list<Block> kept_;  // newest first; a handful of blocks, so a linear search is enough
  size_t kept_bytes_ = 0;
};

// at::empty for the CPU kernels' outputs: large CPU buffers come from the OutputCache above (or, with the cache
// off, from at::empty with transparent huge pages advised on them).
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t nbytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  const bool large_cpu = options.device().is_cpu() && nbytes >= OutputCache::kMinBytes;
  if (large_cpu && OutputCache::limit_bytes() > 0) {
    return at::detail::empty_generic(sizes, &OutputCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
  }
  auto t = at::empty(sizes, options);
  if (large_cpu) advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

}  // namespace smtc
