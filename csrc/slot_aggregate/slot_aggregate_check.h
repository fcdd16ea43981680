// Argument checks of smtc_fast::slot_aggregate (CPU and CUDA wrappers).
#pragma once

#include "common/check.h"

namespace smtc {
namespace slot_aggregate {

inline void check_slot_aggregate_args(const at::Tensor& logits, const at::Tensor& values,
                                      const c10::optional<at::Tensor>& mask, double eps) {
  SMTC_CHECK_DIM(logits, 4);
  SMTC_CHECK_DIM(values, 3);
  SMTC_CHECK_FLOAT(logits);
  TORCH_CHECK(logits.device() == values.device(), "logits and values must be on the same device, got ",
              logits.device(), " and ", values.device());
  // values may be bf16 with float32 logits (a bf16 forward's values): the kernels compute on their exact float32
  // values, and the values' gradient is returned in bf16
  TORCH_CHECK(values.scalar_type() == logits.scalar_type() ||
                  (values.scalar_type() == at::kBFloat16 && logits.scalar_type() == at::kFloat),
              "values must have the dtype of logits (or be bfloat16 with float32 logits), got ", values.scalar_type(),
              " and ", logits.scalar_type());
  SMTC_CHECK_SIZE(values, 0, logits.size(0), "batch B of logits");
  SMTC_CHECK_SIZE(values, 1, logits.size(3), "tokens N of logits");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    SMTC_CHECK_DIM(m, 3);
    SMTC_CHECK_SAME(m, logits);
    SMTC_CHECK_SIZE(m, 0, logits.size(0), "batch B of logits");
    SMTC_CHECK_SIZE(m, 1, logits.size(1), "groups G of logits");
    SMTC_CHECK_SIZE(m, 2, logits.size(3), "tokens N of logits");
  }
  TORCH_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
}

inline void check_slot_aggregate_residual(const at::Tensor& logits, const at::Tensor& values,
                                          const c10::optional<at::Tensor>& residual) {
  if (!residual.has_value()) return;
  const at::Tensor& r = *residual;
  SMTC_CHECK_SAME(r, logits);
  TORCH_CHECK(r.dim() == 4 && r.size(0) == logits.size(0) && r.size(1) == logits.size(1) &&
                  r.size(2) == logits.size(2) && r.size(3) == values.size(2),
              "residual must have the shape of updates (B, G, P, D) = (", logits.size(0), ", ", logits.size(1), ", ",
              logits.size(2), ", ", values.size(2), "), got ", r.sizes());
}

inline void check_slot_aggregate_backward_args(const at::Tensor& grad_updates,
                                               const c10::optional<at::Tensor>& grad_attn_opt,
                                               const at::Tensor& logits, const at::Tensor& values,
                                               const c10::optional<at::Tensor>& mask, const at::Tensor& attn,
                                               double eps) {
  check_slot_aggregate_args(logits, values, mask, eps);
  TORCH_CHECK(attn.sizes() == logits.sizes(), "attn must have the shape of logits ", logits.sizes(), ", got ",
              attn.sizes());
  SMTC_CHECK_SAME(attn, logits);  // a float64 attn with float32 logits would be read as garbage by the kernels
  if (grad_attn_opt.has_value()) {  // None: no gradient reaches attn directly (SMTC uses only the updates)
    const at::Tensor& grad_attn = *grad_attn_opt;
    TORCH_CHECK(grad_attn.sizes() == logits.sizes(), "grad_attn must have the shape of logits ", logits.sizes(),
                ", got ", grad_attn.sizes());
    SMTC_CHECK_SAME(grad_attn, logits);
  }
  TORCH_CHECK(grad_updates.dim() == 4 && grad_updates.size(0) == logits.size(0) &&
                  grad_updates.size(1) == logits.size(1) && grad_updates.size(2) == logits.size(2) &&
                  grad_updates.size(3) == values.size(2),
              "grad_updates must have shape (B, G, P, D) = (", logits.size(0), ", ", logits.size(1), ", ",
              logits.size(2), ", ", values.size(2), "), got ", grad_updates.sizes());
  SMTC_CHECK_SAME(grad_updates, logits);
}

}  // namespace slot_aggregate
}  // namespace smtc
