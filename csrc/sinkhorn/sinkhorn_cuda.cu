// CUDA kernels of the batched log-domain Sinkhorn: one block per problem, all iterations inside the block
// (the problem's cost is re-read from L2, never written back; one launch for the whole solve).
//
// Sizes it is for: many small problems (SMTC: B = 384 problems of 256 x 256, or 1024 x 1024 at stride 8), B at
// least the number of SMs (132 on an H100) so that every SM has a problem. A handful of large problems (B < ~32,
// N*M >> 1e6) runs on a handful of SMs, serially inside each block; split such problems over several blocks (or
// use the reference, which is GPU-wide per iteration) if that is your workload.
//
// Roofline at SMTC's shape on an H100 SXM (B = 384 problems of 256 x 256, float32, 3 iterations): the cost (100 MB)
// read and the plan (100 MB) written at least once: 200 MB -> 60 us at 3.35 TB/s. The forward's 7 passes over the
// cost (f and g per iteration, then the plan) take 7 exps per element: 176 M exps at 16 per SM per clock (the SFU's
// MUFU.EX2 rate on sm_90) x 132 SMs x 1.75 GHz = 48 us. All 384 blocks are resident at once (8 per SM), so their
// 100 MB of costs do not fit the 50 MB L2 and each pass re-reads from DRAM: 7 x 100 + 100 MB = 800 MB -> 240 us.
// Memory bound; a kernel that kept a problem's exp(-C/eps) in shared memory (256 KB does not fit 227 KB) or split it
// over a cluster would approach the 60 us floor. The backward (history + 2 passes per iteration) is ~2x the forward.
#include "common/cuda_utils.cuh"
#include "sinkhorn/sinkhorn.h"
#include "sinkhorn/sinkhorn_cuda.h"

namespace smtc {
namespace sinkhorn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 2147483647;  // gridDim.x limit

template <typename T>
__device__ void update_f(const T* C, const T* g, const T* lm, T eps, int64_t N, int64_t M, T* f) {
  const T inv_eps = T(1) / eps;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t n = warp; n < N; n += kWarps) {
    T mx = neg_inf<T>(), s = T(0);
    for (int64_t m = lane; m < M; m += 32) lse_push(mx, s, (g[m] - C[n * M + m]) * inv_eps);
    warp_lse(mx, s);
    if (lane == 0) f[n] = potential(eps, lm[n], mx, s);
  }
}

template <typename T>
__device__ void update_g(const T* C, const T* f, const T* ln, T eps, int64_t N, int64_t M, T* g) {
  const T inv_eps = T(1) / eps;
  for (int64_t m = threadIdx.x; m < M; m += kThreads) {
    T mx = neg_inf<T>(), s = T(0);
    for (int64_t n = 0; n < N; ++n) lse_push(mx, s, (f[n] - C[n * M + m]) * inv_eps);
    g[m] = potential(eps, ln[m], mx, s);
  }
}

// Block-wide L1 row-marginal error of the current plan; the same value in every thread.
template <typename T>
__device__ T row_error(const T* C, const T* f, const T* g, const T* lm, T eps, int64_t N, int64_t M, T* red) {
  const T inv_eps = T(1) / eps;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T err = T(0);
  for (int64_t n = warp; n < N; n += kWarps) {
    T s = T(0);
    for (int64_t m = lane; m < M; m += 32) s += plan_entry(f[n], g[m], C[n * M + m], inv_eps);
    s = warp_sum(s);
    err += fabs(s - fast_exp(lm[n]));
  }
  if (lane == 0) red[warp] = err;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < kWarps; ++w) total += red[w];
  __syncthreads();
  return total;
}

// Runs one problem's iterations; with history, potential t lives at f_hist + t*N, g_hist + t*M.
template <typename T>
__device__ int64_t solve(const T* C, const T* lm, const T* ln, T eps, int64_t iters, double tol, int64_t N, int64_t M,
                         T* f_hist, T* g_hist, bool history, T* red) {
  for (int64_t m = threadIdx.x; m < M; m += kThreads) g_hist[m] = T(0);
  for (int64_t n = threadIdx.x; n < N; n += kThreads) f_hist[n] = T(0);
  __syncthreads();
  T* f = f_hist;
  T* g = g_hist;
  int64_t t = 0;
  while (t < iters) {
    T* f_next = history ? f + N : f;
    T* g_next = history ? g + M : g;
    update_f(C, g, lm, eps, N, M, f_next);
    __syncthreads();
    update_g(C, f_next, ln, eps, N, M, g_next);
    __syncthreads();
    f = f_next;
    g = g_next;
    ++t;
    if (tol >= 0 && static_cast<double>(row_error(C, f, g, lm, eps, N, M, red)) < tol) break;
  }
  return t;
}

