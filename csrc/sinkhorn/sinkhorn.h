// Batched log-domain Sinkhorn: the per-element math shared by sinkhorn_cpu.cpp and sinkhorn_cuda.cu.
//
//   cost    (B, N, M)  float32 | float64, contiguous
//   log_mu  (B, N)     log source weights (used as given)
//   log_nu  (B, M)     log target weights
//   eps > 0, iters >= 0, tol < 0 means "no tolerance"
//   -> plan (B, N, M), f (B, N), g (B, M)
//
// One iteration (g starts at 0; smtc_fast/ops/sinkhorn.py is the specification):
//   f_n = eps*log_mu_n - eps*LSE_m((g_m - C_nm)/eps)
//   g_m = eps*log_nu_m - eps*LSE_n((f_n - C_nm)/eps)
//   plan_nm = exp((f_n + g_m - C_nm)/eps)
// This is SMTC's probability-domain iteration a = mu/(K b), b = nu/(K^T a), K = exp(-C/eps) (spec §2.1) with
// f = eps log a, g = eps log b, so it never under- or overflows.
//
// Backward (exact for the map that ran). With A_t[n,m] = softmax over n of (f_t,n - C_nm)/eps (the
// weights inside g_t) and B_t[n,m] = softmax over m of (g_{t-1},m - C_nm)/eps (inside f_t), both recovered
// without a max pass because the potentials hold the log-normalisers:
//   A_t[n,m] = exp((f_t,n + g_t,m - C_nm)/eps - log_nu_m),   B_t[n,m] = exp((f_t,n + g_{t-1},m - C_nm)/eps - log_mu_n)
//   dplan/dC = -plan/eps, dplan/df = dplan/dg = plan/eps
//   dg_t,m/df_t,n = -A_t[n,m], dg_t,m/dC_nm = A_t[n,m];   df_t,n/dg_{t-1},m = -B_t[n,m], df_t,n/dC_nm = B_t[n,m].
#pragma once

#include "common/math.h"

namespace smtc {
namespace sinkhorn {

// Potential from a log-sum-exp kept as (max, sum): eps*log_w - eps*(mx + log s) where the LSE argument is
// already divided by eps, i.e. mx is in units of 1/eps.
template <typename T> SMTC_HD T potential(T eps, T log_w, T mx, T s) {
  if (mx == neg_inf<T>()) return neg_inf<T>();  // no mass reaches this row/column
  return eps * log_w - eps * (mx + smtc_log(s));
}

// Entry of the plan: exp((f + g - c)/eps).
template <typename T> SMTC_HD T plan_entry(T f, T g, T c, T inv_eps) {
  return fast_exp((f + g - c) * inv_eps);
}

// Softmax weight recovered from the potentials: exp((f + g - c)/eps - log_w); 0 where the marginal is 0.
template <typename T> SMTC_HD T lse_weight(T f, T g, T c, T inv_eps, T log_w) {
  if (log_w == neg_inf<T>()) return T(0);
  return fast_exp((f + g - c) * inv_eps - log_w);
}

}  // namespace sinkhorn
}  // namespace smtc
