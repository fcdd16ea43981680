// CUDA wrapper of smtc_fast::slot_aggregate: the attention kernels (slot_aggregate_cuda.cu) and the two
// contractions with the values on correlation's strided GEMM kernel, all on the current stream.
#include <torch/library.h>

#include "common/cuda_wrap.h"
#include "correlation/correlation_cuda.h"
#include "slot_aggregate/slot_aggregate_check.h"
#include "slot_aggregate/slot_aggregate_cuda.h"

namespace smtc {
namespace slot_aggregate {
namespace {

using correlation::launch_gemm_nt;
using correlation::Operand;

std::tuple<at::Tensor, at::Tensor> slot_aggregate_cuda(const at::Tensor& logits_in, const at::Tensor& values,
                                                       const c10::optional<at::Tensor>& mask_in, double eps) {
  check_slot_aggregate_args(logits_in, values, mask_in, eps);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const int64_t B = logits.size(0), G = logits.size(1), P = logits.size(2), N = logits.size(3);
  const int64_t D = values.size(2);
  const auto stream = current_stream(logits);
  auto attn = at::empty_like(logits);
  launch_attention_forward(dtype_code(logits), logits.data_ptr(), mask.defined() ? mask.data_ptr() : nullptr, eps,
                           B, G, P, N, attn.data_ptr(), stream);
  auto updates = at::empty({B, G, P, D}, logits.options());
  if (N == 0) {
    updates.zero_();
  } else {
    // updates[gp, d] = sum_n attn[gp, n] values[n, d]
    launch_gemm_nt(dtype_code(logits), attn.data_ptr(), Operand{G * P * N, N, 1}, values.data_ptr(),
                   Operand{values.stride(0), values.stride(2), values.stride(1)}, updates.data_ptr(), B, G * P, D,
                   N, stream);
  }
  return {updates, attn};
}

std::tuple<at::Tensor, at::Tensor> slot_aggregate_backward_cuda(const at::Tensor& grad_updates_in,
                                                                const c10::optional<at::Tensor>& grad_attn,
                                                                const at::Tensor& logits_in, const at::Tensor& values,
                                                                const c10::optional<at::Tensor>& mask_in,
                                                                const at::Tensor& attn_in, double eps) {
  check_slot_aggregate_backward_args(grad_updates_in, grad_attn, logits_in, values, mask_in, attn_in, eps);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto attn = attn_in.contiguous();
  const auto grad_updates = grad_updates_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const int64_t B = logits.size(0), G = logits.size(1), P = logits.size(2), N = logits.size(3);
  const int64_t D = values.size(2);
  const auto stream = current_stream(logits);
  const auto dt = dtype_code(logits);
  // gw[gp, n] = sum_d grad_updates[gp, d] values[n, d], then + grad_attn
  auto gw = at::empty_like(logits);
  if (D == 0) {
    gw.zero_();
  } else {
    launch_gemm_nt(dt, grad_updates.data_ptr(), Operand{G * P * D, D, 1}, values.data_ptr(),
                   Operand{values.stride(0), values.stride(1), values.stride(2)}, gw.data_ptr(), B, G * P, N, D,
                   stream);
  }
  if (grad_attn.has_value()) gw.add_(*grad_attn);
  launch_attention_backward(dt, logits.data_ptr(), mask.defined() ? mask.data_ptr() : nullptr, attn.data_ptr(), eps,
                            B, G, P, N, gw.data_ptr(), stream);
  // grad_values[n, d] = sum_gp attn[gp, n] grad_updates[gp, d]
  auto grad_values = at::empty({B, N, D}, logits.options());
  if (G * P == 0) {
    grad_values.zero_();
  } else {
    launch_gemm_nt(dt, attn.data_ptr(), Operand{G * P * N, 1, N}, grad_updates.data_ptr(), Operand{G * P * D, 1, D},
                   grad_values.data_ptr(), B, N, D, G * P, stream);
  }
  return {gw, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(smtc_fast, CUDA, m) {
  m.impl("slot_aggregate", &slot_aggregate_cuda);
  m.impl("_slot_aggregate_backward", &slot_aggregate_backward_cuda);
}

}  // namespace slot_aggregate
}  // namespace smtc
