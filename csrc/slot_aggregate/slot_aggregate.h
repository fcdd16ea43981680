// Masked slot aggregation: the per-element math shared by slot_aggregate_cpu.cpp and slot_aggregate_cuda.cu.
//
//   logits  (B, G, P, N)  softmax over P (stage 1 of SMTC: G = 1, P = S semantic slots;
//                         stage 2: G = S semantic groups, P instance slots each)
//   values  (B, N, D)
//   mask    (B, G, N) or none: non-negative weight of token n in group g (SMTC: semantic logits > 0.3)
//   eps     1e-8 in SMTC
//   -> attn (B, G, P, N), updates (B, G, P, D) = attn @ values
//
// Forward, per group g and token n (official order, spec §1.3):
//   p[q,n] = softmax_q(logits[:, n])[q];  a[q,n] = (p[q,n] + eps) * mask[n]
//   z[q] = sum_n a[q,n] + (mask ? eps : 0);  attn[q,n] = a[q,n] / z[q]
// Backward, with gw = dL/dattn (incl. the path through updates: grad_updates @ values^T):
//   ga[q,n] = (gw[q,n] - sum_n' gw[q,n'] attn[q,n']) / z[q]
//   gp[q,n] = ga[q,n] * mask[n]
//   glogits[q,n] = p[q,n] * (gp[q,n] - sum_q' gp[q',n] p[q',n])
#pragma once

#include "common/math.h"

namespace smtc {
namespace slot_aggregate {

// a = (softmax + eps) * mask, from e = exp(logit - column max) and the column's 1/sum(e).
template <typename T> SMTC_HD T masked_numerator(T e, T inv_colsum, T eps, T mask) {
  return (e * inv_colsum + eps) * mask;
}

// The renormalisation's denominator: sum over tokens, plus eps only in the masked (stage-2) form.
template <typename T> SMTC_HD T denominator(T rowsum, T eps, bool masked) { return masked ? rowsum + eps : rowsum; }

// d/d(a[q,n]) of attn[q, :] = a[q, :] / z[q], contracted with gw: (gw - <gw, attn>) / z.
template <typename T> SMTC_HD T renorm_grad(T gw, T dot_gw_attn, T z) { return (gw - dot_gw_attn) / z; }

// Softmax backward over q at one token: p * (gp - sum_q gp p).
template <typename T> SMTC_HD T softmax_grad(T p, T gp, T dot_gp_p) { return p * (gp - dot_gp_p); }

}  // namespace slot_aggregate
}  // namespace smtc
