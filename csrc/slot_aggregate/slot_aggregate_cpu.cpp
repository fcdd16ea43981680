// C++ CPU kernel of smtc_fast::slot_aggregate and its backward. The attention (softmax over the slots of a
// group, +eps, mask, renormalisation over tokens) is one fused pass per (frame, group) tile that stays in
// L1/L2; the two contractions with the values are batched GEMMs (BLAS), the part no hand loop beats.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/alloc.h"
#include "common/cpu.h"
#include "slot_aggregate/slot_aggregate.h"
#include "slot_aggregate/slot_aggregate_check.h"

namespace smtc {
namespace slot_aggregate {
namespace {

// Softmax over the P rows of a tile, column by column, vectorised along the tokens:
// E = exp(L - column max) (P x N) and colinv = 1 / column sum of E, so softmax = E * colinv.
template <typename T>
SMTC_ALWAYS_INLINE void column_softmax_impl(const T* L, int64_t P, int64_t N, T* E, T* colmax, T* colinv) {
  std::fill(colmax, colmax + N, neg_inf<T>());
  for (int64_t q = 0; q < P; ++q) {
    const T* l = L + q * N;
    SMTC_SIMD
    for (int64_t n = 0; n < N; ++n) colmax[n] = vmax(colmax[n], l[n]);
  }
  std::fill(colinv, colinv + N, T(0));
  for (int64_t q = 0; q < P; ++q) {
    const T* l = L + q * N;
    T* e = E + q * N;
    SMTC_SIMD
    for (int64_t n = 0; n < N; ++n) {
      e[n] = fast_exp(l[n] - colmax[n]);
      colinv[n] += e[n];
    }
  }
  SMTC_SIMD
  for (int64_t n = 0; n < N; ++n) colinv[n] = T(1) / colinv[n];
}

// One (frame, group) tile: logits L (P x N) -> attn W (P x N). col* are N-long scratch rows.
template <typename T>
SMTC_ALWAYS_INLINE void forward_tile_impl(const T* L, const T* mask, T eps, int64_t P, int64_t N, T* W, T* colmax,
                                          T* colinv) {
  column_softmax_impl(L, P, N, W, colmax, colinv);  // W holds exp(logit - column max) for now
  const bool masked = mask != nullptr;
  for (int64_t q = 0; q < P; ++q) {
    T* w = W + q * N;
    T rowsum = T(0);
    if (masked) {
      SMTC_SIMD_SUM(rowsum)
      for (int64_t n = 0; n < N; ++n) {
        w[n] = masked_numerator(w[n], colinv[n], eps, mask[n]);
        rowsum += w[n];
      }
    } else {
      SMTC_SIMD_SUM(rowsum)
      for (int64_t n = 0; n < N; ++n) {
        w[n] = masked_numerator(w[n], colinv[n], eps, T(1));
        rowsum += w[n];
      }
    }
    const T z = denominator(rowsum, eps, masked);
    SMTC_SIMD
    for (int64_t n = 0; n < N; ++n) w[n] = w[n] / z;
  }
}

// One tile of the backward: GW (P x N) holds dL/dattn on entry and dL/dlogits on exit.
template <typename T>
SMTC_ALWAYS_INLINE void backward_tile_impl(const T* L, const T* mask, const T* W, T eps, int64_t P, int64_t N,
                                           T* GW, T* colmax, T* colinv, T* coldot, T* prob) {
  column_softmax_impl(L, P, N, prob, colmax, colinv);  // recompute the softmax, as in the forward
  const bool masked = mask != nullptr;
  std::fill(coldot, coldot + N, T(0));
  for (int64_t q = 0; q < P; ++q) {
    T* p = prob + q * N;
    const T* w = W + q * N;
    T* gw = GW + q * N;
    T rowsum = T(0), dot = T(0);
    SMTC_SIMD_SUM(rowsum)
    for (int64_t n = 0; n < N; ++n) {
      p[n] = p[n] * colinv[n];
      rowsum += masked_numerator(p[n], T(1), eps, masked ? mask[n] : T(1));
    }
    const T z = denominator(rowsum, eps, masked);
    SMTC_SIMD_SUM(dot)
    for (int64_t n = 0; n < N; ++n) dot += gw[n] * w[n];
    SMTC_SIMD
    for (int64_t n = 0; n < N; ++n) {
      const T gp = renorm_grad(gw[n], dot, z) * (masked ? mask[n] : T(1));
      gw[n] = gp;  // now dL/dp
      coldot[n] += gp * p[n];
    }
  }
  for (int64_t q = 0; q < P; ++q) {
    const T* p = prob + q * N;
    T* gw = GW + q * N;
    SMTC_SIMD
    for (int64_t n = 0; n < N; ++n) gw[n] = softmax_grad(p[n], gw[n], coldot[n]);
  }
}

#define SMTC_SLOT_INSTANTIATE(T)                                                                              \
  SMTC_CPU_CLONES void forward_tile(const T* L, const T* mask, T eps, int64_t P, int64_t N, T* W, T* cm,       \
                                    T* ci) {                                                                  \
    forward_tile_impl<T>(L, mask, eps, P, N, W, cm, ci);                                                      \
  }                                                                                                           \
  SMTC_CPU_CLONES void backward_tile(const T* L, const T* mask, const T* W, T eps, int64_t P, int64_t N, T* GW, \
                                     T* cm, T* ci, T* cd, T* prob) {                                          \
    backward_tile_impl<T>(L, mask, W, eps, P, N, GW, cm, ci, cd, prob);                                       \
  }

SMTC_SLOT_INSTANTIATE(float)
SMTC_SLOT_INSTANTIATE(double)

std::tuple<at::Tensor, at::Tensor> slot_aggregate_cpu(const at::Tensor& logits_in, const at::Tensor& values,
                                                      const c10::optional<at::Tensor>& mask_in, double eps) {
  check_slot_aggregate_args(logits_in, values, mask_in, eps);
  const auto logits = logits_in.contiguous();
  const int64_t B = logits.size(0), G = logits.size(1), P = logits.size(2), N = logits.size(3);
  const int64_t D = values.size(2);
  auto attn = empty_output(logits.sizes(), logits.options());
  at::Tensor mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  if (attn.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "smtc_fast::slot_aggregate (CPU)", [&] {
      const scalar_t* Lp = logits.data_ptr<scalar_t>();
      const scalar_t* Mp = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
      scalar_t* Wp = attn.data_ptr<scalar_t>();
      const scalar_t e = static_cast<scalar_t>(eps);
      at::parallel_for(0, B * G, 8, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> scratch(2 * N);
        for (int64_t bg = begin; bg < end; ++bg) {
          forward_tile(Lp + bg * P * N, Mp ? Mp + bg * N : nullptr, e, P, N, Wp + bg * P * N, scratch.data(),
                       scratch.data() + N);
        }
      });
    });
  }
  // updates (B, G*P, D) = attn (B, G*P, N) @ values (B, N, D)
  auto updates = empty_output({B, G * P, D}, logits.options());
  at::bmm_out(updates, attn.view({B, G * P, N}), values);
  updates = updates.view({B, G, P, D});
  return {updates, attn};
}

std::tuple<at::Tensor, at::Tensor> slot_aggregate_backward_cpu(const at::Tensor& grad_updates,
                                                               const at::Tensor& grad_attn,
                                                               const at::Tensor& logits_in, const at::Tensor& values,
                                                               const c10::optional<at::Tensor>& mask_in,
                                                               const at::Tensor& attn_in, double eps) {
  check_slot_aggregate_backward_args(grad_updates, grad_attn, logits_in, values, mask_in, attn_in, eps);
  const auto logits = logits_in.contiguous();
  const auto attn = attn_in.contiguous();
  const int64_t B = logits.size(0), G = logits.size(1), P = logits.size(2), N = logits.size(3);
  const int64_t D = values.size(2);
  at::Tensor mask;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  auto gu = grad_updates.reshape({B, G * P, D});
  // dL/dattn = grad_attn + grad_updates @ values^T, accumulated in place in one buffer.
  auto grad_logits = empty_output({B, G * P, N}, logits.options());
  at::baddbmm_out(grad_logits, grad_attn.reshape({B, G * P, N}), gu, values.transpose(1, 2));
  auto grad_values = empty_output({B, N, D}, logits.options());
  at::bmm_out(grad_values, attn.view({B, G * P, N}).transpose(1, 2), gu);
  if (grad_logits.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "smtc_fast::_slot_aggregate_backward (CPU)", [&] {
      const scalar_t* Lp = logits.data_ptr<scalar_t>();
      const scalar_t* Mp = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
      const scalar_t* Wp = attn.data_ptr<scalar_t>();
      scalar_t* GWp = grad_logits.data_ptr<scalar_t>();
      const scalar_t e = static_cast<scalar_t>(eps);
      at::parallel_for(0, B * G, 8, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> scratch(3 * N + P * N);
        for (int64_t bg = begin; bg < end; ++bg) {
          backward_tile(Lp + bg * P * N, Mp ? Mp + bg * N : nullptr, Wp + bg * P * N, e, P, N, GWp + bg * P * N,
                        scratch.data(), scratch.data() + N, scratch.data() + 2 * N, scratch.data() + 3 * N);
        }
      });
    });
  }
  return {grad_logits.view({B, G, P, N}), grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(smtc_fast, CPU, m) {
  m.impl("slot_aggregate", &slot_aggregate_cpu);
  m.impl("_slot_aggregate_backward", &slot_aggregate_backward_cpu);
}

}  // namespace slot_aggregate
}  // namespace smtc
