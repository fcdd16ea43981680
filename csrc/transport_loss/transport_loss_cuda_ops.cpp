// CUDA wrapper of smtc_fast::transport_loss (fused L_sem) and its backward: the kernels of transport_loss_cuda.cu
// between cuBLAS GEMMs (at::bmm on the current stream, honouring torch's TF32 settings): the keys' dot products and
// the contractions of each pair's K with the teacher's masks. Compiled twice (common/cuda_wrap.h): for the GPU and
// for the CPU execution tier.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/cuda_wrap.h"
#include "transport_loss/transport_loss_check.h"
#include "transport_loss/transport_loss_cuda.h"

namespace smtc {
namespace transport_loss {
namespace {

// The clips processed together: their pairs' K blocks (P Bc n^2 values) stay within 2^23 values (32 MB in float32,
// inside an H100's 50 MB L2, so the pair kernel's passes over K hit L2), and at least one clip. Memory is bounded
// by the chunk, never pairs x n x n for the whole batch. The execution tier uses a small budget so that its tests,
// at small shapes, run several chunks.
#if defined(SMTC_CUDA_EMU)
constexpr int64_t kChunkElems = int64_t(1) << 13;
#else
constexpr int64_t kChunkElems = int64_t(1) << 23;
#endif

std::tuple<at::Tensor, at::Tensor> transport_loss_cuda(const at::Tensor& student_logits_in,
                                                       const at::Tensor& teacher_logits_in,
                                                       const at::Tensor& teacher_keys_in, double eps, int64_t iters,
                                                       c10::string_view marginals_in, c10::string_view cost_in) {
  const std::string marginals(marginals_in), cost(cost_in);
  check_transport_loss_args(student_logits_in, teacher_logits_in, teacher_keys_in, eps, iters, marginals, cost);
  SMTC_CHECK_KERNEL_DEVICE(student_logits_in);
  const DeviceGuard guard(student_logits_in.device());
  const auto zs = student_logits_in.contiguous();
  const auto zt = teacher_logits_in.contiguous();
  // bf16 keys (a bf16 forward's) are widened to the logits' float32: the kernel's GEMMs and passes are float32
  const auto keys = teacher_keys_in.to(zs.scalar_type()).contiguous();
  const int64_t B = zs.size(0), T = zs.size(1), S = zs.size(2), n = zs.size(3), D = keys.size(3);
  const double count = double(B * T * (T - 1));
  auto targets = at::empty(zs.sizes(), zs.options());
  if (targets.numel() == 0) {
    // As the CPU kernel: a zero sum (-0), or NaN for B = 0 (the reference's empty mean).
    return {at::full({}, -0.0 / count, zs.options()), targets};
  }
  const auto stream = current_stream(zs);
  const auto dt = dtype_code(zs);
  const auto opts = keys.options();
  auto inv = at::empty({B * T, n}, opts);
  auto mu = at::empty({B * T, n}, opts);
  auto pt = at::empty({B, T, S, n}, opts);
  launch_frame_stats(dt, keys.data_ptr(), zt.data_ptr(), B * T, n, D, S, marginals == "norm", inv.data_ptr(),
                     mu.data_ptr(), pt.data_ptr(), stream);

  const int64_t P = T * (T - 1) / 2;
  // Chunks of equal size (32 clips at SMTC's shape: 2 chunks of 16, not 21 + 11, so both fill the GPU alike).
  const int64_t max_bc = std::max<int64_t>(1, std::min<int64_t>(B, kChunkElems / (P * n * n)));
  const int64_t chunks = (B + max_bc - 1) / max_bc;
  const int64_t Bc = (B + chunks - 1) / chunks;
  auto dots = at::empty({Bc * P * n * n}, opts);
  auto a1 = at::empty({P * Bc * n}, opts), a2 = at::empty({P * Bc * n}, opts);
  auto y1 = at::empty({P * Bc * S * n}, opts), y2 = at::empty({P * Bc * S * n}, opts);
  auto z1 = at::empty({P * Bc * S * n}, opts), z2 = at::empty({P * Bc * S * n}, opts);
  auto flag = at::empty({P * Bc}, opts.dtype(at::kInt));
  auto loss_part = at::empty({B * T}, opts);
  // iters = 0 only: exp(-C/eps) = exp(-(1 - cos)/eps) * exp(1/eps) for C = -cos (transport_loss.h)
  const double iters0_factor = cost == "neg_cos" ? std::exp(1.0 / eps) : 1.0;
  for (int64_t c0 = 0; c0 < B; c0 += Bc) {
    const int64_t bc = std::min(Bc, B - c0);
    const auto kc = keys.narrow(0, c0, bc);  // (bc, T, n, D)
    // Per frame i: dots of its keys with frames i+1..T-1, (bc, n, (T-1-i) n), regions for i = 0, 1, .. in turn.
    std::vector<int64_t> region(T, 0);
    for (int64_t i = 0, off = 0; i + 1 < T; ++i) {
      const int64_t w = (T - 1 - i) * n;
      region[i] = off;
      auto out = dots.narrow(0, off, bc * n * w).view({bc, n, w});
      at::bmm_out(out, kc.select(1, i), kc.narrow(1, i + 1, T - 1 - i).reshape({bc, w, D}).transpose(1, 2));
      off += bc * n * w;
    }
    launch_pair_scalings(dt, dots.data_ptr(), keys.data_ptr(), inv.data_ptr(), mu.data_ptr(), pt.data_ptr(), c0, bc,
                         T, S, n, D, eps, iters, iters0_factor, a1.data_ptr(), a2.data_ptr(), y1.data_ptr(),
                         y2.data_ptr(), flag.data_ptr(), stream);
    // The contractions with the teacher masks, per pair p = (i, j) over the chunk's clips:
    //   z1[s, a] = sum_b y1[s, b] K[a, b]   (y1 = x1 * pt_j),   z2[s, b] = sum_a y2[s, a] K[a, b]   (y2 = x2 * pt_i)
    int64_t p = 0;
    for (int64_t i = 0; i + 1 < T; ++i) {
      const int64_t w = (T - 1 - i) * n;
      for (int64_t j = i + 1; j < T; ++j, ++p) {
        const auto K = dots.as_strided({bc, n, n}, {n * w, w, 1}, region[i] + (j - i - 1) * n);  // (bc, n, n)
        const int64_t o = p * bc * S * n;
        auto z1p = z1.narrow(0, o, bc * S * n).view({bc, S, n});
        auto z2p = z2.narrow(0, o, bc * S * n).view({bc, S, n});
        at::bmm_out(z1p, y1.narrow(0, o, bc * S * n).view({bc, S, n}), K.transpose(1, 2));
        at::bmm_out(z2p, y2.narrow(0, o, bc * S * n).view({bc, S, n}), K);
      }
    }
    launch_combine(dt, zs.data_ptr(), a1.data_ptr(), a2.data_ptr(), z1.data_ptr(), z2.data_ptr(), y1.data_ptr(),
                   y2.data_ptr(), flag.data_ptr(), c0, bc, T, S, n, targets.data_ptr(), loss_part.data_ptr(), stream);
  }
  // L = -1/(B T (T-1)) sum log(p_s + 1e-8) * targets, the frames' parts summed in double (a fixed-order reduction).
  auto loss = loss_part.to(at::kDouble).sum().neg().div(count).to(zs.scalar_type());
  return {loss, targets};
}

at::Tensor transport_loss_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& student_logits_in,
                                        const at::Tensor& targets_in) {
  check_transport_loss_grads(grad_loss_in, student_logits_in, targets_in);
  SMTC_CHECK_KERNEL_DEVICE(student_logits_in);
  const DeviceGuard guard(student_logits_in.device());
  const auto z = student_logits_in.contiguous();
  const auto targets = targets_in.contiguous();
  const auto grad_loss = grad_loss_in.contiguous();
  const int64_t B = z.size(0), T = z.size(1), S = z.size(2), n = z.size(3);
  auto grad = at::empty(z.sizes(), z.options());
  if (grad.numel() == 0) return grad;
  // grad_loss stays on the device: no host synchronisation in the backward.
  launch_backward(dtype_code(z), grad_loss.data_ptr(), z.data_ptr(), targets.data_ptr(), B * T, S, n,
                  double(B * T * (T - 1)), grad.data_ptr(), current_stream(z));
  return grad;
}

}  // namespace

SMTC_CUDA_IMPL(m) {
  m.impl("transport_loss", &transport_loss_cuda);
  m.impl("_transport_loss_backward", &transport_loss_backward_cuda);
}

}  // namespace transport_loss
}  // namespace smtc
