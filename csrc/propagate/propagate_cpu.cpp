// C++ CPU kernel of smtc_fast::propagate_labels (propagate.h has the spec). Never builds the (N, (n+1)N)
// affinity or an HW x HW radius mask:
//  - frame 0 (every token a candidate): a blocked GEMM over chunks of queries (the BLAS, all threads), each
//    query's logit row then scanned into its running top-k;
//  - context frames: per query, only the disc around its grid position, one contiguous run of keys per disc row,
//    dot products with the widest SIMD the machine has (SMTC_CPU_CLONES);
//  - softmax over the kept logits and the weighted sum of labels (propagate.h).
// Queries are split over threads with at::parallel_for; each thread owns its k-sized top-k buffers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/alloc.h"
#include "common/cpu.h"
#include "propagate/propagate.h"
#include "propagate/propagate_check.h"

namespace smtc {
namespace propagate {
namespace {

SMTC_ALWAYS_INLINE float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t d) {
  float s = 0.f;
  SMTC_SIMD_SUM(s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

struct Disc {
  int reach;                // rows dy in [-reach, reach]
  std::vector<int> half;    // half[dy + reach]: largest |dx| in the disc on row dy, -1 if none
};

// One query's context candidates: frame j, disc rows top to bottom, keys left to right (increasing candidate
// index, as the tie rule needs).
SMTC_CPU_CLONES void scan_context(const float* q, const float* ctx, int64_t n, int64_t h, int64_t w, int64_t d,
                                  int64_t n0, int64_t qy, int64_t qx, const Disc& disc, float* vals,
                                  int64_t* idx, int& count, int k) {
  const int64_t N = h * w;
  for (int64_t j = 0; j < n; ++j) {
    const float* frame = ctx + j * N * d;
    for (int dy = -disc.reach; dy <= disc.reach; ++dy) {
      const int hw = disc.half[dy + disc.reach];
      const int64_t y = qy + dy;
      if (hw < 0 || y < 0 || y >= h) continue;
      const int64_t x0 = std::max<int64_t>(0, qx - hw), x1 = std::min<int64_t>(w - 1, qx + hw);
      for (int64_t x = x0; x <= x1; ++x) {
        const int64_t m = y * w + x;
        topk_insert(vals, idx, count, k, dot(q, frame + m * d, d), n0 + j * N + m);
      }
    }
  }
}

at::Tensor propagate_labels_cpu(const at::Tensor& query_in, const at::Tensor& first_feats_in,
                                const at::Tensor& first_labels_in, const at::Tensor& ctx_feats_in,
                                const at::Tensor& ctx_labels_in, at::IntArrayRef grid, int64_t topk, double radius,
                                double temperature) {
  check_propagate_args(query_in, first_feats_in, first_labels_in, ctx_feats_in, ctx_labels_in, grid, topk, radius,
                       temperature);
  const auto query = query_in.contiguous();
  const auto first_feats = first_feats_in.contiguous();
  const auto first_labels = first_labels_in.contiguous();
  const auto ctx_feats = ctx_feats_in.contiguous();
  const auto ctx_labels = ctx_labels_in.contiguous();
  const int64_t N = query.size(0), D = query.size(1), N0 = first_feats.size(0), n = ctx_feats.size(0);
  const int64_t K = first_labels.size(1), h = grid[0], w = grid[1];
  auto out = empty_output({N, K}, query.options());
  if (N == 0 || K == 0) return out;
  const int k = static_cast<int>(std::min<int64_t>(topk, N0 + n * N));
  Disc disc;
  disc.reach = disc_reach(radius);
  for (int dy = -disc.reach; dy <= disc.reach; ++dy) disc.half.push_back(disc_half_width(dy, radius));
  const float inv_temp = static_cast<float>(1.0 / temperature);
  const float* q_ptr = query.data_ptr<float>();
  const float* ctx_ptr = ctx_feats.data_ptr<float>();
  const float* fl_ptr = first_labels.data_ptr<float>();
  const float* cl_ptr = ctx_labels.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  // frame-0 logits of a chunk of queries: at most ~1 M floats (4 MB) at a time
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(1) << 20) / N0));
  auto logits = at::empty({chunk, N0}, query.options());
  for (int64_t s = 0; s < N; s += chunk) {
    const int64_t c = std::min(chunk, N - s);
    auto lg = logits.narrow(0, 0, c);
    at::mm_out(lg, query.narrow(0, s, c), first_feats.t());  // (c, N0)
    const float* lg_ptr = lg.data_ptr<float>();
    at::parallel_for(0, c, 8, [&](int64_t b, int64_t e) {
      std::vector<float> vals(k);
      std::vector<int64_t> idx(k);
      for (int64_t r = b; r < e; ++r) {
        const int64_t qi = s + r;
        int count = 0;
        const float* row = lg_ptr + r * N0;
        for (int64_t i = 0; i < N0; ++i) {
          // cheap reject before the call: most frame-0 logits are below the current k-th value
          if (count == k && !(row[i] > vals[k - 1])) continue;
          topk_insert(vals.data(), idx.data(), count, k, row[i], i);
        }
        if (n > 0 && w > 0)
          scan_context(q_ptr + qi * D, ctx_ptr, n, h, w, D, N0, qi / w, qi % w, disc, vals.data(), idx.data(),
                       count, k);
        softmax_aggregate(vals.data(), idx.data(), count, inv_temp, fl_ptr, N0, cl_ptr, K, out_ptr + qi * K);
      }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(smtc_fast, CPU, m) { m.impl("propagate_labels", &propagate_labels_cpu); }

}  // namespace propagate
}  // namespace smtc
