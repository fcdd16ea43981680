// Argument checks of smtc_fast::transport_loss (CPU and CUDA wrappers).
#pragma once

#include <cmath>
#include <string>

#include "common/check.h"

namespace smtc {
namespace transport_loss {

inline void check_transport_loss_args(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                                      const at::Tensor& teacher_keys, double eps, int64_t iters,
                                      const std::string& marginals, const std::string& cost) {
  SMTC_CHECK_DIM(student_logits, 4);
  SMTC_CHECK_DIM(teacher_logits, 4);
  SMTC_CHECK_DIM(teacher_keys, 4);
  SMTC_CHECK_FLOAT(student_logits);
  SMTC_CHECK_SAME(student_logits, teacher_logits);
  TORCH_CHECK(student_logits.device() == teacher_keys.device(), "student_logits and teacher_keys must be on the "
              "same device, got ", student_logits.device(), " and ", teacher_keys.device());
  // the keys may be bf16 with float32 logits: the keys of a bf16 forward, whose products are exact in float32
  TORCH_CHECK(teacher_keys.scalar_type() == student_logits.scalar_type() ||
                  (teacher_keys.scalar_type() == at::kBFloat16 && student_logits.scalar_type() == at::kFloat),
              "teacher_keys must have the dtype of student_logits (or be bfloat16 with float32 logits), got ",
              teacher_keys.scalar_type(), " and ", student_logits.scalar_type());
  TORCH_CHECK(teacher_logits.sizes() == student_logits.sizes(), "teacher_logits must have the shape of "
              "student_logits (B, T, S, n) = ", student_logits.sizes(), ", got ", teacher_logits.sizes());
  SMTC_CHECK_SIZE(teacher_keys, 0, student_logits.size(0), "clips B of student_logits");
  SMTC_CHECK_SIZE(teacher_keys, 1, student_logits.size(1), "frames T of student_logits");
  SMTC_CHECK_SIZE(teacher_keys, 2, student_logits.size(3), "tokens n of student_logits");
  TORCH_CHECK(student_logits.size(1) >= 2, "L_sem needs at least 2 frames per clip, got T=", student_logits.size(1));
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "eps must be a finite number > 0, got ", eps);
  TORCH_CHECK(iters >= 0, "iters must be >= 0, got ", iters);
  TORCH_CHECK(marginals == "norm" || marginals == "uniform", "marginals must be 'norm' or 'uniform', got '",
              marginals, "'");
  TORCH_CHECK(cost == "one_minus_cos" || cost == "neg_cos", "cost must be 'one_minus_cos' or 'neg_cos', got '",
              cost, "'");
}

inline void check_transport_loss_grads(const at::Tensor& grad_loss, const at::Tensor& student_logits,
                                       const at::Tensor& targets) {
  TORCH_CHECK(grad_loss.numel() == 1, "grad_loss must have one element, got shape ", grad_loss.sizes());
  SMTC_CHECK_DIM(student_logits, 4);
  SMTC_CHECK_FLOAT(student_logits);
  TORCH_CHECK(targets.sizes() == student_logits.sizes(), "targets must have the shape of student_logits ",
              student_logits.sizes(), ", got ", targets.sizes());
  SMTC_CHECK_SAME(grad_loss, student_logits);
  SMTC_CHECK_SAME(targets, student_logits);
  TORCH_CHECK(student_logits.size(1) >= 2, "L_sem needs at least 2 frames per clip, got T=", student_logits.size(1));
}

}  // namespace transport_loss
}  // namespace smtc
