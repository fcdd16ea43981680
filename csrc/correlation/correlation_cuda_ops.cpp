// CUDA wrapper of smtc_fast::correlation. The op is a batched GEMM (C = a b^T), which is the vendor library's job
// (house style rule 6): forward and backward go to cuBLAS through at::bmm on the current stream, honouring torch's
// TF32 (torch.backends.cuda.matmul.allow_tf32) and reduced-precision-reduction settings, with tensor cores for
// half/bf16. A custom kernel would have to fuse something a GEMM cannot to earn its place; nothing here does.
// (Our SIMT 32x32-tile kernel that this replaces ran at a fraction of cuBLAS's rate, without tensor cores.)
//
// Roofline at SMTC's fusion shape on an H100 SXM (128 frames, N = M = 256, D = 384): 2*128*256*256*384 = 6.4 GFLOP;
// a and b read (2 x 50 MB) and C written (33.5 MB) = 134 MB -> 40 us at 3.35 TB/s. float32 without TF32 (torch's
// default) is compute bound: 6.4 GFLOP at 67 TFLOP/s = 96 us; with TF32 (495 TFLOP/s, 13 us) or bf16 (67 MB, 20 us)
// it is memory bound. cuBLAS gets close to either bound; a hand-written SIMT kernel does not.
//
// Compiled twice (common/cuda_wrap.h): in the CPU execution tier at::bmm runs on the host.
#include <torch/library.h>

#include "common/cuda_wrap.h"
#include "correlation/correlation_check.h"

namespace smtc {
namespace correlation {
namespace {

at::Tensor correlation_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_correlation_args(a, b);
  SMTC_CHECK_KERNEL_DEVICE(a);
  const DeviceGuard guard(a.device());
  return at::bmm(a, b.transpose(1, 2));
}

std::tuple<at::Tensor, at::Tensor> correlation_backward_cuda(const at::Tensor& grad, const at::Tensor& a,
                                                             const at::Tensor& b) {
  check_correlation_args(a, b);
  check_correlation_grad(grad, a, b);
  SMTC_CHECK_KERNEL_DEVICE(a);
  const DeviceGuard guard(a.device());
  // grad_a = G b, grad_b = G^T a
  return {at::bmm(grad, b), at::bmm(grad.transpose(1, 2), a)};
}

}  // namespace

SMTC_CUDA_IMPL(m) {
  m.impl("correlation", &correlation_cuda);
  m.impl("_correlation_backward", &correlation_backward_cuda);
}

}  // namespace correlation
}  // namespace smtc
