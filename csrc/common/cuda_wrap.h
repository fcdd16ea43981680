// Torch-side helpers for the CUDA wrappers (.cpp): dtype codes, the current stream, the device guard, and the
// dispatch key the wrapper registers under.
//
// Each <op>_cuda_ops.cpp is compiled twice (setup.py): for the GPU (registered as torch.ops.smtc_fast.<op> under
// the CUDA key) and, with SMTC_CUDA_EMU, for the CPU execution tier (torch.ops.smtc_fast_cuda_emu.<op> under the
// CPU key, the launchers running the .cu kernels on the host through common/cuda_emu.h). The wrapper code is the
// same; only what this header provides differs.
#pragma once

#include <ATen/ATen.h>

#include "common/cuda_launch.h"

#if defined(SMTC_CUDA_EMU)
// The emulated device is the host: tensors live on the CPU, there is one "stream" and nothing to guard.
#define SMTC_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(smtc_fast_cuda_emu, CPU, m)
namespace smtc {
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
inline cudaStream_t current_stream(const at::Tensor&) { return nullptr; }
}  // namespace smtc
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define SMTC_CUDA_IMPL(m) TORCH_LIBRARY_IMPL(smtc_fast, CUDA, m)
namespace smtc {
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
}  // namespace smtc
#endif

// Every tensor argument on the wrapper's device (CUDA, or the CPU for the execution tier): a CPU tensor handed to
// a CUDA kernel would be a host pointer dereferenced on the device.
#define SMTC_CHECK_KERNEL_DEVICE(x)                                                                          \
  TORCH_CHECK((x).device().type() == ::smtc::kKernelDevice, #x " must be a ", ::smtc::kKernelDevice,         \
              " tensor for this kernel, got a tensor on ", (x).device())

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

}  // namespace smtc
