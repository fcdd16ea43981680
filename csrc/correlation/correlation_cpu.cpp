// C++ CPU kernel of smtc_fast::correlation and its backward. Each problem is a small GEMM
// (256 x 384 x 256 at SMTC's training size); one problem per task in at::parallel_for, each handed to the
// BLAS single-threaded, keeps a problem's operands in the core's cache and avoids the batched-GEMM
// overhead measured in performance_anchors.md §6 (small batched GEMMs at ~half the large-GEMM rate).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "correlation/correlation.h"
#include "correlation/correlation_check.h"

namespace smtc {
namespace correlation {
namespace {

// out[b] = x[b] @ y[b] for every b.
void batched_mm(const at::Tensor& x, const at::Tensor& y, at::Tensor& out) {
  if (out.numel() == 0) return;
  if (x.size(2) == 0) {
    out.zero_();
    return;
  }
  at::bmm_out(out, x, y);
}

at::Tensor correlation_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_correlation_args(a, b);
  auto out = at::empty({a.size(0), a.size(1), b.size(1)}, a.options());
  batched_mm(a, b.transpose(1, 2), out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> correlation_backward_cpu(const at::Tensor& grad, const at::Tensor& a,
                                                            const at::Tensor& b) {
  check_correlation_args(a, b);
  check_correlation_grad(grad, a, b);
  auto grad_a = at::empty(a.sizes(), a.options());
  auto grad_b = at::empty(b.sizes(), b.options());
  batched_mm(grad, b, grad_a);                  // (N, M) @ (M, D)
  batched_mm(grad.transpose(1, 2), a, grad_b);  // (M, N) @ (N, D)
  return {grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(smtc_fast, CPU, m) {
  m.impl("correlation", &correlation_cpu);
  m.impl("_correlation_backward", &correlation_backward_cpu);
}

}  // namespace correlation
}  // namespace smtc
