// Fused label propagation (the CRW / SMTC protocol, evaluation_protocols.md §2.3): the per-query math shared by
// propagate_cpu.cpp and propagate_cuda.cu. smtc_fast/ops/propagate_labels.py is the specification.
//
//   query        (N, D)     float32  L2-normalised features of the target frame, on the grid (h, w), N = h*w
//   first_feats  (N0, D)    float32  frame 0 (long-term memory): every token is a candidate
//   first_labels (N0, K)    float32
//   ctx_feats    (n, N, D)  float32  the n short-term frames, on the same grid as the query
//   ctx_labels   (n, N, K)  float32
//   topk >= 1, radius >= 0, temperature > 0
//   -> labels    (N, K)     float32
//
// Candidates of query q = (qy, qx): every frame-0 token, and the tokens (y, x) of each context frame with
// (y - qy)^2 + (x - qx)^2 < radius^2 (Euclidean disc, strict). logit = <query, key>. The k = min(topk, #candidates)
// largest logits are kept, weights = softmax(logit / temperature) over those k, labels = sum of weight * label.
//
// Candidate index (the tie rule): frame-0 token i -> i; context frame j, token m -> N0 + j*N + m. At equal logits
// the lower candidate index wins. Both kernels visit candidates in increasing index order and insert only strictly
// larger logits, so the first-seen (lower-index) candidate stays ahead of later equal ones.
#pragma once

#include <cstdint>

#include "common/math.h"

namespace smtc {
namespace propagate {

// Largest dx >= 0 with dy^2 + dx^2 < radius^2, or -1 when row dy has no cell in the disc.
SMTC_HD int disc_half_width(int dy, double radius) {
  const double r2 = radius * radius;
  if (static_cast<double>(dy) * dy >= r2) return -1;
  int dx = 0;
  while (static_cast<double>(dx + 1) * (dx + 1) + static_cast<double>(dy) * dy < r2) ++dx;
  return dx;
}

// Rows dy in [-reach, reach] can hold disc cells (reach = ceil(radius), or 0 cells when radius == 0).
SMTC_HD int disc_reach(double radius) {
  int r = 0;
  while (static_cast<double>(r + 1) < radius) ++r;  // largest integer strictly below radius
  return r;
}

// Running top-k. vals[0..count) are sorted descending; a new candidate enters only if strictly larger than the
// current k-th value (so among equal logits the earlier visited, i.e. lower index, candidate is kept) and is
// placed after the kept values equal to it.
SMTC_HD void topk_insert(float* vals, int64_t* idx, int& count, int k, float v, int64_t i) {
  int pos;
  if (count == k) {
    if (!(v > vals[k - 1])) return;
    pos = k - 1;
  } else {
    pos = count++;
  }
  while (pos > 0 && vals[pos - 1] < v) {
    vals[pos] = vals[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  vals[pos] = v;
  idx[pos] = i;
}

// out[l] = sum_c softmax(vals / temperature)_c * label(idx_c)[l], label rows from frame 0 (idx < n0) or the
// context frames (row idx - n0 of the flattened (n*N, K) labels). count >= 1, vals[0] is the maximum.
SMTC_HD void softmax_aggregate(const float* vals, const int64_t* idx, int count, float inv_temp,
                               const float* first_labels, int64_t n0, const float* ctx_labels, int64_t K,
                               float* out) {
  for (int64_t l = 0; l < K; ++l) out[l] = 0.f;
  const float m = vals[0];
  float total = 0.f;
  for (int c = 0; c < count; ++c) {
    const float w = expf((vals[c] - m) * inv_temp);
    total += w;
    const float* row = idx[c] < n0 ? first_labels + idx[c] * K : ctx_labels + (idx[c] - n0) * K;
    for (int64_t l = 0; l < K; ++l) out[l] += w * row[l];
  }
  const float inv = 1.f / total;
  for (int64_t l = 0; l < K; ++l) out[l] *= inv;
}

}  // namespace propagate
}  // namespace smtc
