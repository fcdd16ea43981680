// The CPU execution tier for the CUDA sources: what a .cu file sees of CUDA when it is compiled by the host C++
// compiler with SMTC_CUDA_EMU defined (setup.py builds every csrc/**/*.cu a second time this way; see
// cuda_emu.cpp for the scheduler). The very same kernel source then runs on the CPU, one cooperative fiber per
// CUDA thread, so CI executes its indexing, synchronisation and arithmetic where no GPU exists.
//
// What is emulated, and how faithfully:
//   - threadIdx/blockIdx/blockDim/gridDim: per fiber. Blocks run one after another; a block's threads are fibers
//     that run until they block (barrier, warp collective) or return, in the order SMTC_FAST_EMU_SCHEDULE asks
//     (forward | reverse | random:SEED), re-drawn after every barrier for random schedules.
//   - __syncthreads(): a real barrier counting arrivals of the live threads (threads that returned no longer
//     count, as on Volta and later). Threads waiting at two different source lines (a divergent barrier) and a
//     block in which no thread can move (deadlock) are errors naming the kernel, the lines and the threads.
//   - __shfl_*_sync, __syncwarp, __ballot_sync: real exchanges among the lanes named by the mask, which must all
//     arrive at the same call (line) with the same mask; a lane outside its own mask, a mask naming lanes that
//     returned or that do not exist (a partial warp), and lanes that never arrive are errors.
//   - __shared__: per-block storage (static thread_local: blocks of one launch run in turn on one OS thread);
//     dynamic shared memory through SMTC_DYNAMIC_SHARED, poisoned with 0xFF bytes (NaN) at each block start.
//   - Launch limits of a real GPU: block <= 1024 threads (x, y <= 1024, z <= 64), gridDim.y/z <= 65535,
//     gridDim.x <= 2^31 - 1, no zero-size grid or block, dynamic shared memory <= 48 KB unless the kernel opted in
//     with cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), bytes <= 227 KB
//     (sm_90). Violations are launch errors reported by cudaGetLastError, as on a GPU.
//   - Numerics: IEEE float/double on the host, no FMA contraction control (GCC contracts where -ffp-contract says),
//     no flush-to-zero. The approximate intrinsics follow the hardware's construction, so their error is of the
//     same kind: __expf(x) = exp2f(x * log2(e)) with the product rounded to float (CUDA's documented bound:
//     2 + floor(|1.173 x|) ulp; here the exp2 is exact, so the error is that of the rounded product alone),
//     __logf(x) = log2f(x) * ln 2 (CUDA: 2^-21.41 absolute on [0.5, 2], else 3 ulp), exp2f/logf/expf exact
//     (the device's fast-math versions are within 2 ulp / the __logf bound). Compare with the per-dtype
//     tolerances of smtc_fast.testing, never bitwise with a GPU.
//   - half/bf16: storage types with round-to-nearest-even conversions, the layout of at::Half/at::BFloat16.
//   - atomicAdd: host atomics (blocks run in turn, so only the order of a block's threads decides the result:
//     the schedules expose an order-dependent float atomic as a difference between them).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "common/cuda_launch.h"


// ---------------------------------------------------------------------------------------------------- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __constant__ static
// __restrict__ is a GCC keyword already.

// ------------------------------------------------------------------------------------------------- vector types
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ------------------------------------------------------------------------------------------------ runtime API
typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
} cudaError_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace cuda_emu {

constexpr int kWarpSize = 32;
constexpr std::size_t kDefaultDynamicShared = 48 * 1024;  // without the opt-in
constexpr std::size_t kMaxDynamicShared = 227 * 1024;     // sm_90's opt-in limit per block

// Per-fiber state visible to the kernel (the rest lives in cuda_emu.cpp).
struct ThreadView {
  uint3 thread_idx, block_idx;
  uint3 block_dim, grid_dim;
  unsigned char* dynamic_shared;
};
extern thread_local ThreadView* g_view;  // the running fiber's view; set by the scheduler at every switch

cudaError_t get_last_error();
const char* error_string(cudaError_t err);
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);

