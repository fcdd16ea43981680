// CUDA wrapper of smtc_fast::propagate_labels: validation, device guard, top-k workspaces, current stream;
// the kernel is in propagate_cuda.cu.
#include <torch/library.h>

#include <algorithm>

#include "common/cuda_wrap.h"
#include "propagate/propagate_check.h"
#include "propagate/propagate_cuda.h"

namespace smtc {
namespace propagate {
namespace {

at::Tensor propagate_labels_cuda(const at::Tensor& query_in, const at::Tensor& first_feats_in,
                                 const at::Tensor& first_labels_in, const at::Tensor& ctx_feats_in,
                                 const at::Tensor& ctx_labels_in, at::IntArrayRef grid, int64_t topk, double radius,
                                 double temperature) {
  check_propagate_args(query_in, first_feats_in, first_labels_in, ctx_feats_in, ctx_labels_in, grid, topk, radius,
                       temperature);
  SMTC_CHECK_KERNEL_DEVICE(query_in);
  const DeviceGuard guard(query_in.device());
  const auto query = query_in.contiguous();
  const auto first_feats = first_feats_in.contiguous();
  const auto first_labels = first_labels_in.contiguous();
  const auto ctx_feats = ctx_feats_in.contiguous();
  const auto ctx_labels = ctx_labels_in.contiguous();
  const int64_t N = query.size(0), D = query.size(1), N0 = first_feats.size(0), n = ctx_feats.size(0);
  const int64_t K = first_labels.size(1);
  auto out = at::empty({N, K}, query.options());
  if (N == 0 || K == 0) return out;
  const int k = static_cast<int>(std::min<int64_t>(topk, N0 + n * N));
  // top-k workspaces only for a k whose lists do not fit in the kernel's shared memory
  const bool global_topk = !propagate_topk_in_smem(k);
  auto vals = at::empty({global_topk ? N : 0, k}, query.options());
  auto idx = at::empty({global_topk ? N : 0, k}, query.options().dtype(at::kLong));
  launch_propagate_labels(query.data_ptr<float>(), first_feats.data_ptr<float>(), first_labels.data_ptr<float>(),
                          ctx_feats.data_ptr<float>(), ctx_labels.data_ptr<float>(), N, D, N0, n, K, grid[0],
                          grid[1], k, radius, temperature, global_topk ? vals.data_ptr<float>() : nullptr,
                          global_topk ? idx.data_ptr<int64_t>() : nullptr, out.data_ptr<float>(),
                          current_stream(query));
  return out;
}

}  // namespace

SMTC_CUDA_IMPL(m) { m.impl("propagate_labels", &propagate_labels_cuda); }

}  // namespace propagate
}  // namespace smtc
