// Device helpers shared by the .cu files: warp reductions and dtype dispatch of the raw-pointer launchers.
//
// Every .cu file is compiled twice: by nvcc for the GPU, and by the host compiler with SMTC_CUDA_EMU for the CPU
// execution tier (common/cuda_emu.h), so CI runs the same kernel source. The two places where plain C++ cannot
// spell CUDA go through macros:
//   SMTC_LAUNCH(grid, block, smem, stream, kernel)(args...)   is  kernel<<<grid, block, smem, stream>>>(args...)
//   SMTC_DYNAMIC_SHARED(type, name);                          is  extern __shared__ type name[];
#pragma once

#if defined(SMTC_CUDA_EMU)
#include "common/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define SMTC_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#define SMTC_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

#include <stdexcept>
#include <string>

#include "common/cuda_launch.h"
#include "common/math.h"

namespace smtc {

// Conversions to and from the accumulation type (float for half/bf16).
template <typename A, typename T> __device__ __forceinline__ A to_acc(T x) { return static_cast<A>(x); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T, typename A> __device__ __forceinline__ T from_acc(A x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) { return __float2bfloat16(x); }

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Warp-wide merge of running log-sum-exp pairs (common/math.h lse_merge).
template <typename T> __device__ __forceinline__ void warp_lse(T& mx, T& s) {
  for (int o = 16; o > 0; o >>= 1) {
    const T mx2 = __shfl_xor_sync(0xffffffffu, mx, o);
    const T s2 = __shfl_xor_sync(0xffffffffu, s, o);
    lse_merge(mx, s, mx2, s2);
  }
}

}  // namespace smtc

// Calls BODY with scalar_t bound to the device type of `dtype` (float, double, and optionally half/bf16).
#define SMTC_DISPATCH_FLOAT_DOUBLE(dtype, NAME, ...)                                         \
  switch (dtype) {                                                                         \
    case ::smtc::DType::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }          \
    case ::smtc::DType::kDouble: { using scalar_t = double; __VA_ARGS__(); break; }        \
    default: throw std::runtime_error(std::string(NAME) + ": unsupported dtype");          \
  }
#define SMTC_DISPATCH_ALL_FLOATS(dtype, NAME, ...)                                           \
  switch (dtype) {                                                                         \
    case ::smtc::DType::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }          \
    case ::smtc::DType::kDouble: { using scalar_t = double; __VA_ARGS__(); break; }        \
    case ::smtc::DType::kHalf: { using scalar_t = __half; __VA_ARGS__(); break; }          \
    case ::smtc::DType::kBFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__(); break; } \
    default: throw std::runtime_error(std::string(NAME) + ": unsupported dtype");          \
  }
