// CPU-kernel helpers: function multi-versioning so that the vectorisable loops run with the widest SIMD the
// machine has (AVX-512, AVX2, or the x86-64 baseline) from one portable build; `#pragma omp simd`
// lets GCC vectorise the max/sum reductions (threads: common/threads.h).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(SMTC_NO_CLONES)
#define SMTC_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SMTC_CPU_CLONES
#endif

#if defined(__GNUC__)
#define SMTC_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SMTC_ALWAYS_INLINE inline
#endif

#define SMTC_STR(x) #x
#if defined(_OPENMP) || defined(__GNUC__)
#define SMTC_SIMD _Pragma("omp simd")
#define SMTC_SIMD_MAX(v) _Pragma(SMTC_STR(omp simd reduction(max : v)))
#define SMTC_SIMD_SUM(v) _Pragma(SMTC_STR(omp simd reduction(+ : v)))
#define SMTC_SIMD_SUM2(a, b) _Pragma(SMTC_STR(omp simd reduction(+ : a, b)))
#define SMTC_SIMD_SUM4(a, b, c, d) _Pragma(SMTC_STR(omp simd reduction(+ : a, b, c, d)))
#define SMTC_SIMD_SUM_MIN(s, mn) _Pragma(SMTC_STR(omp simd reduction(+ : s) reduction(min : mn)))
#else
#define SMTC_SIMD
#define SMTC_SIMD_MAX(v)
#define SMTC_SIMD_SUM(v)
#define SMTC_SIMD_SUM2(a, b)
#define SMTC_SIMD_SUM4(a, b, c, d)
#define SMTC_SIMD_SUM_MIN(s, mn)
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace smtc {

// A fresh output of ~100 MB (the (384, 256, 256) plan) costs more in 4 KB page faults on first touch than the
// kernel's arithmetic (performance_anchors.md §6: 25 ms vs 4 ms for a write). Asking for transparent huge
// pages on the buffer's 2 MB-aligned interior before the first write cuts that; where THP is off, or on
// other systems, this is a no-op.
inline void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

// Per-thread scratch vectors of the hot loops, 64-byte aligned, with every sub-array starting on a 64-byte
// boundary (offsets rounded by padded()). A loop such as `colsum[m] += u_n * K[n, m]` loads and stores its
// accumulator for every row; from std::vector's 16-byte-aligned storage each 64-byte AVX-512 access would
// straddle two cache lines.
template <typename T> struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheLineAllocator() = default;
  template <typename U> CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) noexcept { ::operator delete(p, kAlign); }
  template <typename U> bool operator==(const CacheLineAllocator<U>&) const noexcept { return true; }
  template <typename U> bool operator!=(const CacheLineAllocator<U>&) const noexcept { return false; }
};
template <typename T> using aligned_vector = std::vector<T, CacheLineAllocator<T>>;

// n rounded up to a whole number of 64-byte lines of T.
template <typename T> constexpr int64_t padded(int64_t n) {
  constexpr int64_t per_line = 64 / static_cast<int64_t>(sizeof(T));
  return (n + per_line - 1) / per_line * per_line;
}

// A stored input's value as the kernels compute on it: float/double as stored; bf16 (its raw bits, uint16_t) widened
// exactly to float, of which it is the top 16 bits. For the bf16 tensors of a bf16 forward that the float32 kernels
// read directly (transport_loss's keys, slot_aggregate's values).
inline float stored_value(float x) { return x; }
inline double stored_value(double x) { return x; }
inline float stored_value(uint16_t bits) {
  const uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace smtc
