// CUDA wrapper of smtc_fast::correlation: validation, device guard, current stream; kernels in the .cu.
#include <torch/library.h>

#include "common/cuda_wrap.h"
#include "correlation/correlation_check.h"
#include "correlation/correlation_cuda.h"

namespace smtc {
namespace correlation {
namespace {

Operand operand(const at::Tensor& t, int row_dim, int k_dim) { return {t.stride(0), t.stride(row_dim), t.stride(k_dim)}; }

at::Tensor correlation_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_correlation_args(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({a.size(0), a.size(1), b.size(1)}, a.options());
  launch_gemm_nt(dtype_code(a), a.data_ptr(), operand(a, 1, 2), b.data_ptr(), operand(b, 1, 2), out.data_ptr(),
                 a.size(0), a.size(1), b.size(1), a.size(2), current_stream(a));
  return out;
}

std::tuple<at::Tensor, at::Tensor> correlation_backward_cuda(const at::Tensor& grad, const at::Tensor& a,
                                                             const at::Tensor& b) {
  check_correlation_args(a, b);
  check_correlation_grad(grad, a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  auto grad_a = at::empty(a.sizes(), a.options());
  auto grad_b = at::empty(b.sizes(), b.options());
  const auto stream = current_stream(a);
  // grad_a[n, d] = sum_m G[n, m] b[m, d]:  x = G (i = n, k = m), y = b (j = d, k = m)
  launch_gemm_nt(dtype_code(a), grad.data_ptr(), operand(grad, 1, 2), b.data_ptr(), operand(b, 2, 1),
                 grad_a.data_ptr(), a.size(0), a.size(1), a.size(2), b.size(1), stream);
  // grad_b[m, d] = sum_n G[n, m] a[n, d]:  x = G^T (i = m, k = n), y = a (j = d, k = n)
  launch_gemm_nt(dtype_code(a), grad.data_ptr(), operand(grad, 2, 1), a.data_ptr(), operand(a, 2, 1),
                 grad_b.data_ptr(), b.size(0), b.size(1), b.size(2), a.size(1), stream);
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(smtc_fast, CUDA, m) {
  m.impl("correlation", &correlation_cuda);
  m.impl("_correlation_backward", &correlation_backward_cuda);
}

}  // namespace correlation
}  // namespace smtc
