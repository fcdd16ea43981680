// Launchers of the batched log-domain Sinkhorn kernels (sinkhorn.h). Raw contiguous pointers.
#pragma once

#include "common/cuda_launch.h"

namespace smtc {
namespace sinkhorn {

// plan (B, N, M), f (B, N), g (B, M). tol < 0: none.
void launch_sinkhorn_forward(DType dtype, const void* cost, const void* log_mu, const void* log_nu, double eps,
                             int64_t iters, double tol, int64_t B, int64_t N, int64_t M, void* plan, void* f, void* g,
                             cudaStream_t stream);

// grad_cost (B, N, M). workspace: f_hist (B, iters+1, N), g_hist (B, iters+1, M), gf (B, N), gg (B, 2, M).
void launch_sinkhorn_backward(DType dtype, const void* grad_plan, const void* grad_f, const void* grad_g,
                              const void* cost, const void* log_mu, const void* log_nu, double eps, int64_t iters,
                              double tol, int64_t B, int64_t N, int64_t M, void* f_hist, void* g_hist, void* gf,
                              void* gg, void* grad_cost, cudaStream_t stream);

}  // namespace sinkhorn
}  // namespace smtc
