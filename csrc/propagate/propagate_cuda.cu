// CUDA kernel of smtc_fast::propagate_labels: one thread per query, the same scan as the CPU kernel
// (frame 0 in token order, then each context frame's disc in row-major order, running top-k and softmax
// aggregation from propagate.h), so both backends apply the same tie rule. A simple, correct schedule: the
// top-k buffers live in global workspaces (k is unbounded), dot products are plain float loops.
// Future work: a query tile per block with frame-0 keys staged through shared memory.
#include "common/cuda_utils.cuh"
#include "propagate/propagate.h"
#include "propagate/propagate_cuda.h"

namespace smtc {
namespace propagate {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t d) {
  float s = 0.f;
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

__global__ void propagate_labels_kernel(const float* __restrict__ query, const float* __restrict__ first_feats,
                                        const float* __restrict__ first_labels, const float* __restrict__ ctx_feats,
                                        const float* __restrict__ ctx_labels, int64_t N, int64_t D, int64_t N0,
                                        int64_t n, int64_t K, int64_t h, int64_t w, int k, double radius,
                                        float inv_temp, float* __restrict__ vals_all, int64_t* __restrict__ idx_all,
                                        float* __restrict__ out) {
  const int64_t qi = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (qi >= N) return;
  const float* q = query + qi * D;
  float* vals = vals_all + qi * k;
  int64_t* idx = idx_all + qi * k;
  int count = 0;
  for (int64_t i = 0; i < N0; ++i) topk_insert(vals, idx, count, k, dot(q, first_feats + i * D, D), i);
  const int64_t qy = qi / w, qx = qi % w;
  const int reach = disc_reach(radius);
  for (int64_t j = 0; j < n; ++j) {
    const float* frame = ctx_feats + j * N * D;
    for (int dy = -reach; dy <= reach; ++dy) {
      const int hw = disc_half_width(dy, radius);
      const int64_t y = qy + dy;
      if (hw < 0 || y < 0 || y >= h) continue;
      const int64_t x0 = qx - hw < 0 ? 0 : qx - hw;
      const int64_t x1 = qx + hw > w - 1 ? w - 1 : qx + hw;
      for (int64_t x = x0; x <= x1; ++x) {
        const int64_t m = y * w + x;
        topk_insert(vals, idx, count, k, dot(q, frame + m * D, D), N0 + j * N + m);
      }
    }
  }
  softmax_aggregate(vals, idx, count, inv_temp, first_labels, N0, ctx_labels, K, out + qi * K);
}

}  // namespace

void launch_propagate_labels(const float* query, const float* first_feats, const float* first_labels,
                             const float* ctx_feats, const float* ctx_labels, int64_t N, int64_t D, int64_t N0,
                             int64_t n, int64_t K, int64_t h, int64_t w, int k, double radius, double temperature,
                             float* vals, int64_t* idx, float* out, cudaStream_t stream) {
  if (N == 0 || K == 0) return;
  const int blocks = static_cast<int>((N + kThreads - 1) / kThreads);
  SMTC_LAUNCH(blocks, kThreads, 0, stream, propagate_labels_kernel)(query, first_feats, first_labels, ctx_feats, ctx_labels,
                                                           N, D, N0, n, K, h, w, k, radius,
                                                           static_cast<float>(1.0 / temperature), vals, idx, out);
  check_launch("smtc_fast propagate_labels_kernel");
}

}  // namespace propagate
}  // namespace smtc
