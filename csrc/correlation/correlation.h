// Batched correlation C[b, n, m] = <a[b, n, :], b[b, m, :]> and its backward, all three as one strided
// batched product  out[b, i, j] = sum_k x[b, i, k] * y[b, j, k]  (shared by the CPU and CUDA kernels):
//   forward   C      : x = a (i = n, k = d),          y = b (j = m, k = d)
//   grad_a = G b     : x = G (i = n, k = m),          y = b viewed (j = d, k = m)
//   grad_b = G^T a   : x = G^T (i = m, k = n),        y = a viewed (j = d, k = n)
//
//   a (B, N, D), b (B, M, D), grad G (B, N, M); accumulation in float for half/bf16 (acc_t).
#pragma once

#include "common/math.h"

namespace smtc {
namespace correlation {

// Strides of one operand of the product, in elements.
struct Operand {
  int64_t batch, row, k;
};

// One output element by a plain loop: the reference arithmetic for tile edges and tiny problems.
template <typename T>
SMTC_HD acc_t<T> dot_strided(const T* x, int64_t xk, const T* y, int64_t yk, int64_t K) {
  acc_t<T> s = acc_t<T>(0);
  for (int64_t k = 0; k < K; ++k) s += static_cast<acc_t<T>>(x[k * xk]) * static_cast<acc_t<T>>(y[k * yk]);
  return s;
}

}  // namespace correlation
}  // namespace smtc
