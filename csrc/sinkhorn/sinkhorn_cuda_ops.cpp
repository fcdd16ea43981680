// CUDA wrapper of smtc_fast::sinkhorn and its backward: validation, device guard, workspaces, current stream.
#include <torch/library.h>

#include "common/cuda_wrap.h"
#include "sinkhorn/sinkhorn_check.h"
#include "sinkhorn/sinkhorn_cuda.h"

namespace smtc {
namespace sinkhorn {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_cuda(const at::Tensor& cost_in, const at::Tensor& log_mu_in,
                                                            const at::Tensor& log_nu_in, double eps, int64_t iters,
                                                            c10::optional<double> tol) {
  check_sinkhorn_args(cost_in, log_mu_in, log_nu_in, eps, iters, tol);
  TORCH_CHECK(cost_in.scalar_type() == at::kFloat || cost_in.scalar_type() == at::kDouble,
              "smtc_fast::sinkhorn CUDA kernel supports float32/float64 cost, got ", cost_in.scalar_type());
  SMTC_CHECK_KERNEL_DEVICE(cost_in);
  const DeviceGuard guard(cost_in.device());
  const auto cost = cost_in.contiguous();
  const auto log_mu = log_mu_in.contiguous();
  const auto log_nu = log_nu_in.contiguous();
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  auto plan = at::empty_like(cost);
  auto f = at::zeros({B, N}, cost.options());
  auto g = at::zeros({B, M}, cost.options());
  if (cost.numel() > 0) {
    launch_sinkhorn_forward(dtype_code(cost), cost.data_ptr(), log_mu.data_ptr(), log_nu.data_ptr(), eps, iters,
                            tol.value_or(-1.0), B, N, M, plan.data_ptr(), f.data_ptr(), g.data_ptr(),
                            current_stream(cost));
  }
  return {plan, f, g};
}

at::Tensor sinkhorn_backward_cuda(const at::Tensor& grad_plan_in, const at::Tensor& grad_f_in,
                                  const at::Tensor& grad_g_in, const at::Tensor& cost_in, const at::Tensor& log_mu_in,
                                  const at::Tensor& log_nu_in, double eps, int64_t iters, c10::optional<double> tol) {
  check_sinkhorn_args(cost_in, log_mu_in, log_nu_in, eps, iters, tol);
  check_sinkhorn_grads(grad_plan_in, grad_f_in, grad_g_in, cost_in);
  SMTC_CHECK_KERNEL_DEVICE(cost_in);
  const DeviceGuard guard(cost_in.device());
  const auto cost = cost_in.contiguous();
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  auto grad_cost = at::empty_like(cost);
  if (cost.numel() == 0) return grad_cost;
  auto f_hist = at::empty({B, iters + 1, N}, cost.options());
  auto g_hist = at::empty({B, iters + 1, M}, cost.options());
  auto gf = at::empty({B, N}, cost.options());
  auto gg = at::empty({B, 2, M}, cost.options());
  const auto grad_plan = grad_plan_in.contiguous();
  const auto grad_f = grad_f_in.contiguous();
  const auto grad_g = grad_g_in.contiguous();
  const auto log_mu = log_mu_in.contiguous();
  const auto log_nu = log_nu_in.contiguous();
  launch_sinkhorn_backward(dtype_code(cost), grad_plan.data_ptr(), grad_f.data_ptr(), grad_g.data_ptr(),
                           cost.data_ptr(), log_mu.data_ptr(), log_nu.data_ptr(), eps, iters, tol.value_or(-1.0), B,
                           N, M, f_hist.data_ptr(), g_hist.data_ptr(), gf.data_ptr(), gg.data_ptr(),
                           grad_cost.data_ptr(), current_stream(cost));
  return grad_cost;
}

}  // namespace

SMTC_CUDA_IMPL(m) {
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("_sinkhorn_backward", &sinkhorn_backward_cuda);
}

}  // namespace sinkhorn
}  // namespace smtc
