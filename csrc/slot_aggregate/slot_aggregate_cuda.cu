// CUDA kernels of the slot-aggregation attention: one block per (frame, group) tile, a thread per token for
// the softmax over P (a column), shared-memory reductions over tokens for the per-slot sums (rows).
// The contractions with the values run on correlation's strided GEMM kernel (see slot_aggregate_cuda.cpp).
#include "common/cuda_utils.cuh"
#include "slot_aggregate/slot_aggregate.h"
#include "slot_aggregate/slot_aggregate_cuda.h"

namespace smtc {
namespace slot_aggregate {
namespace {

constexpr int kThreads = 256;

// Column softmax statistics of token n: max over P and 1/sum exp(l - max).
template <typename T, typename A>
__device__ __forceinline__ void column_stats(const T* L, int64_t P, int64_t N, int64_t n, A& mx, A& inv) {
  mx = neg_inf<A>();
  for (int64_t q = 0; q < P; ++q) mx = vmax(mx, to_acc<A>(L[q * N + n]));
  A s = A(0);
  for (int64_t q = 0; q < P; ++q) s += fast_exp(to_acc<A>(L[q * N + n]) - mx);
  inv = A(1) / s;
}

template <typename T>
__global__ void attention_forward_kernel(const T* __restrict__ logits, const T* __restrict__ mask, acc_t<T> eps,
                                         int64_t P, int64_t N, T* __restrict__ attn) {
  using A = acc_t<T>;
  extern __shared__ unsigned char smem_raw[];
  A* rowsum = reinterpret_cast<A*>(smem_raw);  // (P)
  const int64_t bg = blockIdx.x;
  const T* L = logits + bg * P * N;
  const T* Mk = mask ? mask + bg * N : nullptr;
  T* W = attn + bg * P * N;
  for (int64_t q = threadIdx.x; q < P; q += blockDim.x) rowsum[q] = A(0);
  __syncthreads();
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    A mx, inv;
    column_stats(L, P, N, n, mx, inv);
    const A m = Mk ? to_acc<A>(Mk[n]) : A(1);
    for (int64_t q = 0; q < P; ++q) {
      atomicAdd(&rowsum[q], masked_numerator(fast_exp(to_acc<A>(L[q * N + n]) - mx), inv, eps, m));
    }
  }
  __syncthreads();
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    const A m = Mk ? to_acc<A>(Mk[n]) : A(1);
    A mx, inv;
    column_stats(L, P, N, n, mx, inv);
    for (int64_t q = 0; q < P; ++q) {
      // Recompute the numerator in acc_t rather than re-reading a rounded half/bf16 copy.
      const A a = masked_numerator(fast_exp(to_acc<A>(L[q * N + n]) - mx), inv, eps, m);
      W[q * N + n] = from_acc<T>(a / denominator(rowsum[q], eps, Mk != nullptr));
    }
  }
}

template <typename T>
__global__ void attention_backward_kernel(const T* __restrict__ logits, const T* __restrict__ mask,
                                          const T* __restrict__ attn, acc_t<T> eps, int64_t P, int64_t N,
                                          T* __restrict__ gw_io) {
  using A = acc_t<T>;
  extern __shared__ unsigned char smem_raw[];
  A* z = reinterpret_cast<A*>(smem_raw);  // (P) denominators
  A* dot = z + P;                          // (P) <gw, attn> per slot
  const int64_t bg = blockIdx.x;
  const T* L = logits + bg * P * N;
  const T* Mk = mask ? mask + bg * N : nullptr;
  const T* W = attn + bg * P * N;
  T* GW = gw_io + bg * P * N;
  for (int64_t q = threadIdx.x; q < P; q += blockDim.x) z[q] = dot[q] = A(0);
  __syncthreads();
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    A mx, inv;
    column_stats(L, P, N, n, mx, inv);
    const A m = Mk ? to_acc<A>(Mk[n]) : A(1);
    for (int64_t q = 0; q < P; ++q) {
      atomicAdd(&z[q], masked_numerator(fast_exp(to_acc<A>(L[q * N + n]) - mx), inv, eps, m));
      atomicAdd(&dot[q], to_acc<A>(GW[q * N + n]) * to_acc<A>(W[q * N + n]));
    }
  }
  __syncthreads();
  for (int64_t q = threadIdx.x; q < P; q += blockDim.x) z[q] = denominator(z[q], eps, Mk != nullptr);
  __syncthreads();
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    A mx, inv;
    column_stats(L, P, N, n, mx, inv);
    const A m = Mk ? to_acc<A>(Mk[n]) : A(1);
    A coldot = A(0);
    for (int64_t q = 0; q < P; ++q) {
      const A p = fast_exp(to_acc<A>(L[q * N + n]) - mx) * inv;
      coldot += renorm_grad(to_acc<A>(GW[q * N + n]), dot[q], z[q]) * m * p;
    }
    for (int64_t q = 0; q < P; ++q) {
      const A p = fast_exp(to_acc<A>(L[q * N + n]) - mx) * inv;
      const A gp = renorm_grad(to_acc<A>(GW[q * N + n]), dot[q], z[q]) * m;
      GW[q * N + n] = from_acc<T>(softmax_grad(p, gp, coldot));  // each (q, n) is owned by this thread
    }
  }
}

}  // namespace

void launch_attention_forward(DType dtype, const void* logits, const void* mask, double eps, int64_t B, int64_t G,
                              int64_t P, int64_t N, void* attn, cudaStream_t stream) {
  if (B * G == 0 || P == 0 || N == 0) return;
  SMTC_DISPATCH_ALL_FLOATS(dtype, "smtc_fast::slot_aggregate (CUDA)", [&] {
    using A = acc_t<scalar_t>;
    attention_forward_kernel<scalar_t><<<B * G, kThreads, P * sizeof(A), stream>>>(
        static_cast<const scalar_t*>(logits), static_cast<const scalar_t*>(mask), static_cast<A>(eps), P, N,
        static_cast<scalar_t*>(attn));
  });
  check_launch("smtc_fast attention_forward_kernel");
}

void launch_attention_backward(DType dtype, const void* logits, const void* mask, const void* attn, double eps,
                               int64_t B, int64_t G, int64_t P, int64_t N, void* gw, cudaStream_t stream) {
  if (B * G == 0 || P == 0 || N == 0) return;
  SMTC_DISPATCH_ALL_FLOATS(dtype, "smtc_fast::_slot_aggregate_backward (CUDA)", [&] {
    using A = acc_t<scalar_t>;
    attention_backward_kernel<scalar_t><<<B * G, kThreads, 2 * P * sizeof(A), stream>>>(
        static_cast<const scalar_t*>(logits), static_cast<const scalar_t*>(mask),
        static_cast<const scalar_t*>(attn), static_cast<A>(eps), P, N, static_cast<scalar_t*>(gw));
  });
  check_launch("smtc_fast attention_backward_kernel");
}

}  // namespace slot_aggregate
}  // namespace smtc