template <typename T>
__global__ void sinkhorn_forward_kernel(const T* __restrict__ cost, const T* __restrict__ log_mu,
                                        const T* __restrict__ log_nu, T eps, int64_t iters, double tol, int64_t b0,
                                        int64_t N,
                                        int64_t M, T* __restrict__ plan, T* __restrict__ f_out,
                                        T* __restrict__ g_out) {
  __shared__ T red[kWarps];
  const int64_t b = b0 + blockIdx.x;
  const T* C = cost + b * N * M;
  T* f = f_out + b * N;
  T* g = g_out + b * M;
  solve(C, log_mu + b * N, log_nu + b * M, eps, iters, tol, N, M, f, g, false, red);
  const T inv_eps = T(1) / eps;
  T* P = plan + b * N * M;
  // Rows by warps, columns by lanes: coalesced, and no 64-bit division or modulo per element.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t n = warp; n < N; n += kWarps) {
    const T fn = f[n];
    for (int64_t m = lane; m < M; m += 32) P[n * M + m] = plan_entry(fn, g[m], C[n * M + m], inv_eps);
  }
}

template <typename T>
__global__ void sinkhorn_backward_kernel(const T* __restrict__ grad_plan, const T* __restrict__ grad_f,
                                         const T* __restrict__ grad_g, const T* __restrict__ cost,
                                         const T* __restrict__ log_mu, const T* __restrict__ log_nu, T eps,
                                         int64_t iters, double tol, int64_t b0, int64_t N, int64_t M, T* f_hist_all,
                                         T* g_hist_all, T* gf_all, T* gg_all, T* __restrict__ grad_cost) {
  __shared__ T red[kWarps];
  const int64_t b = b0 + blockIdx.x;
  const T* C = cost + b * N * M;
  const T* lm = log_mu + b * N;
  const T* ln = log_nu + b * M;
  const T* GP = grad_plan + b * N * M;
  T* GC = grad_cost + b * N * M;
  T* f_hist = f_hist_all + b * (iters + 1) * N;
  T* g_hist = g_hist_all + b * (iters + 1) * M;
  T* gf = gf_all + b * N;
  T* gg = gg_all + b * 2 * M;
  T* gg_prev = gg + M;
  const T inv_eps = T(1) / eps;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  const int64_t ran = solve(C, lm, ln, eps, iters, tol, N, M, f_hist, g_hist, true, red);
  const T* fT = f_hist + ran * N;
  const T* gT = g_hist + ran * M;
  // Seed from the plan: W = grad_plan * plan / eps; grad_C = -W; gf = grad_f + rowsum W; gg = grad_g + colsum W.
  for (int64_t n = warp; n < N; n += kWarps) {
    T rs = T(0);
    for (int64_t m = lane; m < M; m += 32) {
      const T w = GP[n * M + m] * plan_entry(fT[n], gT[m], C[n * M + m], inv_eps) * inv_eps;
      GC[n * M + m] = -w;
      rs += w;
    }
    rs = warp_sum(rs);
    if (lane == 0) gf[n] = grad_f[b * N + n] + rs;
  }
  for (int64_t m = threadIdx.x; m < M; m += kThreads) {
    T cs = T(0);
    for (int64_t n = 0; n < N; ++n) cs += GP[n * M + m] * plan_entry(fT[n], gT[m], C[n * M + m], inv_eps) * inv_eps;
    gg[m] = grad_g[b * M + m] + cs;
  }
  __syncthreads();
  for (int64_t t = ran; t >= 1; --t) {
    const T* ft = f_hist + t * N;
    const T* gt = g_hist + t * M;
    const T* gprev = g_hist + (t - 1) * M;
    // Through g_t: grad_C += gg * A_t, gf -= rowsum(gg * A_t).
    for (int64_t n = warp; n < N; n += kWarps) {
      T acc = T(0);
      for (int64_t m = lane; m < M; m += 32) {
        const T w = gg[m] * lse_weight(ft[n], gt[m], C[n * M + m], inv_eps, ln[m]);
        GC[n * M + m] += w;
        acc += w;
      }
      acc = warp_sum(acc);
      if (lane == 0) gf[n] -= acc;
    }
    __syncthreads();
    // Through f_t: grad_C += gf * B_t, gg_prev = -colsum(gf * B_t).
    for (int64_t m = threadIdx.x; m < M; m += kThreads) {
      T acc = T(0);
      for (int64_t n = 0; n < N; ++n) {
        const T w = gf[n] * lse_weight(ft[n], gprev[m], C[n * M + m], inv_eps, lm[n]);
        GC[n * M + m] += w;
        acc += w;
      }
      gg_prev[m] = -acc;
    }
    __syncthreads();
    for (int64_t m = threadIdx.x; m < M; m += kThreads) gg[m] = gg_prev[m];
    for (int64_t n = threadIdx.x; n < N; n += kThreads) gf[n] = T(0);  // f_{t-1} feeds only g_{t-1}
    __syncthreads();
  }
}

}  // namespace