void syncthreads(const char* file, int line);
void syncwarp(const char* file, int line, unsigned mask);
// Warp collectives exchange up to 8 bytes per lane.
enum class WarpOp : int { kSync, kShflXor, kShflDown, kShflUp, kShflIdx, kBallot };
std::uint64_t warp_collective(WarpOp op, const char* file, int line, unsigned mask, std::uint64_t value, int arg,
                              int width);

// One launch: validates the configuration (a failure is recorded for cudaGetLastError, nothing runs), then runs
// body(ctx) in every thread of every block under the current schedule. An emulated fault (deadlock, divergent
// barrier, bad warp mask) stops the launch and is recorded the same way.
void run_launch(const char* kernel_name, const char* file, int line, const void* kernel, dim3 grid, dim3 block,
                std::size_t dynamic_shared, void (*body)(void*), void* ctx);

// Launches so far in this process (a test proves the emulated kernels ran) and the schedule now in force.
std::uint64_t launch_count();
std::string schedule_name();

template <typename T> inline std::uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  std::uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> inline T from_bits(std::uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// The launch: arguments are converted to the kernel's parameter types when the launch is made, as CUDA does.
template <typename... P> struct Launch {
  const char* name;
  const char* file;
  int line;
  void (*kernel)(P...);
  dim3 grid, block;
  std::size_t smem;
  template <typename... A> void operator()(A&&... args) const {
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_launch(name, file, line, reinterpret_cast<const void*>(kernel), grid, block, smem,
               [](void* c) {
                 auto* x = static_cast<Ctx*>(c);
                 std::apply(x->kernel, x->params);  // each thread gets its own copy of the by-value parameters
               },
               &ctx);
  }
};
template <typename... P>
Launch<P...> make_launch(const char* name, const char* file, int line, void (*kernel)(P...), dim3 grid, dim3 block,
                         std::size_t smem, cudaStream_t) {
  return Launch<P...>{name, file, line, kernel, grid, block, smem};
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::g_view->thread_idx)
#define blockIdx (::cuda_emu::g_view->block_idx)
#define blockDim (::cuda_emu::g_view->block_dim)
#define gridDim (::cuda_emu::g_view->grid_dim)
#define warpSize 32

#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cuda_emu::syncwarp(__FILE__, __LINE__, ::cuda_emu::mask_or_full(__VA_ARGS__))
namespace cuda_emu {
inline unsigned mask_or_full() { return 0xffffffffu; }
inline unsigned mask_or_full(unsigned m) { return m; }
inline int width_or_full() { return kWarpSize; }
inline int width_or_full(int w) { return w; }
template <typename T> inline T shfl(WarpOp op, const char* file, int line, unsigned mask, T v, int arg, int width) {
  return from_bits<T>(warp_collective(op, file, line, mask, to_bits(v), arg, width));
}
}  // namespace cuda_emu
#define __shfl_xor_sync(mask, v, lane_mask, ...)                                                                \
  ::cuda_emu::shfl(::cuda_emu::WarpOp::kShflXor, __FILE__, __LINE__, (mask), (v), (lane_mask),                \
                   ::cuda_emu::width_or_full(__VA_ARGS__))
#define __shfl_down_sync(mask, v, delta, ...)                                                                   \
  ::cuda_emu::shfl(::cuda_emu::WarpOp::kShflDown, __FILE__, __LINE__, (mask), (v), (delta),                   \
                   ::cuda_emu::width_or_full(__VA_ARGS__))
#define __shfl_up_sync(mask, v, delta, ...)                                                                     \
  ::cuda_emu::shfl(::cuda_emu::WarpOp::kShflUp, __FILE__, __LINE__, (mask), (v), (delta),                     \
                   ::cuda_emu::width_or_full(__VA_ARGS__))
#define __shfl_sync(mask, v, src, ...)                                                                          \
  ::cuda_emu::shfl(::cuda_emu::WarpOp::kShflIdx, __FILE__, __LINE__, (mask), (v), (src),                      \
                   ::cuda_emu::width_or_full(__VA_ARGS__))
#define __ballot_sync(mask, pred)                                                                               \
  static_cast<unsigned>(::cuda_emu::warp_collective(::cuda_emu::WarpOp::kBallot, __FILE__, __LINE__, (mask),    \
                                                    (pred) ? 1u : 0u, 0, 32))

inline cudaError_t cudaGetLastError() { return ::cuda_emu::get_last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return ::cuda_emu::error_string(e); }
template <typename K> inline cudaError_t cudaFuncSetAttribute(K* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::cuda_emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}

// ------------------------------------------------------------------------------------------- atomics (host)
template <typename T> inline T atomicAdd(T* addr, T v) {
  if constexpr (std::is_integral_v<T>) {
    return __atomic_fetch_add(addr, v, __ATOMIC_RELAXED);
  } else {
    T old;
    __atomic_load(addr, &old, __ATOMIC_RELAXED);
    T desired;
    do {
      desired = old + v;
    } while (!__atomic_compare_exchange(addr, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
  }
}
template <typename T> inline T atomicMax(T* addr, T v) {
  T old;
  __atomic_load(addr, &old, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange(addr, &old, &v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

// ------------------------------------------------------------------------------------- fast-math intrinsics
inline float __expf(float x) {
  const float t = x * 1.44269504088896341f;  // rounded to float, as the hardware's multiply before ex2.approx
  return std::exp2f(t);
}
inline float __logf(float x) { return std::log2f(x) * 0.693147180559945309f; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
// Round-to-nearest float multiply and add that the compiler never fuses into an FMA (on the device too); the
// host build contracts nothing anyway (GCC in ISO -std=c++NN mode: -ffp-contract=off), so they are the plain operators.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
template <typename T> inline T __ldg(const T* p) { return *p; }

// --------------------------------------------------------------------------------------------- half and bf16
// Storage types with the layout of at::Half / at::BFloat16; conversions round to nearest even (NaN kept).
struct __half { std::uint16_t x; };
struct __nv_bfloat16 { std::uint16_t x; };

inline float __half2float(__half h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.x & 0x8000u) << 16;
  std::uint32_t exp = (h.x >> 10) & 0x1fu, man = h.x & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal half: normalise
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      bits = sign | static_cast<std::uint32_t>(127 - 15 - e) << 23 | ((man & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __half __float2half(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  const std::uint16_t sign = static_cast<std::uint16_t>((b >> 16) & 0x8000u);
  const std::uint32_t abs = b & 0x7fffffffu;
  if (abs >= 0x7f800000u) return {static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u))};
  if (abs >= 0x477ff000u) return {static_cast<std::uint16_t>(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // below half's smallest normal (2^-14): a subnormal, rounded by the FPU
    const float scaled = std::fabs(f) * 16777216.0f;  // in units of 2^-24 (half's smallest subnormal)
    const auto m = static_cast<std::uint16_t>(std::nearbyint(scaled));
    return {static_cast<std::uint16_t>(sign | m)};
  }
  const std::uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);  // round to nearest even at bit 13
  return {static_cast<std::uint16_t>(sign | (((rounded >> 13) - (112u << 10)) & 0x7fffu))};
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const std::uint32_t b = static_cast<std::uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return {static_cast<std::uint16_t>((b >> 16) | 0x40u)};  // quiet NaN
  b += 0x7fffu + ((b >> 16) & 1u);
  return {static_cast<std::uint16_t>(b >> 16)};
}

// ------------------------------------------------------------------------------------------------ the macros
#define SMTC_LAUNCH(grid, block, smem, stream, ...) \
  ::cuda_emu::make_launch(#__VA_ARGS__, __FILE__, __LINE__, __VA_ARGS__, (grid), (block), (smem), (stream))
#define SMTC_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::cuda_emu::g_view->dynamic_shared)
