// CUDA kernel of the strided batched product (correlation.h): 32 x 32 output tiles, K streamed through
// shared memory in chunks of 32, each thread accumulating 4 outputs in acc_t (float for half/bf16).
// A plain SIMT GEMM: it keeps the op self-contained and exact in float; tensor-core paths are future work.
#include "common/cuda_utils.cuh"
#include "correlation/correlation_cuda.h"

namespace smtc {
namespace correlation {
namespace {

constexpr int kTile = 32;
constexpr int kRows = 8;  // threads along i; each covers kTile / kRows = 4 rows

template <typename T>
__global__ void gemm_nt_kernel(const T* __restrict__ x, Operand xs, const T* __restrict__ y, Operand ys,
                               T* __restrict__ out, int64_t I, int64_t J, int64_t K) {
  using A = acc_t<T>;
  __shared__ A xt[kTile][kTile + 1];
  __shared__ A yt[kTile][kTile + 1];
  const int64_t b = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const T* xb = x + b * xs.batch;
  const T* yb = y + b * ys.batch;
  A acc[kTile / kRows];
#pragma unroll
  for (int q = 0; q < kTile / kRows; ++q) acc[q] = A(0);
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    const int64_t k = k0 + tx;
    for (int r = ty; r < kTile; r += kRows) {
      const int64_t i = i0 + r, j = j0 + r;
      xt[r][tx] = (i < I && k < K) ? to_acc<A>(xb[i * xs.row + k * xs.k]) : A(0);
      yt[r][tx] = (j < J && k < K) ? to_acc<A>(yb[j * ys.row + k * ys.k]) : A(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      const A yv = yt[tx][kk];
#pragma unroll
      for (int q = 0; q < kTile / kRows; ++q) acc[q] += xt[ty + q * kRows][kk] * yv;
    }
    __syncthreads();
  }
  const int64_t j = j0 + tx;
#pragma unroll
  for (int q = 0; q < kTile / kRows; ++q) {
    const int64_t i = i0 + ty + q * kRows;
    if (i < I && j < J) out[(b * I + i) * J + j] = from_acc<T>(acc[q]);
  }
}

}  // namespace

void launch_gemm_nt(DType dtype, const void* x, Operand xs, const void* y, Operand ys, void* out, int64_t B,
                    int64_t I, int64_t J, int64_t K, cudaStream_t stream) {
  if (B == 0 || I == 0 || J == 0) return;
  const dim3 grid((J + kTile - 1) / kTile, (I + kTile - 1) / kTile, B);
  const dim3 block(kTile, kRows);
  SMTC_DISPATCH_ALL_FLOATS(dtype, "smtc_fast::correlation (CUDA)", [&] {
    gemm_nt_kernel<scalar_t><<<grid, block, 0, stream>>>(static_cast<const scalar_t*>(x), xs,
                                                          static_cast<const scalar_t*>(y), ys,
                                                          static_cast<scalar_t*>(out), I, J, K);
  });
  check_launch("smtc_fast gemm_nt_kernel");
}

}  // namespace correlation
}  // namespace smtc
