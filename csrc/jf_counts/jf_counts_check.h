// Argument checks of smtc_fast::jf_counts; mirrors _check in smtc_fast/ops/jf_counts.py.
#pragma once

#include "common/check.h"

namespace smtc {
namespace jf {

inline void check_jf_counts_args(const at::Tensor& pred, const at::Tensor& gt, int64_t n_objects, int64_t radius) {
  SMTC_CHECK_DIM(pred, 3);
  SMTC_CHECK_DIM(gt, 3);
  SMTC_CHECK_SAME(pred, gt);
  TORCH_CHECK(pred.sizes() == gt.sizes(), "pred (T, H, W) and gt (T, H, W) must have the same shape, got ",
              pred.sizes(), " and ", gt.sizes());
  TORCH_CHECK(pred.scalar_type() == at::kByte || pred.scalar_type() == at::kInt || pred.scalar_type() == at::kLong,
              "pred and gt must be uint8, int32 or int64 label maps, got ", pred.scalar_type());
  TORCH_CHECK(pred.device().is_cpu(), "jf_counts runs on CPU tensors, got ", pred.device());
  TORCH_CHECK(n_objects >= 0, "n_objects must be >= 0, got ", n_objects);
  // (2r + 1) row probes per boundary pixel: a radius beyond the frame's size would only waste time
  TORCH_CHECK(radius >= 0 && radius <= (1 << 20), "radius must be in [0, 2^20] pixels, got ", radius);
}

}  // namespace jf
}  // namespace smtc