void launch_sinkhorn_forward(DType dtype, const void* cost, const void* log_mu, const void* log_nu, double eps,
                             int64_t iters, double tol, int64_t B, int64_t N, int64_t M, void* plan, void* f, void* g,
                             cudaStream_t stream) {
  if (B == 0) return;
  SMTC_DISPATCH_FLOAT_DOUBLE(dtype, "smtc_fast::sinkhorn (CUDA)", [&] {
    for (int64_t b0 = 0; b0 < B; b0 += kMaxBlocks) {  // gridDim.x <= 2^31 - 1
      const auto blocks = static_cast<unsigned>(B - b0 < kMaxBlocks ? B - b0 : kMaxBlocks);
      SMTC_LAUNCH(blocks, kThreads, 0, stream, sinkhorn_forward_kernel<scalar_t>)(
          static_cast<const scalar_t*>(cost), static_cast<const scalar_t*>(log_mu),
          static_cast<const scalar_t*>(log_nu), static_cast<scalar_t>(eps), iters, tol, b0, N, M,
          static_cast<scalar_t*>(plan), static_cast<scalar_t*>(f), static_cast<scalar_t*>(g));
      check_launch("smtc_fast sinkhorn_forward_kernel");
    }
  });
}

void launch_sinkhorn_backward(DType dtype, const void* grad_plan, const void* grad_f, const void* grad_g,
                              const void* cost, const void* log_mu, const void* log_nu, double eps, int64_t iters,
                              double tol, int64_t B, int64_t N, int64_t M, void* f_hist, void* g_hist, void* gf,
                              void* gg, void* grad_cost, cudaStream_t stream) {
  if (B == 0) return;
  SMTC_DISPATCH_FLOAT_DOUBLE(dtype, "smtc_fast::_sinkhorn_backward (CUDA)", [&] {
    for (int64_t b0 = 0; b0 < B; b0 += kMaxBlocks) {
      const auto blocks = static_cast<unsigned>(B - b0 < kMaxBlocks ? B - b0 : kMaxBlocks);
      SMTC_LAUNCH(blocks, kThreads, 0, stream, sinkhorn_backward_kernel<scalar_t>)(
          static_cast<const scalar_t*>(grad_plan), static_cast<const scalar_t*>(grad_f),
          static_cast<const scalar_t*>(grad_g), static_cast<const scalar_t*>(cost),
          static_cast<const scalar_t*>(log_mu), static_cast<const scalar_t*>(log_nu), static_cast<scalar_t>(eps),
          iters, tol, b0, N, M, static_cast<scalar_t*>(f_hist), static_cast<scalar_t*>(g_hist),
          static_cast<scalar_t*>(gf), static_cast<scalar_t*>(gg), static_cast<scalar_t*>(grad_cost));
      check_launch("smtc_fast sinkhorn_backward_kernel");
    }
  });
}

}  // namespace sinkhorn
}  // namespace smtc
