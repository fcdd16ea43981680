// Argument checks of smtc_fast::propagate_labels (CPU and CUDA wrappers); mirrors _check in
// smtc_fast/ops/propagate_labels.py.
#pragma once

#include <cmath>

#include "common/check.h"

namespace smtc {
namespace propagate {

inline void check_propagate_args(const at::Tensor& query, const at::Tensor& first_feats,
                                 const at::Tensor& first_labels, const at::Tensor& ctx_feats,
                                 const at::Tensor& ctx_labels, at::IntArrayRef grid, int64_t topk, double radius,
                                 double temperature) {
  SMTC_CHECK_DIM(query, 2);
  SMTC_CHECK_DIM(first_feats, 2);
  SMTC_CHECK_DIM(first_labels, 2);
  SMTC_CHECK_DIM(ctx_feats, 3);
  SMTC_CHECK_DIM(ctx_labels, 3);
  TORCH_CHECK(query.scalar_type() == at::kFloat, "query must be float32 for the smtc_fast kernel, got ",
              query.scalar_type());
  SMTC_CHECK_SAME(query, first_feats);
  SMTC_CHECK_SAME(query, first_labels);
  SMTC_CHECK_SAME(query, ctx_feats);
  SMTC_CHECK_SAME(query, ctx_labels);
  TORCH_CHECK(grid.size() == 2, "grid must be (h, w), got ", grid);
  TORCH_CHECK(grid[0] >= 0 && grid[1] >= 0 && grid[0] * grid[1] == query.size(0), "grid ", grid, " has ",
              grid[0] * grid[1], " cells but query has N = ", query.size(0), " rows");
  SMTC_CHECK_SIZE(first_feats, 1, query.size(1), "feature dim D of query");
  TORCH_CHECK(first_feats.size(0) >= 1, "first_feats must have at least one token, got shape ", first_feats.sizes());
  SMTC_CHECK_SIZE(first_labels, 0, first_feats.size(0), "tokens N0 of first_feats");
  SMTC_CHECK_SIZE(ctx_feats, 1, query.size(0), "tokens N of query");
  SMTC_CHECK_SIZE(ctx_feats, 2, query.size(1), "feature dim D of query");
  SMTC_CHECK_SIZE(ctx_labels, 0, ctx_feats.size(0), "context frames n of ctx_feats");
  SMTC_CHECK_SIZE(ctx_labels, 1, query.size(0), "tokens N of query");
  SMTC_CHECK_SIZE(ctx_labels, 2, first_labels.size(1), "labels K of first_labels");
  TORCH_CHECK(topk >= 1, "topk must be >= 1, got ", topk);
  TORCH_CHECK(std::isfinite(radius) && radius >= 0, "radius must be finite and >= 0, got ", radius);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature must be finite and > 0, got ",
              temperature);
}

}  // namespace propagate
}  // namespace smtc
