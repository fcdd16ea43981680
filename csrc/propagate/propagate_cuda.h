// Launcher of the fused label-propagation kernel (propagate.h). Raw float32 pointers, all contiguous;
// vals (N, k) float32 and idx (N, k) int64 are the per-query top-k workspaces, needed (else null) only when
// propagate_topk_in_smem(k) is false.
#pragma once

#include "common/cuda_launch.h"

namespace smtc {
namespace propagate {

// Whether the kernel keeps the top-k lists of a query tile in shared memory (no global workspace).
bool propagate_topk_in_smem(int k);

void launch_propagate_labels(const float* query, const float* first_feats, const float* first_labels,
                             const float* ctx_feats, const float* ctx_labels, int64_t N, int64_t D, int64_t N0,
                             int64_t n, int64_t K, int64_t h, int64_t w, int k, double radius, double temperature,
                             float* vals, int64_t* idx, float* out, cudaStream_t stream);

}  // namespace propagate
}  // namespace smtc
