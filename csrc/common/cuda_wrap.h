// Torch-side helpers for the CUDA wrappers (.cpp): dtype codes, the current stream, the device guard.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/cuda_launch.h"

namespace smtc {

inline DType dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "smtc_fast CUDA kernels support float32/float64/float16/bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat;
}

inline cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

}  // namespace smtc
