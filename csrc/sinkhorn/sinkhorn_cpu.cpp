// C++ CPU kernel of smtc_fast::sinkhorn and its backward. Parallel over problems; each problem's cost
// matrix (256 x 256 fp32 = 256 KB at SMTC's size) stays in the core's L2 for all iterations instead of
// streaming (B, N, M) temporaries through DRAM as the PyTorch reference does (performance_anchors.md §6).
//
// Forward cost model at SMTC's shapes (384 problems of 256 x 256, the dev VM; rdtsc cycles per problem): with
// the data in L2 (one thread), the first pass (read C, write E into the plan's buffer) takes ~58k, the two later
// iterations (one L2 pass of multiply-adds each) ~34k, the final scaling ~11k. Streaming from DRAM with both
// threads they take ~93k, ~43k and ~15k: the first pass waits on the costs' reads and on the write-allocate
// reads of the plan's lines (~30k and ~25k by themselves, one thread). Prefetching the next problem's costs
// into L2 during the current problem's L2-bound passes roughly halves the first of these but slows those
// passes (~6% net: paired A/B over 100 rounds, with and without it). Tried and measured slower, or no faster,
// on this VM: E in an L2 scratch with non-temporal stores of the plan, also pipelined into the next problem's
// first pass (with the base-2 exp too: it saves the plan's write-allocate reads, but paired ratios at the op
// level were 0.98-1.01), software prefetch of rows ahead inside the first pass, prefetching plan lines for
// writing, clzero.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/alloc.h"
#include "common/cpu.h"
#include "common/threads.h"
#include "sinkhorn/sinkhorn.h"
#include "sinkhorn/sinkhorn_check.h"

