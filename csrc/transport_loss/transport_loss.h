// Fused L_sem (spec §2.1, paper Eq. 9): the per-element math shared by transport_loss_cpu.cpp and the CUDA kernel
// (transport_loss_cuda.cu).
//
//   student_logits (B, T, S, n)  float32 | float64
//   teacher_logits (B, T, S, n)  same dtype
//   teacher_keys   (B, T, n, D)  same dtype, or bf16 with float32 logits (the teacher's un-fused keys, both sides
//                                of the cost; bf16 ones are computed on as their exact float32 values)
//   eps > 0, iters >= 0, marginals "norm" | "uniform", cost "one_minus_cos" | "neg_cos"
//   -> loss () and targets (B, T, S, n): targets[b, i, s, a] = sum_{j != i} (plan_ij @ p_t_j^T)[a, s]
//
// With p_s = softmax_S(student_logits), p_t = softmax_S(teacher_logits) and the official probability-domain
// Sinkhorn plan_ij (spec §2.1: K = exp(-C/eps), b = 1, `iters` times a = mu/(K b), b = nu/(K^T a), plan =
// diag(a) K diag(b)) between frames i and j,
//   L = -1/(B T (T-1)) sum_b sum_{i != j} sum_{a, s} log(p_s_i[s, a] + 1e-8) (plan_ij @ p_t_j^T)[a, s]
//     = -1/(B T (T-1)) sum_{b, i, s, a} log(p_s[b, i, s, a] + 1e-8) targets[b, i, s, a],
// so neither the cost nor the plan is ever needed as a tensor: per unordered pair {i, j} one kernel matrix
// K = exp(-C_ij/eps) (C_ji = C_ij^T) serves both orientations,
//   i -> j:  a1 = mu_i / (K x1),    x1 = mu_j / (K^T a1),    plan_ij   = diag(a1) K diag(x1)
//   j -> i:  a2 = mu_j / (K^T x2),  x2 = mu_i / (K a2),      plan_ji^T = diag(x2) K diag(a2)
//   (x1 = 1, x2 = 1 at the start), and the contractions are
//   targets_i[s, a] += a1[a] sum_b K[a, b] x1[b] p_t_j[s, b],   targets_j[s, b] += a2[b] sum_a K[a, b] x2[a] p_t_i[s, a].
// The teacher path carries no gradient (official: no_grad), so d L / d student_logits needs only the targets:
//   with w_s = targets_s / (p_s + 1e-8):  dL/dz_s = -g/(B T (T-1)) * p_s * (w_s - sum_r w_r p_r).
//
// The cost's constant does not matter for iters >= 1: C and C + c give K e^{-c/eps}, a e^{c/eps}, the same b and
// the same plan at every iteration. So K is always built from 1 - cos (>= 0 up to rounding, K in [e^{-2/eps}, 1]);
// only iters = 0 (plan = K itself) needs the cost's own constant.
#pragma once

#include "common/math.h"

namespace smtc {
namespace transport_loss {

// log(p + kProbEps): the official cross-entropy's guard (spec §2.1, cross_ij).
constexpr double kProbEps = 1e-8;

// K[a, b] = exp(-(1 - cos)/eps) = 2^((cos - 1) * log2(e)/eps), scale2 = log2(e)/eps, from the raw keys' dot
// product and the inverse L2 norms (F.normalize's max(||x||, 1e-12)): cos = dot * inv_a * inv_b. The argument
// is <= 0 up to the rounding of cos (fast_exp2_nonpositive stays exact a little above 0).
template <typename T> SMTC_HD T cosine(T dot, T inv_a, T inv_b) { return dot * inv_a * inv_b; }
template <typename T> SMTC_HD T kernel_entry(T cos, T scale2) { return fast_exp2_nonpositive((cos - T(1)) * scale2); }

// The inverse norm of one key from its sum of squares (F.normalize: x / max(||x||_2, 1e-12)).
template <typename T> SMTC_HD T inverse_norm(T sum_sq) {
  const T norm = sqrt(sum_sq);
  return T(1) / (norm > T(1e-12) ? norm : T(1e-12));
}

// The scaling form is trusted while every denominator (K v)_a with mu_a > 0 is >= kTiny and every scaling is
// <= kHuge: entries of K that underflowed (< 1.2e-38 in float) then change no sum at float precision. Past
// these, the pair is solved in the log domain instead (same bounds as csrc/sinkhorn/sinkhorn_cpu.cpp).
template <typename T> struct ScalingBounds;
template <> struct ScalingBounds<float> { static constexpr float kTiny = 1e-18f, kHuge = 1e10f; };
template <> struct ScalingBounds<double> { static constexpr double kTiny = 1e-280, kHuge = 1e100; };

// One Sinkhorn scaling w / denom (0 for a zero-mass entry); *bad is set when the bounds above are crossed
// (written as a negated >= so that NaN counts as bad).
template <typename T> SMTC_HD T scaling(T w, T denom, bool* bad) {
  if (w == T(0)) return T(0);
  const T x = w / denom;
  if (!(denom >= ScalingBounds<T>::kTiny && x <= ScalingBounds<T>::kHuge)) *bad = true;
  return x;
}

// Backward of -sum_s log(softmax(z)_s + 1e-8) * target_s at one token, given p = softmax(z):
// w_s = target_s / (p_s + 1e-8); dz_s = coef * p_s * (w_s - sum_r w_r p_r) with coef = -g/(B T (T-1)).
template <typename T> SMTC_HD T target_weight(T target, T p) { return target / (p + T(kProbEps)); }
template <typename T> SMTC_HD T logit_grad(T coef, T p, T w, T wp_sum) { return coef * p * (w - wp_sum); }

}  // namespace transport_loss
}  // namespace smtc
