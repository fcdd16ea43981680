// Argument checks of smtc_fast::sinkhorn (CPU and CUDA wrappers).
#pragma once

#include <cmath>

#include "common/check.h"

namespace smtc {
namespace sinkhorn {

inline void check_sinkhorn_args(const at::Tensor& cost, const at::Tensor& log_mu, const at::Tensor& log_nu,
                                double eps, int64_t iters, c10::optional<double> tol) {
  SMTC_CHECK_DIM(cost, 3);
  SMTC_CHECK_FLOAT(cost);
  SMTC_CHECK_DIM(log_mu, 2);
  SMTC_CHECK_DIM(log_nu, 2);
  SMTC_CHECK_SAME(cost, log_mu);
  SMTC_CHECK_SAME(cost, log_nu);
  SMTC_CHECK_SIZE(log_mu, 0, cost.size(0), "batch B of cost");
  SMTC_CHECK_SIZE(log_mu, 1, cost.size(1), "rows N of cost");
  SMTC_CHECK_SIZE(log_nu, 0, cost.size(0), "batch B of cost");
  SMTC_CHECK_SIZE(log_nu, 1, cost.size(2), "columns M of cost");
  TORCH_CHECK(eps > 0 && std::isfinite(eps), "eps must be a finite number > 0, got ", eps);
  TORCH_CHECK(iters >= 0, "iters must be >= 0, got ", iters);
  TORCH_CHECK(!tol.has_value() || *tol >= 0, "tol must be None or >= 0, got ", tol.value_or(0));
}

inline void check_sinkhorn_grads(const at::Tensor& grad_plan, const at::Tensor& grad_f, const at::Tensor& grad_g,
                                 const at::Tensor& cost) {
  TORCH_CHECK(grad_plan.sizes() == cost.sizes(), "grad_plan must have the shape of cost ", cost.sizes(), ", got ",
              grad_plan.sizes());
  TORCH_CHECK(grad_f.dim() == 2 && grad_f.size(0) == cost.size(0) && grad_f.size(1) == cost.size(1),
              "grad_f must have shape (B, N), got ", grad_f.sizes());
  TORCH_CHECK(grad_g.dim() == 2 && grad_g.size(0) == cost.size(0) && grad_g.size(1) == cost.size(2),
              "grad_g must have shape (B, M), got ", grad_g.sizes());
  SMTC_CHECK_SAME(grad_plan, cost);
  SMTC_CHECK_SAME(grad_f, cost);
  SMTC_CHECK_SAME(grad_g, cost);
}

}  // namespace sinkhorn
}  // namespace smtc