namespace smtc {
namespace sinkhorn {
namespace {

// f_n = eps*log_mu_n - eps*LSE_m((g_m - C_nm)/eps), one row at a time (two passes over a row in L1).
template <typename T>
SMTC_ALWAYS_INLINE void update_f_impl(const T* C, const T* g, const T* log_mu, T eps, int64_t N, int64_t M, T* f) {
  const T inv_eps = T(1) / eps;
  for (int64_t n = 0; n < N; ++n) {
    const T* row = C + n * M;
    T mx = neg_inf<T>();
    SMTC_SIMD_MAX(mx)
    for (int64_t m = 0; m < M; ++m) mx = vmax(mx, g[m] - row[m]);
    T s = T(0);
    if (mx != neg_inf<T>()) {
      SMTC_SIMD_SUM(s)
      for (int64_t m = 0; m < M; ++m) s += fast_exp_nonpositive((g[m] - row[m] - mx) * inv_eps);
    }
    f[n] = potential(eps, log_mu[n], mx * inv_eps, s);
  }
}

// g_m = eps*log_nu_m - eps*LSE_n((f_n - C_nm)/eps), vectorised across m (rows streamed, columns accumulated).
template <typename T>
SMTC_ALWAYS_INLINE void update_g_impl(const T* C, const T* f, const T* log_nu, T eps, int64_t N, int64_t M,
                                      T* g, T* colmax, T* colsum) {
  const T inv_eps = T(1) / eps;
  std::fill(colmax, colmax + M, neg_inf<T>());
  std::fill(colsum, colsum + M, T(0));
  for (int64_t n = 0; n < N; ++n) {
    if (f[n] == neg_inf<T>()) continue;
    const T* row = C + n * M;
    const T fn = f[n];
    SMTC_SIMD
    for (int64_t m = 0; m < M; ++m) colmax[m] = vmax(colmax[m], fn - row[m]);
  }
  for (int64_t n = 0; n < N; ++n) {
    if (f[n] == neg_inf<T>()) continue;
    const T* row = C + n * M;
    const T fn = f[n];
    SMTC_SIMD
    for (int64_t m = 0; m < M; ++m) colsum[m] += fast_exp_nonpositive((fn - row[m] - colmax[m]) * inv_eps);
  }
  for (int64_t m = 0; m < M; ++m) g[m] = potential(eps, log_nu[m], colmax[m] * inv_eps, colsum[m]);
}

// L1 error of the row marginals of the current plan (the column marginals are exact after a g update).
template <typename T>
SMTC_ALWAYS_INLINE T row_error_impl(const T* C, const T* f, const T* g, const T* log_mu, T eps, int64_t N, int64_t M) {
  const T inv_eps = T(1) / eps;
  T err = T(0);
  for (int64_t n = 0; n < N; ++n) {
    const T* row = C + n * M;
    const T fn = f[n];
    T s = T(0);
    SMTC_SIMD_SUM(s)
    for (int64_t m = 0; m < M; ++m) s += plan_entry(fn, g[m], row[m], inv_eps);
    err += std::abs(s - fast_exp(log_mu[n]));
  }
  return err;
}

template <typename T>
SMTC_ALWAYS_INLINE void write_plan_impl(const T* C, const T* f, const T* g, T eps, int64_t N, int64_t M, T* P) {
  const T inv_eps = T(1) / eps;
  for (int64_t n = 0; n < N; ++n) {
    const T* row = C + n * M;
    T* out = P + n * M;
    const T fn = f[n];
    SMTC_SIMD
    for (int64_t m = 0; m < M; ++m) out[m] = plan_entry(fn, g[m], row[m], inv_eps);
  }
}

// ---- The scaling form of the same iteration (forward only) -------------------------------------------------
// With a kernel E_nm = exp((base_n - C_nm)/eps) stored once (in the plan's buffer), every iteration is one
// pass of multiply-adds over E instead of two passes of exps:
//   u_n = mu_n / sum_m E_nm v_m,   v_m = nu_m / sum_n u_n E_nm,   f = base + eps log u,   g = eps log v,
// the same numbers as the log-domain updates (f_{t+1} = eps log mu - eps LSE_m((g_t - C)/eps), etc.).
// Both half-steps share the pass: u_n needs only row n of E, which is in L1 when it is added into the
// column sums. It is only trusted while every denominator stays >= kTiny and every scaling <= kHuge, so that
// the entries of E that underflowed (< 1.2e-38 in float) cannot matter at float precision; otherwise the
// caller reruns the problem in the log domain. SMTC's problems (1 - cos costs, eps 0.05) stay inside these
// bounds.
template <typename T> struct ScalingBounds;
template <> struct ScalingBounds<float> { static constexpr float kTiny = 1e-18f, kHuge = 1e10f; };
template <> struct ScalingBounds<double> { static constexpr double kTiny = 1e-280, kHuge = 1e100; };

// w = exp(log_w), vectorised (fast_exp(-inf) is exactly 0). Done once per problem: the scalar exps of the
// marginals inside the passes cost the first version of this kernel as much as a pass over E.
template <typename T> SMTC_ALWAYS_INLINE void weights_impl(const T* log_w, int64_t n, T* w) {
  SMTC_SIMD
  for (int64_t i = 0; i < n; ++i) w[i] = fast_exp(log_w[i]);
}

// The passes below take E's rows four at a time: four independent dot products instead of one chain of
// dependent FMAs, and one read-modify-write of the column sums per four rows. One row at a time, each row's
// dot -> division -> column update was a serial chain, and the fused pass ran ~40% slower than the same work
// split in two passes (measured at 256 x 256).
constexpr int64_t kRows = 4;

// Brings the next problem's costs into L2, a slice per call, while this problem's L2-bound passes run, so that
// its first pass reads them from L2 instead of waiting on DRAM (5-10% of the forward at SMTC's shapes, measured
// side by side; prefetching 4-16 rows ahead inside the first pass itself was slower, as was prefetching plan
// lines for writing, the next problem's or the current one's rows ahead).
struct NextProblemPrefetch {
  const char* p = nullptr;
  const char* end = nullptr;
  int64_t lines = 0;  // cache lines per call

