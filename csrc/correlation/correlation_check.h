// Argument checks of smtc_fast::correlation (CPU and CUDA wrappers).
#pragma once

#include "common/check.h"

namespace smtc {
namespace correlation {

inline void check_correlation_args(const at::Tensor& a, const at::Tensor& b) {
  SMTC_CHECK_DIM(a, 3);
  SMTC_CHECK_DIM(b, 3);
  SMTC_CHECK_FLOAT(a);
  SMTC_CHECK_SAME(a, b);
  SMTC_CHECK_SIZE(b, 0, a.size(0), "batch B of a");
  SMTC_CHECK_SIZE(b, 2, a.size(2), "feature dim D of a");
}

inline void check_correlation_grad(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == a.size(0) && grad.size(1) == a.size(1) &&
                  grad.size(2) == b.size(1),
              "grad must have shape (B, N, M) = (", a.size(0), ", ", a.size(1), ", ", b.size(1), "), got ",
              grad.sizes());
  SMTC_CHECK_SAME(grad, a);
}

}  // namespace correlation
}  // namespace smtc
