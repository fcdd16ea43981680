// CUDA wrapper of smtc_fast::slot_aggregate: the attention kernels (slot_aggregate_cuda.cu) and the two
// contractions with the values, which are batched GEMMs and so cuBLAS's job (at::bmm on the current stream,
// honouring torch's TF32 / reduced-precision settings). Compiled twice (common/cuda_wrap.h): for the GPU and for
// the CPU execution tier.
#include <torch/library.h>

#include "common/cuda_wrap.h"
#include "slot_aggregate/slot_aggregate_check.h"
#include "slot_aggregate/slot_aggregate_cuda.h"

namespace smtc {
namespace slot_aggregate {
namespace {

at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> slot_aggregate_cuda(const at::Tensor& logits_in, const at::Tensor& values_in,
                                                       const c10::optional<at::Tensor>& mask_in, double eps,
                                                       const c10::optional<at::Tensor>& residual) {
  check_slot_aggregate_args(logits_in, values_in, mask_in, eps);
  check_slot_aggregate_residual(logits_in, values_in, residual);
  SMTC_CHECK_KERNEL_DEVICE(logits_in);
  const DeviceGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto values = values_in.to(logits.scalar_type());  // bf16 values (float32 logits) widened: exact
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const int64_t B = logits.size(0), G = logits.size(1), P = logits.size(2), N = logits.size(3);
  const int64_t D = values.size(2);
  auto attn = at::empty_like(logits);
  auto z = at::empty({B, G, P}, logits.options().dtype(acc_dtype(logits)));
  launch_attention_forward(dtype_code(logits), logits.data_ptr(), mask.defined() ? mask.data_ptr() : nullptr, eps,
                           B, G, P, N, attn.data_ptr(), z.data_ptr(), current_stream(logits));
  // updates[b, gp, d] = sum_n attn[b, gp, n] values[b, n, d]
  auto updates = at::bmm(attn.view({B, G * P, N}), values).view({B, G, P, D});
  if (residual.has_value()) updates.add_(*residual);  // residual + attn @ values: one float addition per entry
  return {updates, attn};
}

std::tuple<at::Tensor, at::Tensor> slot_aggregate_backward_cuda(const at::Tensor& grad_updates_in,
                                                                const c10::optional<at::Tensor>& grad_attn,
                                                                const at::Tensor& logits_in,
                                                                const at::Tensor& values_in,
                                                                const c10::optional<at::Tensor>& mask_in,
                                                                const at::Tensor& attn_in, double eps) {
  check_slot_aggregate_backward_args(grad_updates_in, grad_attn, logits_in, values_in, mask_in, attn_in, eps);
  SMTC_CHECK_KERNEL_DEVICE(logits_in);
  const DeviceGuard guard(logits_in.device());
  const auto values = values_in.to(logits_in.scalar_type());  // bf16 values widened, as in the forward
  const auto logits = logits_in.contiguous();
  const auto attn = attn_in.contiguous();
  const auto grad_updates = grad_updates_in.contiguous();
  const at::Tensor mask = mask_in.has_value() ? mask_in->contiguous() : at::Tensor();
  const int64_t B = logits.size(0), G = logits.size(1), P = logits.size(2), N = logits.size(3);
  const int64_t D = values.size(2);
  const auto gu = grad_updates.view({B, G * P, D});
  // gw[b, gp, n] = sum_d grad_updates[b, gp, d] values[b, n, d], then + grad_attn
  auto gw = at::bmm(gu, values.transpose(1, 2)).view({B, G, P, N}).contiguous();
  if (grad_attn.has_value()) gw.add_(*grad_attn);
  auto zd = at::empty({B, G, 2, P}, logits.options().dtype(acc_dtype(logits)));
  launch_attention_backward(dtype_code(logits), logits.data_ptr(), mask.defined() ? mask.data_ptr() : nullptr,
                            attn.data_ptr(), eps, B, G, P, N, gw.data_ptr(), zd.data_ptr(), current_stream(logits));
  // grad_values[b, n, d] = sum_gp attn[b, gp, n] grad_updates[b, gp, d]
  auto grad_values = at::bmm(attn.view({B, G * P, N}).transpose(1, 2), gu);
  return {gw, grad_values.to(values_in.scalar_type())};  // the values' dtype (bf16: rounded once, at the end)
}

}  // namespace

SMTC_CUDA_IMPL(m) {
  m.impl("slot_aggregate", &slot_aggregate_cuda);
  m.impl("_slot_aggregate_backward", &slot_aggregate_backward_cuda);
}

}  // namespace slot_aggregate
}  // namespace smtc