  SMTC_ALWAYS_INLINE void next() {
    for (int64_t i = 0; i < lines && p < end; ++i, p += 64) __builtin_prefetch(p, 0, 1);
  }
};

// Row pointers of the block starting at n0; past the last row they repeat it (and get a zero coefficient).
template <typename T> SMTC_ALWAYS_INLINE void block_rows(const T* E, int64_t n0, int64_t N, int64_t M, const T** r) {
  for (int64_t k = 0; k < kRows; ++k) r[k] = E + std::min(n0 + k, N - 1) * M;
}

// colsum += sum_k a_k r_k
template <typename T> SMTC_ALWAYS_INLINE void add_scaled_rows(const T* const* r, const T* a, int64_t M, T* colsum) {
  const T *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
  const T a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  SMTC_SIMD
  for (int64_t m = 0; m < M; ++m) colsum[m] += a0 * r0[m] + a1 * r1[m] + a2 * r2[m] + a3 * r3[m];
}

// Iteration 1 (g = 0), row by row, in one pass over C: E_n = exp((base_n - C_n)/eps), u_n = mu_n / sum_m E_nm
// (the f update), colsum += u_n E_n (the g update's sum). base_n = 0 for a row whose costs are >= 0 and whose
// sum and u_n stay inside the scaling bounds (E is then the probability-domain kernel itself, as in spec §2.1);
// any other row is redone with base_n = min_m C_nm, so that its largest entry is exactly 1 and its sum >= 1.
// Not taking the row minimum first saves a pass over the row and the wait on its reduction: 5-10% of this
// pass at SMTC's shapes (rdtsc-timed with the data in L2). Both exps are taken in base 2 with the 1/eps folded
// into their argument (fast_exp2_nonpositive, common/math.h). A negative cost can push the first one's argument
// past the exp's range (garbage, no UB), but such a row is redone anyway. Returns false on a row with no finite
// minimum or a NaN.
template <typename T>
SMTC_ALWAYS_INLINE bool first_pass_impl(const T* C, const T* mu, T eps, int64_t N, int64_t M, T* E, T* base, T* u,
                                        T* colsum) {
  const T inv_eps = T(1) / eps;
  const T neg_log2e_over_eps = -inv_eps * T(1.4426950408889634);  // exp(-c/eps) = 2^(c * this)
  std::fill(colsum, colsum + M, T(0));
  for (int64_t n0 = 0; n0 < N; n0 += kRows) {
    T a[kRows] = {};
    for (int64_t n = n0; n < std::min(n0 + kRows, N); ++n) {
      const T* row = C + n * M;
      T* e = E + n * M;
      T mn = std::numeric_limits<T>::infinity();
      T s = T(0);
      SMTC_SIMD_SUM_MIN(s, mn)
      for (int64_t m = 0; m < M; ++m) {
        const T c = row[m];
        mn = c < mn ? c : mn;
        e[m] = fast_exp2_nonpositive(c * neg_log2e_over_eps);
        s += e[m];
      }
      T un = mu[n] / s;
      base[n] = T(0);
      if (!(mn >= T(0) && s >= ScalingBounds<T>::kTiny && un <= ScalingBounds<T>::kHuge)) {
        T mx = neg_inf<T>();
        SMTC_SIMD_MAX(mx)
        for (int64_t m = 0; m < M; ++m) mx = vmax(mx, -row[m]);
        if (mx == neg_inf<T>()) return false;
        s = T(0);
        SMTC_SIMD_SUM(s)
        for (int64_t m = 0; m < M; ++m) {
          e[m] = fast_exp2_nonpositive((row[m] + mx) * neg_log2e_over_eps);  // exp((min C - C)/eps)
          s += e[m];
        }
        if (!(s >= T(1))) return false;
        base[n] = -mx;
        un = mu[n] / s;
      }
      a[n - n0] = u[n] = un;
    }
    const T* r[kRows];
    block_rows(static_cast<const T*>(E), n0, N, M, r);
    add_scaled_rows(r, a, M, colsum);
  }
  return true;
}

// Iterations 2, 3, ...: with v from the last column sums, u'_n = mu_n / (E_n . v) and colsum' += u'_n E_n.
// E_n . v is also the row marginal of the current plan u E v, so *err gets its L1 error (for tol).
template <typename T>
SMTC_ALWAYS_INLINE bool iteration_pass_impl(const T* E, const T* mu, const T* u, const T* v, int64_t N, int64_t M,
                                            T* u_next, T* colsum, double* err,
                                            NextProblemPrefetch* prefetch) {
  std::fill(colsum, colsum + M, T(0));
  double e_acc = 0;
  for (int64_t n0 = 0; n0 < N; n0 += kRows) {
    prefetch->next();
    const T* r[kRows];
    block_rows(E, n0, N, M, r);
    const T *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
    T d0 = T(0), d1 = T(0), d2 = T(0), d3 = T(0);
    SMTC_SIMD_SUM4(d0, d1, d2, d3)
    for (int64_t m = 0; m < M; ++m) {
      d0 += r0[m] * v[m];
      d1 += r1[m] * v[m];
      d2 += r2[m] * v[m];
      d3 += r3[m] * v[m];
    }
    const T d[kRows] = {d0, d1, d2, d3};
    T a[kRows] = {};
    for (int64_t n = n0; n < std::min(n0 + kRows, N); ++n) {
      const T dn = d[n - n0];
      e_acc += std::abs(static_cast<double>(u[n] * dn - mu[n]));
      u_next[n] = T(0);
      if (mu[n] == T(0)) continue;
      if (!(dn >= ScalingBounds<T>::kTiny)) return false;
      a[n - n0] = u_next[n] = mu[n] / dn;
      if (!(u_next[n] <= ScalingBounds<T>::kHuge)) return false;
    }
    add_scaled_rows(r, a, M, colsum);
  }
  *err = e_acc;
  return true;
}

// v_m = nu_m / colsum_m (0 where nu_m = 0); false if a bound is crossed (counted, so that NaN counts too).
template <typename T> SMTC_ALWAYS_INLINE bool column_scaling_impl(const T* colsum, const T* nu, int64_t M, T* v) {
  int64_t bad = 0;
  SMTC_SIMD_SUM(bad)
  for (int64_t m = 0; m < M; ++m) {
    const bool used = nu[m] != T(0);
    const T vm = used ? nu[m] / colsum[m] : T(0);
    v[m] = vm;
    bad += used && !(colsum[m] >= ScalingBounds<T>::kTiny && vm <= ScalingBounds<T>::kHuge);
  }
  return bad == 0;
}

// out_i = offset_i + eps * log(scaling_i), -inf where the scaling is 0 (f from u with offset = base, g from v).
// Vectorised log where the scaling is a normal float, the library log for the rest.
inline float log_or_one(float x, bool normal) { return fast_log_normal(normal ? x : 1.0f); }
inline double log_or_one(double x, bool) { return smtc_log(x); }
template <typename T>
SMTC_ALWAYS_INLINE void potentials_impl(const T* scaling, const T* offset, T eps, int64_t n, T* out) {
  int64_t odd = 0;
  SMTC_SIMD_SUM(odd)
  for (int64_t i = 0; i < n; ++i) {
    const T x = scaling[i];
    const bool normal = x >= std::numeric_limits<T>::min() && x <= std::numeric_limits<T>::max();
    out[i] = (offset ? offset[i] : T(0)) + eps * log_or_one(x, normal);
    odd += !normal;
  }
  if (odd == 0 || std::is_same<T, double>::value) return;
  for (int64_t i = 0; i < n; ++i) {
    const T x = scaling[i];
    if (x >= std::numeric_limits<T>::min() && x <= std::numeric_limits<T>::max()) continue;
    out[i] = x == T(0) ? neg_inf<T>() : (offset ? offset[i] : T(0)) + eps * smtc_log(x);
  }
}

template <typename T>
SMTC_ALWAYS_INLINE void scale_plan_impl(const T* u, const T* v, int64_t N, int64_t M, T* K,
                                      NextProblemPrefetch* prefetch) {
  for (int64_t n = 0; n < N; ++n) {
    if (n % kRows == 0) prefetch->next();
    T* row = K + n * M;
    const T un = u[n];
    SMTC_SIMD
    for (int64_t m = 0; m < M; ++m) row[m] = un * row[m] * v[m];
  }
}

// Backward seed: W = grad_plan * plan; grad_C = -W/eps; grad_f += rowsum(W)/eps; grad_g += colsum(W)/eps.
template <typename T>
SMTC_ALWAYS_INLINE void backward_plan_impl(const T* C, const T* f, const T* g, const T* gP, T eps, int64_t N,
                                           int64_t M, T* gC, T* gf, T* gg) {
  const T inv_eps = T(1) / eps;
  for (int64_t n = 0; n < N; ++n) {
    const T* row = C + n * M;
    const T* gprow = gP + n * M;
    T* gcrow = gC + n * M;
    const T fn = f[n];
    T rs = T(0);
    SMTC_SIMD_SUM(rs)
    for (int64_t m = 0; m < M; ++m) {
      const T w = gprow[m] * plan_entry(fn, g[m], row[m], inv_eps) * inv_eps;
      gcrow[m] = -w;
      rs += w;
      gg[m] += w;
    }
    gf[n] += rs;
  }
}

// Through g_t = eps*log_nu - eps*LSE_n((f_t - C)/eps): grad_C += gg*A, grad_f_t -= rowsum(gg*A).
template <typename T>
SMTC_ALWAYS_INLINE void backward_g_impl(const T* C, const T* f, const T* g, const T* log_nu, const T* gg, T eps,
                                        int64_t N, int64_t M, T* gC, T* gf) {
  const T inv_eps = T(1) / eps;
  for (int64_t n = 0; n < N; ++n) {
    const T* row = C + n * M;
    T* gcrow = gC + n * M;
    const T fn = f[n];
    T acc = T(0);
    SMTC_SIMD_SUM(acc)
    for (int64_t m = 0; m < M; ++m) {
      const T w = gg[m] * lse_weight(fn, g[m], row[m], inv_eps, log_nu[m]);
      gcrow[m] += w;
      acc += w;
    }
    gf[n] -= acc;
  }
}

// Through f_t = eps*log_mu - eps*LSE_m((g_{t-1} - C)/eps): grad_C += gf*B, grad_g_{t-1} = -colsum(gf*B).
template <typename T>
SMTC_ALWAYS_INLINE void backward_f_impl(const T* C, const T* f, const T* g_prev, const T* log_mu, const T* gf,
                                        T eps, int64_t N, int64_t M, T* gC, T* gg_prev) {
  const T inv_eps = T(1) / eps;
  std::fill(gg_prev, gg_prev + M, T(0));
  for (int64_t n = 0; n < N; ++n) {
    const T* row = C + n * M;
    T* gcrow = gC + n * M;
    const T fn = f[n];
    const T gfn = gf[n];
    const T lw = log_mu[n];
    if (lw == neg_inf<T>()) continue;
    SMTC_SIMD
    for (int64_t m = 0; m < M; ++m) {
      const T w = gfn * fast_exp((fn + g_prev[m] - row[m]) * inv_eps - lw);
      gcrow[m] += w;
      gg_prev[m] -= w;
    }
  }
}

// Non-template entry points, compiled once per SIMD width (target_clones) with the loops above inlined.
#define SMTC_SINKHORN_INSTANTIATE(T)                                                                             \
  SMTC_CPU_CLONES void update_f(const T* C, const T* g, const T* lm, T eps, int64_t N, int64_t M, T* f) {        \
    update_f_impl<T>(C, g, lm, eps, N, M, f);                                                                    \
  }                                                                                                              \
  SMTC_CPU_CLONES void update_g(const T* C, const T* f, const T* ln, T eps, int64_t N, int64_t M, T* g, T* cm,   \
                                T* cs) {                                                                         \
    update_g_impl<T>(C, f, ln, eps, N, M, g, cm, cs);                                                            \
  }                                                                                                              \
  SMTC_CPU_CLONES T row_error(const T* C, const T* f, const T* g, const T* lm, T eps, int64_t N, int64_t M) {    \
    return row_error_impl<T>(C, f, g, lm, eps, N, M);                                                            \
  }                                                                                                              \
  SMTC_CPU_CLONES void write_plan(const T* C, const T* f, const T* g, T eps, int64_t N, int64_t M, T* P) {       \
    write_plan_impl<T>(C, f, g, eps, N, M, P);                                                                   \
  }                                                                                                              \
  SMTC_CPU_CLONES void weights(const T* lw, int64_t n, T* w) { weights_impl<T>(lw, n, w); }                      \
  SMTC_CPU_CLONES bool first_pass(const T* C, const T* mu, T eps, int64_t N, int64_t M, T* E, T* base, T* u,     \
                                  T* cs) {                                                                       \
    return first_pass_impl<T>(C, mu, eps, N, M, E, base, u, cs);                                                 \
  }                                                                                                              \
  SMTC_CPU_CLONES bool iteration_pass(const T* E, const T* mu, const T* u, const T* v, int64_t N, int64_t M,     \
                                      T* un, T* cs, double* err, NextProblemPrefetch* pf) {                      \
    return iteration_pass_impl<T>(E, mu, u, v, N, M, un, cs, err, pf);                                           \
  }                                                                                                              \
  SMTC_CPU_CLONES bool column_scaling(const T* cs, const T* nu, int64_t M, T* v) {                               \
    return column_scaling_impl<T>(cs, nu, M, v);                                                                 \
  }                                                                                                              \
  SMTC_CPU_CLONES void potentials(const T* x, const T* off, T eps, int64_t n, T* out) {                          \
    potentials_impl<T>(x, off, eps, n, out);                                                                     \
  }                                                                                                              \
  SMTC_CPU_CLONES void scale_plan(const T* u, const T* v, int64_t N, int64_t M, T* K, NextProblemPrefetch* pf) { \
    scale_plan_impl<T>(u, v, N, M, K, pf);                                                                       \
  }                                                                                                              \
  SMTC_CPU_CLONES void backward_plan(const T* C, const T* f, const T* g, const T* gP, T eps, int64_t N,          \
                                     int64_t M, T* gC, T* gf, T* gg) {                                           \
    backward_plan_impl<T>(C, f, g, gP, eps, N, M, gC, gf, gg);                                                   \
  }                                                                                                              \
  SMTC_CPU_CLONES void backward_g(const T* C, const T* f, const T* g, const T* ln, const T* gg, T eps,           \
                                  int64_t N, int64_t M, T* gC, T* gf) {                                          \
    backward_g_impl<T>(C, f, g, ln, gg, eps, N, M, gC, gf);                                                      \
  }                                                                                                              \
  SMTC_CPU_CLONES void backward_f(const T* C, const T* f, const T* gp, const T* lm, const T* gf, T eps,          \
                                  int64_t N, int64_t M, T* gC, T* ggp) {                                         \
    backward_f_impl<T>(C, f, gp, lm, gf, eps, N, M, gC, ggp);                                                    \
  }

SMTC_SINKHORN_INSTANTIATE(float)
SMTC_SINKHORN_INSTANTIATE(double)

// Runs one problem's iterations; keeps every potential in f_hist ((iters+1) x N) / g_hist ((iters+1) x M)
// when given (backward), else only the last. Returns the number of iterations run.
template <typename T>
int64_t solve_one(const T* C, const T* lm, const T* ln, T eps, int64_t iters, double tol, int64_t N, int64_t M,
                  T* f_hist, T* g_hist, bool keep_history, T* colmax, T* colsum) {
  T* f = f_hist;
  T* g = g_hist;
  std::fill(g, g + M, T(0));
  std::fill(f, f + N, T(0));
  int64_t t = 0;
  while (t < iters) {
    T* f_next = keep_history ? f + N : f;
    T* g_next = keep_history ? g + M : g;
    update_f(C, g, lm, eps, N, M, f_next);
    update_g(C, f_next, ln, eps, N, M, g_next, colmax, colsum);
    f = f_next;
    g = g_next;
    ++t;
    if (tol >= 0 && static_cast<double>(row_error(C, f, g, lm, eps, N, M)) < tol) break;
  }
  return t;
}

// The forward of one problem in the scaling form (see above), writing plan, f and g. Returns false (outputs
// unspecified) when a bound was crossed; the caller then solves the problem in the log domain.
// Passes over the 256 KB of E (L2-resident at SMTC's size): one per iteration, and one to scale it into the
// plan. A tolerance is checked with the error that the next pass computes anyway; when it is met, that
// pass's (u', colsum') are dropped and the plan is the one after the previous iteration, as in the reference.
template <typename T>
bool scaling_solve(const T* C, const T* lm, const T* ln, T eps, int64_t iters, double tol, int64_t N, int64_t M,
                   T* f, T* g, T* P, T* mu, T* nu, T* u, T* u_next, T* v, T* colsum, const T* C_next) {
  // C_next's lines spread over the (iters - 1) iteration passes and the scaling pass, one slice per 4 rows.
  NextProblemPrefetch prefetch;
  if (C_next != nullptr) {
    prefetch.p = reinterpret_cast<const char*>(C_next);
    prefetch.end = prefetch.p + N * M * int64_t(sizeof(T));
    const int64_t calls = iters * ((N + kRows - 1) / kRows);
    prefetch.lines = ((prefetch.end - prefetch.p + 63) / 64 + calls - 1) / calls;
  }
  weights(lm, N, mu);
  weights(ln, M, nu);
  if (!first_pass(C, mu, eps, N, M, P, f, u, colsum)) return false;  // P = E, f = base
  if (!column_scaling(colsum, nu, M, v)) return false;
  for (int64_t t = 2; t <= iters; ++t) {
    double err = 0;
    if (!iteration_pass(P, mu, u, v, N, M, u_next, colsum, &err, &prefetch)) return false;
    if (tol >= 0 && err < tol) break;
    std::swap(u, u_next);
    if (!column_scaling(colsum, nu, M, v)) return false;
  }
  scale_plan(u, v, N, M, P, &prefetch);
  potentials(u, f, eps, N, f);  // f = base + eps log u
  potentials(v, static_cast<const T*>(nullptr), eps, M, g);
  return true;
}

// Problems per task of the dynamic schedule (for_chunks). Within a chunk a thread prefetches the next problem's
// costs; 16 keeps that for 15 of every 16 problems while the chunks stay small enough to balance the threads.
constexpr int64_t kProblemsPerTask = 16;

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_cpu(const at::Tensor& cost_in, const at::Tensor& log_mu_in,
                                                           const at::Tensor& log_nu_in, double eps, int64_t iters,
                                                           c10::optional<double> tol) {
  check_sinkhorn_args(cost_in, log_mu_in, log_nu_in, eps, iters, tol);
  const auto cost = cost_in.contiguous();
  const auto log_mu = log_mu_in.contiguous();
  const auto log_nu = log_nu_in.contiguous();
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  auto plan = empty_output(cost.sizes(), cost.options());
  auto f_out = at::empty({B, N}, cost.options());
  auto g_out = at::empty({B, M}, cost.options());
  if (cost.numel() == 0) {
    f_out.zero_();
    g_out.zero_();
    return {plan, f_out, g_out};
  }
  const double tol_v = tol.has_value() ? *tol : -1.0;
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "smtc_fast::sinkhorn (CPU)", [&] {
    const scalar_t* C = cost.data_ptr<scalar_t>();
    const scalar_t* LM = log_mu.data_ptr<scalar_t>();
    const scalar_t* LN = log_nu.data_ptr<scalar_t>();
    scalar_t* P = plan.data_ptr<scalar_t>();
    scalar_t* F = f_out.data_ptr<scalar_t>();
    scalar_t* G = g_out.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    for_chunks(B, kProblemsPerTask, [&](int64_t begin, int64_t end) {
      const int64_t pN = padded<scalar_t>(N), pM = padded<scalar_t>(M);
      // mu, u, u_next (N) | nu, colsum, v (M), each on its own cache lines
      aligned_vector<scalar_t> buf(3 * pN + 3 * pM);
      scalar_t* mu = buf.data();
      scalar_t* u = mu + pN;
      scalar_t* u_next = u + pN;
      scalar_t* nu = u_next + pN;
      scalar_t* colsum = nu + pM;
      scalar_t* v = colsum + pM;
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* f = F + b * N;
        scalar_t* g = G + b * M;
        scalar_t* Pb = P + b * N * M;
        const scalar_t* Cb = C + b * N * M;
        // The scaling form when it is safe (iterations cost a mat-vec instead of a pass of exps), else the
        // log domain; both compute the same map (see above).
        const scalar_t* C_next = b + 1 < end ? Cb + N * M : nullptr;
        if (iters > 0 && scaling_solve<scalar_t>(Cb, LM + b * N, LN + b * M, e, iters, tol_v, N, M, f, g, Pb, mu, nu,
                                                 u, u_next, v, colsum, C_next)) {
          continue;
        }
        solve_one<scalar_t>(Cb, LM + b * N, LN + b * M, e, iters, tol_v, N, M, f, g, false, colsum, v);
        write_plan(Cb, f, g, e, N, M, Pb);
      }
    });
  });
  return {plan, f_out, g_out};
}

at::Tensor sinkhorn_backward_cpu(const at::Tensor& grad_plan_in, const at::Tensor& grad_f_in,
                                 const at::Tensor& grad_g_in, const at::Tensor& cost_in, const at::Tensor& log_mu_in,
                                 const at::Tensor& log_nu_in, double eps, int64_t iters, c10::optional<double> tol) {
  check_sinkhorn_args(cost_in, log_mu_in, log_nu_in, eps, iters, tol);
  check_sinkhorn_grads(grad_plan_in, grad_f_in, grad_g_in, cost_in);
  const auto cost = cost_in.contiguous();
  const auto log_mu = log_mu_in.contiguous();
  const auto log_nu = log_nu_in.contiguous();
  const auto grad_plan = grad_plan_in.contiguous();
  const auto grad_f = grad_f_in.contiguous();
  const auto grad_g = grad_g_in.contiguous();
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  auto grad_cost = empty_output(cost.sizes(), cost.options());
  if (cost.numel() == 0) return grad_cost;
  const double tol_v = tol.has_value() ? *tol : -1.0;
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "smtc_fast::_sinkhorn_backward (CPU)", [&] {
    const scalar_t* C = cost.data_ptr<scalar_t>();
    const scalar_t* LM = log_mu.data_ptr<scalar_t>();
    const scalar_t* LN = log_nu.data_ptr<scalar_t>();
    const scalar_t* GP = grad_plan.data_ptr<scalar_t>();
    const scalar_t* GF = grad_f.data_ptr<scalar_t>();
    const scalar_t* GG = grad_g.data_ptr<scalar_t>();
    scalar_t* GC = grad_cost.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    for_chunks(B, kProblemsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> f_hist((iters + 1) * N), g_hist((iters + 1) * M), buf(2 * M);
      std::vector<scalar_t> gf(N), gg(M), gg_prev(M);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* Cb = C + b * N * M;
        const scalar_t* lm = LM + b * N;
        const scalar_t* ln = LN + b * M;
        scalar_t* gC = GC + b * N * M;
        const int64_t ran = solve_one<scalar_t>(Cb, lm, ln, e, iters, tol_v, N, M, f_hist.data(), g_hist.data(),
                                                true, buf.data(), buf.data() + M);
        const scalar_t* fT = f_hist.data() + ran * N;
        const scalar_t* gT = g_hist.data() + ran * M;
        std::copy(GF + b * N, GF + (b + 1) * N, gf.begin());
        std::copy(GG + b * M, GG + (b + 1) * M, gg.begin());
        backward_plan(Cb, fT, gT, GP + b * N * M, e, N, M, gC, gf.data(), gg.data());
        for (int64_t t = ran; t >= 1; --t) {
          const scalar_t* ft = f_hist.data() + t * N;
          const scalar_t* gt = g_hist.data() + t * M;
          const scalar_t* gprev = g_hist.data() + (t - 1) * M;
          backward_g(Cb, ft, gt, ln, gg.data(), e, N, M, gC, gf.data());
          backward_f(Cb, ft, gprev, lm, gf.data(), e, N, M, gC, gg_prev.data());
          std::swap(gg, gg_prev);
          std::fill(gf.begin(), gf.end(), scalar_t(0));  // f_{t-1} feeds only g_{t-1}: its grad starts at 0
        }
      }
    });
  });
  return grad_cost;
}

}  // namespace

TORCH_LIBRARY_IMPL(smtc_fast, CPU, m) {
  m.impl("sinkhorn", &sinkhorn_cpu);
  m.impl("_sinkhorn_backward", &sinkhorn_backward_cpu);
}

}  // namespace sinkhorn
}  // namespace smtc
