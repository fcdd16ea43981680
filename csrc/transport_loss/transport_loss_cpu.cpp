// C++ CPU kernel of smtc_fast::transport_loss (fused L_sem, math in transport_loss.h) and its backward.
//
// Today's path (smtc_fast.ops.transport_loss_reference) gathers the normalised keys once per ordered pair and
// writes (B*T*(T-1), n, n) costs, plans and cross matrices through memory (~0.8 GB of peak at SMTC's step
// shape, 1.6 GB per tensor at 1024 tokens). Here one task per clip (parallel over clips, dynamic schedule):
//   1. per frame, one pass over its keys: inverse L2 norms and the marginal (nothing copied or normalised);
//   2. per frame i < T-1, the raw dot products with frames i+1..T-1: one single-threaded GEMM (the BLAS's job)
//      into a per-thread (n, (T-1-i) n) block (768 KB at n = 256: it stays in the core's L2); bf16 keys (a bf16
//      forward's) are multiplied on AMX instead, per pair, with float32 accumulation (see pack_vnni);
//   3. per unordered pair, K = exp(-(1 - cos)/eps) is written over its (n, n) sub-block, both orientations'
//      iterations share each pass over K, and a last pass gives both orientations' contractions with the
//      teacher's masks (transport_loss.h); the clip's frames' targets add them in pair order (deterministic);
//   4. the clip's part of the loss, from the student's softmax and the targets (summed over clips in order).
// Nothing of size pairs x n x n is written: the op's memory is its (B, T, S, n) targets plus, per thread, one
// (n, (T-1) n) block (12 MB at n = 1024, T = 4) from the output cache, whatever B is. The softmaxes, the loss
// and the backward (one elementwise pass) run inside the kernel: no (B, T, S, n) temporaries, no extra
// parallel regions (each costs a barrier on a loaded machine).
//
// Passes over K per pair: 1 (build) + (iters - 1) + 1 (contraction); the iterations cost 2 dots and 2 axpys per
// row for both orientations together, the contraction 2S. With float32 keys the GEMM (n^2 D multiply-adds per
// pair) dominates: ~60% of the forward at SMTC's shape (perf, one thread), then the contraction (~10%); the op is
// 1.34x the float32 GEMM alone (bench_transport_loss.py). With bf16 keys on AMX the GEMM is ~12% and the passes over
// K lead (contraction ~21%, build ~7%, iterations ~6%, one thread): 2.5x a bf16 bmm of the same pairs.
// A single-threaded at::mm per task inside the parallel region measured faster here than T-1 batched GEMMs per
// chunk of clips between parallel regions (1.25x at one thread, more on the loaded 2-core VM, where every
// barrier between the GEMM phase and the pair phase waits on the slowest thread).
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>  // cpublas::brgemm: bf16 x bf16 -> float32 on AMX (oneDNN's batch-reduce GEMM)
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/alloc.h"
#include "common/cpu.h"
#include "common/threads.h"
#include "sinkhorn/sinkhorn.h"
#include "transport_loss/transport_loss.h"
#include "transport_loss/transport_loss_check.h"

namespace smtc {
namespace transport_loss {
namespace {

// One unordered pair {i, j} of one clip: K (n x n, row stride ld, holding the raw keys' dot products on entry),
// the keys' inverse norms and marginals, the teacher's masks (S, n) of both frames, and the outputs q_i, q_j (S, n).
template <typename T> struct Pair {
  T* K;
  int64_t ld, n, S, D;
  const T *inv_i, *inv_j, *mu_i, *mu_j, *pt_i, *pt_j;
  const T *key_i, *key_j;  // raw keys (n, D): the log-domain fallback recomputes cos from them
  const uint16_t *key_i_bf16, *key_j_bf16;  // the same, when the keys are bf16 (then key_i, key_j are null)
  T* q_i;
  T* q_j;
};

// Per frame, one pass over its keys (n, D): the inverse L2 norms and the marginal (spec §2.1: mu[a] =
// ||f_hat[a]||_1 = ||x_a||_1 / max(||x_a||_2, 1e-12), renormalised to sum 1; or uniform 1/n).
template <typename T, typename K>
SMTC_ALWAYS_INLINE void frame_stats_impl(const K* x, int64_t n, int64_t D, bool norm_marginals, T* inv, T* mu) {
  T total = T(0);
  for (int64_t a = 0; a < n; ++a) {
    const K* row = x + a * D;
    T s2 = T(0), s1 = T(0);
    SMTC_SIMD_SUM2(s2, s1)
    for (int64_t k = 0; k < D; ++k) {
      const T v = stored_value(row[k]);
      s2 += v * v;
      s1 += std::abs(v);
    }
    inv[a] = inverse_norm(s2);
    mu[a] = s1 * inv[a];
    total += mu[a];
  }
  for (int64_t a = 0; a < n; ++a) mu[a] = norm_marginals ? mu[a] / total : T(1) / T(n);
}

// ---- The probability-domain iteration over one K, both orientations at once ---------------------------------
// Rows are taken four at a time (past the last row they repeat it with a zero coefficient): four independent dot
// products, and one read-modify-write of the column sums per four rows (as in csrc/sinkhorn/sinkhorn_cpu.cpp).
constexpr int64_t kRows = 4;

template <typename T> SMTC_ALWAYS_INLINE void block_rows(T* K, int64_t ld, int64_t a0, int64_t n, T** r) {
  for (int64_t k = 0; k < kRows; ++k) r[k] = K + std::min(a0 + k, n - 1) * ld;
}

// Pass 1: K = exp(-(1 - cos)/eps) in place; a1 = mu_i / (K 1) (orientation i -> j starts at x1 = 1),
// c1 = K^T a1, and c2 = K^T 1 (orientation j -> i starts at x2 = 1).
template <typename T>
SMTC_ALWAYS_INLINE void build_pass_impl(T* K, int64_t ld, int64_t n, T scale2, const T* inv_i, const T* inv_j,
                                        const T* mu_i, bool scale_rows, T* a1, T* c1, T* c2, bool* bad) {
  std::fill(c1, c1 + n, T(0));
  std::fill(c2, c2 + n, T(0));
  for (int64_t a0 = 0; a0 < n; a0 += kRows) {
    T u[kRows] = {}, one[kRows] = {};
    for (int64_t a = a0; a < std::min(a0 + kRows, n); ++a) {
      T* row = K + a * ld;
      const T ia = inv_i[a];
      T s = T(0);
      SMTC_SIMD_SUM(s)
      for (int64_t b = 0; b < n; ++b) {
        const T e = kernel_entry(cosine(row[b], ia, inv_j[b]), scale2);
        row[b] = e;
        s += e;
      }
      u[a - a0] = scale_rows ? scaling(mu_i[a], s, bad) : T(0);
      a1[a] = u[a - a0];
      one[a - a0] = T(1);
    }
    T* r[kRows];
    block_rows(K, ld, a0, n, r);
    const T *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
    SMTC_SIMD
    for (int64_t b = 0; b < n; ++b) {
      c1[b] += u[0] * r0[b] + u[1] * r1[b] + u[2] * r2[b] + u[3] * r3[b];
      c2[b] += one[0] * r0[b] + one[1] * r1[b] + one[2] * r2[b] + one[3] * r3[b];
    }
  }
}

// Passes 2..iters: a1 = mu_i / (K x1) and x2 = mu_i / (K a2) row by row, and their column sums c1 = K^T a1,
// c2 = K^T x2 while the rows are in L1.
template <typename T>
SMTC_ALWAYS_INLINE void iteration_pass_impl(T* K, int64_t ld, int64_t n, const T* mu_i, const T* x1, const T* a2,
                                            T* a1, T* x2, T* c1, T* c2, bool* bad) {
  std::fill(c1, c1 + n, T(0));
  std::fill(c2, c2 + n, T(0));
  for (int64_t a0 = 0; a0 < n; a0 += kRows) {
    T* r[kRows];
    block_rows(K, ld, a0, n, r);
    const T *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
    T p0 = T(0), p1 = T(0), p2 = T(0), p3 = T(0), q0 = T(0), q1 = T(0), q2 = T(0), q3 = T(0);
    _Pragma("omp simd reduction(+ : p0, p1, p2, p3, q0, q1, q2, q3)")
    for (int64_t b = 0; b < n; ++b) {
      p0 += r0[b] * x1[b];
      p1 += r1[b] * x1[b];
      p2 += r2[b] * x1[b];
      p3 += r3[b] * x1[b];
      q0 += r0[b] * a2[b];
      q1 += r1[b] * a2[b];
      q2 += r2[b] * a2[b];
      q3 += r3[b] * a2[b];
    }
    const T p[kRows] = {p0, p1, p2, p3}, q[kRows] = {q0, q1, q2, q3};
    T u1[kRows] = {}, u2[kRows] = {};
    for (int64_t a = a0; a < std::min(a0 + kRows, n); ++a) {
      u1[a - a0] = a1[a] = scaling(mu_i[a], p[a - a0], bad);
      u2[a - a0] = x2[a] = scaling(mu_i[a], q[a - a0], bad);
    }
    SMTC_SIMD
    for (int64_t b = 0; b < n; ++b) {
      c1[b] += u1[0] * r0[b] + u1[1] * r1[b] + u1[2] * r2[b] + u1[3] * r3[b];
      c2[b] += u2[0] * r0[b] + u2[1] * r1[b] + u2[2] * r2[b] + u2[3] * r3[b];
    }
  }
}

// x = w / c elementwise (the column half-steps: x1 = mu_j / c1, a2 = mu_j / c2).
template <typename T> SMTC_ALWAYS_INLINE void column_scaling_impl(const T* w, const T* c, int64_t n, T* x, bool* bad) {
  for (int64_t b = 0; b < n; ++b) x[b] = scaling(w[b], c[b], bad);
}

// Last pass: x2 = mu_i / (K a2) (when the iteration ran; else x2 = 1), then
//   q_i[s, a] = a1[a] sum_b K[a, b] (x1[b] pt_j[s, b])      (plan_ij @ pt_j^T)
//   q_j[s, b] = a2[b] sum_a K[a, b] (x2[a] pt_i[s, a])      (plan_ji @ pt_i^T)
// in one loop over b per (4 rows, slot): the rows are read once for the dot products and the column updates.
// y1 (S, n) is scratch for x1 * pt_j.
template <typename T>
SMTC_ALWAYS_INLINE void contraction_pass_impl(T* K, int64_t ld, int64_t n, int64_t S, const T* mu_i, const T* a1,
                                              const T* x1, const T* a2, bool iterated, const T* pt_i,
                                              const T* pt_j, T* y1, T* q_i, T* q_j, bool* bad) {
  for (int64_t s = 0; s < S; ++s) {
    SMTC_SIMD
    for (int64_t b = 0; b < n; ++b) y1[s * n + b] = x1[b] * pt_j[s * n + b];
  }
  std::fill(q_j, q_j + S * n, T(0));
  for (int64_t a0 = 0; a0 < n; a0 += kRows) {
    T* r[kRows];
    block_rows(K, ld, a0, n, r);
    const T *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
    const int64_t rows = std::min(a0 + kRows, n) - a0;
    T x2[kRows] = {};
    if (iterated) {
      T d0 = T(0), d1 = T(0), d2 = T(0), d3 = T(0);
      SMTC_SIMD_SUM4(d0, d1, d2, d3)
      for (int64_t b = 0; b < n; ++b) {
        d0 += r0[b] * a2[b];
        d1 += r1[b] * a2[b];
        d2 += r2[b] * a2[b];
        d3 += r3[b] * a2[b];
      }
      const T d[kRows] = {d0, d1, d2, d3};
      for (int64_t k = 0; k < rows; ++k) x2[k] = scaling(mu_i[a0 + k], d[k], bad);
    } else {
      for (int64_t k = 0; k < rows; ++k) x2[k] = T(1);
    }
    for (int64_t s = 0; s < S; ++s) {
      const T* y = y1 + s * n;
      T* q = q_j + s * n;
      T c[kRows] = {};
      for (int64_t k = 0; k < rows; ++k) c[k] = x2[k] * pt_i[s * n + a0 + k];
      const T c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
      T d0 = T(0), d1 = T(0), d2 = T(0), d3 = T(0);
      SMTC_SIMD_SUM4(d0, d1, d2, d3)
      for (int64_t b = 0; b < n; ++b) {
        const T k0 = r0[b], k1 = r1[b], k2 = r2[b], k3 = r3[b];
        d0 += k0 * y[b];
        d1 += k1 * y[b];
        d2 += k2 * y[b];
        d3 += k3 * y[b];
        q[b] += c0 * k0 + c1 * k1 + c2 * k2 + c3 * k3;
      }
      const T d[kRows] = {d0, d1, d2, d3};
      for (int64_t k = 0; k < rows; ++k) q_i[s * n + a0 + k] = a1[a0 + k] * d[k];
    }
  }
  for (int64_t s = 0; s < S; ++s) {
    SMTC_SIMD
    for (int64_t b = 0; b < n; ++b) q_j[s * n + b] *= a2[b];
  }
}

// ---- Log-domain fallback (a pair whose scalings left the bounds; never at SMTC's settings) --------------------
// The same map as the reference's log-domain Sinkhorn on C = 1 - cos (the constant does not change the plan),
// scalar and unhurried. cos is recomputed from the keys (K overwrote it).

// out[a] = eps log w[a] - eps LSE_b((v[b] - C[a, b])/eps)   (rows)
template <typename T> void lse_rows(const T* C, int64_t ld, int64_t n, T eps, const T* w, const T* v, T* out) {
  for (int64_t a = 0; a < n; ++a) {
    T mx = neg_inf<T>(), s = T(0);
    for (int64_t b = 0; b < n; ++b) lse_push(mx, s, (v[b] - C[a * ld + b]) / eps);
    out[a] = sinkhorn::potential(eps, smtc_log(w[a]), mx, s);
  }
}
// out[b] = eps log w[b] - eps LSE_a((v[a] - C[a, b])/eps)   (columns)
template <typename T>
void lse_cols(const T* C, int64_t ld, int64_t n, T eps, const T* w, const T* v, T* out, T* mx, T* s) {
  std::fill(mx, mx + n, neg_inf<T>());
  std::fill(s, s + n, T(0));
  for (int64_t a = 0; a < n; ++a)
    for (int64_t b = 0; b < n; ++b) lse_push(mx[b], s[b], (v[a] - C[a * ld + b]) / eps);
  for (int64_t b = 0; b < n; ++b) out[b] = sinkhorn::potential(eps, smtc_log(w[b]), mx[b], s[b]);
}

template <typename T> void log_domain_pair(const Pair<T>& p, T eps, int64_t iters, T* buf) {
  const int64_t n = p.n, S = p.S, ld = p.ld, D = p.D;
  T* C = p.K;
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = 0; b < n; ++b) {
      T dot = T(0);
      if (p.key_i_bf16 != nullptr) {
        for (int64_t k = 0; k < D; ++k) {
          dot += stored_value(p.key_i_bf16[a * D + k]) * stored_value(p.key_j_bf16[b * D + k]);
        }
      } else {
        for (int64_t k = 0; k < D; ++k) dot += p.key_i[a * D + k] * p.key_j[b * D + k];
      }
      C[a * ld + b] = T(1) - cosine(dot, p.inv_i[a], p.inv_j[b]);
    }
  }
  T *f1 = buf, *g1 = f1 + n, *f2 = g1 + n, *g2 = f2 + n, *mx = g2 + n, *s = mx + n;
  std::fill(g1, g1 + n, T(0));
  std::fill(g2, g2 + n, T(0));
  for (int64_t t = 0; t < iters; ++t) {
    lse_rows(C, ld, n, eps, p.mu_i, g1, f1);          // i -> j: f over the rows of frame i
    lse_cols(C, ld, n, eps, p.mu_j, f1, g1, mx, s);   //         g over the columns of frame j
    lse_cols(C, ld, n, eps, p.mu_j, g2, f2, mx, s);   // j -> i: f over frame j (the columns)
    lse_rows(C, ld, n, eps, p.mu_i, f2, g2);          //         g over frame i (the rows)
  }
  std::fill(p.q_i, p.q_i + S * n, T(0));
  std::fill(p.q_j, p.q_j + S * n, T(0));
  for (int64_t a = 0; a < n; ++a) {
    for (int64_t b = 0; b < n; ++b) {
      const T c = C[a * ld + b];
      const T plan_ij = std::exp((f1[a] + g1[b] - c) / eps);
      const T plan_ji = std::exp((f2[b] + g2[a] - c) / eps);
      for (int64_t k = 0; k < S; ++k) {
        p.q_i[k * n + a] += plan_ij * p.pt_j[k * n + b];
        p.q_j[k * n + b] += plan_ji * p.pt_i[k * n + a];
      }
    }
  }
}

// Non-template entry points, compiled once per SIMD width (target_clones) with the loops above inlined.
#define SMTC_FRAME_STATS_INSTANTIATE(K, T)                                                                       \
  SMTC_CPU_CLONES void frame_stats(const K* x, int64_t n, int64_t D, bool norm, T* inv, T* mu) {                 \
    frame_stats_impl<T, K>(x, n, D, norm, inv, mu);                                                              \
  }
SMTC_FRAME_STATS_INSTANTIATE(float, float)
SMTC_FRAME_STATS_INSTANTIATE(double, double)
SMTC_FRAME_STATS_INSTANTIATE(uint16_t, float)   // bf16 keys
SMTC_FRAME_STATS_INSTANTIATE(uint16_t, double)  // (never called: bf16 keys come with float32 logits)

#define SMTC_TRANSPORT_LOSS_INSTANTIATE(T)                                                                       \
  SMTC_CPU_CLONES void build_pass(T* K, int64_t ld, int64_t n, T sc, const T* ii, const T* ij, const T* mu,      \
                                  bool rows, T* a1, T* c1, T* c2, bool* bad) {                                   \
    build_pass_impl<T>(K, ld, n, sc, ii, ij, mu, rows, a1, c1, c2, bad);                                         \
  }                                                                                                              \
  SMTC_CPU_CLONES void iteration_pass(T* K, int64_t ld, int64_t n, const T* mu, const T* x1, const T* a2, T* a1, \
                                      T* x2, T* c1, T* c2, bool* bad) {                                          \
    iteration_pass_impl<T>(K, ld, n, mu, x1, a2, a1, x2, c1, c2, bad);                                           \
  }                                                                                                              \
  SMTC_CPU_CLONES void column_scaling(const T* w, const T* c, int64_t n, T* x, bool* bad) {                      \
    column_scaling_impl<T>(w, c, n, x, bad);                                                                     \
  }                                                                                                              \
  SMTC_CPU_CLONES void contraction_pass(T* K, int64_t ld, int64_t n, int64_t S, const T* mu, const T* a1,        \
                                        const T* x1, const T* a2, bool it, const T* pti, const T* ptj, T* y1,    \
                                        T* qi, T* qj, bool* bad) {                                               \
    contraction_pass_impl<T>(K, ld, n, S, mu, a1, x1, a2, it, pti, ptj, y1, qi, qj, bad);                        \
  }

SMTC_TRANSPORT_LOSS_INSTANTIATE(float)
SMTC_TRANSPORT_LOSS_INSTANTIATE(double)

// p = softmax over the S slots of one frame's logits z (S, n), token by token, vectorised across tokens
// (mx, sum: n scratch each).
template <typename T> void softmax_frame(const T* z, int64_t S, int64_t n, T* p, T* mx, T* sum) {
  std::fill(mx, mx + n, neg_inf<T>());
  for (int64_t s = 0; s < S; ++s) {
    SMTC_SIMD
    for (int64_t a = 0; a < n; ++a) mx[a] = vmax(mx[a], z[s * n + a]);
  }
  std::fill(sum, sum + n, T(0));
  for (int64_t s = 0; s < S; ++s) {
    SMTC_SIMD
    for (int64_t a = 0; a < n; ++a) {
      p[s * n + a] = fast_exp_nonpositive(z[s * n + a] - mx[a]);
      sum[a] += p[s * n + a];
    }
  }
  for (int64_t s = 0; s < S; ++s) {
    SMTC_SIMD
    for (int64_t a = 0; a < n; ++a) p[s * n + a] /= sum[a];
  }
}

// log(p + 1e-8) for a probability p (the argument is a positive normal number): vectorisable in float.
inline float log_prob(float p) { return fast_log_normal(p + float(kProbEps)); }
inline double log_prob(double p) { return std::log(p + kProbEps); }

// One pair, start to end. buf: 6n + S n scratch.
template <typename T> void solve_pair(const Pair<T>& p, T eps, int64_t iters, T iters0_factor, T* buf) {
  const int64_t n = p.n, S = p.S, ld = p.ld;
  T *a1 = buf, *x1 = a1 + n, *a2 = x1 + n, *x2 = a2 + n, *c1 = x2 + n, *c2 = c1 + n, *y1 = c2 + n;
  const T scale2 = T(1.4426950408889634) / eps;  // exp(-(1 - cos)/eps) = 2^((cos - 1) log2(e)/eps)
  bool bad = false;
  build_pass(p.K, ld, n, scale2, p.inv_i, p.inv_j, p.mu_i, iters > 0, a1, c1, c2, &bad);
  if (iters == 0) {
    // No iteration: the plan is exp(-C/eps) itself, with the cost's own constant (1 - cos or -cos).
    std::fill(a1, a1 + n, iters0_factor);
    std::fill(x1, x1 + n, T(1));
    std::fill(a2, a2 + n, iters0_factor);
  } else {
    column_scaling(p.mu_j, c1, n, x1, &bad);
    column_scaling(p.mu_j, c2, n, a2, &bad);
    for (int64_t t = 2; t <= iters && !bad; ++t) {
      iteration_pass(p.K, ld, n, p.mu_i, x1, a2, a1, x2, c1, c2, &bad);
      column_scaling(p.mu_j, c1, n, x1, &bad);
      column_scaling(p.mu_j, c2, n, a2, &bad);
    }
  }
  if (!bad) contraction_pass(p.K, ld, n, S, p.mu_i, a1, x1, a2, iters > 0, p.pt_i, p.pt_j, y1, p.q_i, p.q_j, &bad);
  if (bad) log_domain_pair(p, eps, iters, buf);
}

// ---- bf16 keys on AMX -------------------------------------------------------------------------------------------
// Keys from a bf16 forward (the trainer's default --amp on a CPU with native bf16) hold bf16 values. The product of
// two bf16 numbers is exact in float32, so a bf16 GEMM that accumulates in float32 gives the float32 GEMM's dot
// products of the same values, up to the order of the sums (as two BLAS blockings differ). oneDNN's batch-reduce
// GEMM (cpublas::brgemm) does that on AMX tiles: the pair blocks' 9.7 GFLOP at SMTC's shape in ~6 ms instead of
// ~35 ms in float32 (bench/bench_transport_loss.py), which was 70% of the fused op. Where brgemm cannot run bf16
// (no AMX: cpublas::could_pack), or D is not a multiple of kBrgemmK, the keys are widened to float32 instead.
constexpr int64_t kBrgemmK = 32;  // bf16 elements per AMX tile row: K is never padded

// B = X^T (D x n) of one frame's keys X (n, D) in the VNNI layout brgemm takes for bf16, [D/2][n][2]: the 32-bit
// word (x[c][2k], x[c][2k+1]) of token c goes to word k n + c, i.e. X's (n, D/2) words transposed.
void pack_vnni(const uint16_t* x, int64_t n, int64_t D, uint16_t* out) {
  const int64_t W = D / 2;
  constexpr int64_t kTile = 16;
  for (int64_t c0 = 0; c0 < n; c0 += kTile) {
    for (int64_t k0 = 0; k0 < W; k0 += kTile) {
      for (int64_t c = c0; c < std::min(c0 + kTile, n); ++c) {
        for (int64_t k = k0; k < std::min(k0 + kTile, W); ++k) {
          std::memcpy(out + 2 * (k * n + c), x + 2 * (c * W + k), 4);
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> transport_loss_cpu(const at::Tensor& student_logits_in,
                                                      const at::Tensor& teacher_logits_in,
                                                      const at::Tensor& teacher_keys_in, double eps, int64_t iters,
                                                      c10::string_view marginals_in, c10::string_view cost_in) {
  const std::string marginals(marginals_in), cost(cost_in);
  check_transport_loss_args(student_logits_in, teacher_logits_in, teacher_keys_in, eps, iters, marginals, cost);
  const auto student_logits = student_logits_in.contiguous();
  auto keys = teacher_keys_in.contiguous();
  const int64_t B = student_logits.size(0), T = student_logits.size(1), S = student_logits.size(2);
  const int64_t n = student_logits.size(3), D = keys.size(3);
  // bf16 keys (float32 logits; checked): their GEMM on AMX where it can run, else the float32 path (see pack_vnni)
  const bool bf16_keys = keys.scalar_type() == at::kBFloat16;
  const bool amx_keys = bf16_keys && D % kBrgemmK == 0 && at::native::cpublas::could_pack(at::kBFloat16);
  if (bf16_keys && !amx_keys) keys = keys.to(student_logits.scalar_type());
  const auto teacher_logits = teacher_logits_in.contiguous();
  auto targets = at::empty(student_logits.sizes(), student_logits.options());
  double loss_sum = 0;
  if (targets.numel() > 0) {
    const auto opts = student_logits.options();
    auto stats = at::empty({2, B, T, n}, opts);  // inverse key norms, marginals
    auto loss_part = at::empty({B}, opts.dtype(at::kDouble));
    const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
    // Per-thread scratch (from the output cache: no fresh pages per call): the dot-product / K block, the
    // clip's teacher masks and one frame's student probabilities.
    const int64_t scratch = n * (T - 1) * n + T * S * n + S * n;
    auto scratch_t = empty_output({n_threads, scratch}, opts);
    // bf16 keys: per thread, frames 1..T-1 of the clip packed for brgemm
    auto packed_t = amx_keys ? empty_output({n_threads, (T - 1) * n * D}, keys.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(student_logits.scalar_type(), "smtc_fast::transport_loss (CPU)", [&] {
      using scalar = scalar_t;
      const scalar e = static_cast<scalar>(eps);
      // iters = 0 only: exp(-C/eps) = exp(-(1 - cos)/eps) * exp((1 - c0)/eps) for C = c0 - cos
      const scalar iters0_factor = cost == "neg_cos" ? static_cast<scalar>(std::exp(1.0 / eps)) : scalar(1);
      const scalar* kp = amx_keys ? nullptr : keys.data_ptr<scalar>();
      const uint16_t* kb = amx_keys ? reinterpret_cast<const uint16_t*>(keys.data_ptr<at::BFloat16>()) : nullptr;
      const scalar* zs = student_logits.data_ptr<scalar>();
      const scalar* zt = teacher_logits.data_ptr<scalar>();
      scalar* invp = stats.data_ptr<scalar>();
      scalar* mup = invp + B * T * n;
      scalar* tp = targets.data_ptr<scalar>();
      double* lp = loss_part.data_ptr<double>();
      const bool norm_marginals = marginals == "norm";
      // One task per clip (taken from a shared counter): its frames' targets are its own, so pairs add into
      // them in a fixed order (deterministic) with no reduction buffer.
      std::atomic<int64_t> next{0};
      run_on_threads(n_threads, [&](int64_t tid) {
        scalar* Kb = scratch_t.data_ptr<scalar>() + tid * scratch;
        scalar* ptc = Kb + n * (T - 1) * n;  // (T, S, n) the clip's teacher masks (no gradient, as official)
        scalar* ps = ptc + T * S * n;        // (S, n)
        std::vector<scalar> buf(std::max<int64_t>(6 * n + S * n, 1)), q(std::max<int64_t>(2 * S * n, 1));
        uint16_t* packed =
            amx_keys ? reinterpret_cast<uint16_t*>(packed_t.data_ptr<at::BFloat16>()) + tid * (T - 1) * n * D : nullptr;
        for (int64_t b; (b = next.fetch_add(1)) < B;) {
          std::fill(tp + b * T * S * n, tp + (b + 1) * T * S * n, scalar(0));
          for (int64_t t = 0; t < T; ++t) {
            const int64_t f = b * T + t;
            if (amx_keys) {
              frame_stats(kb + f * n * D, n, D, norm_marginals, invp + f * n, mup + f * n);
              if (t > 0) pack_vnni(kb + f * n * D, n, D, packed + (t - 1) * n * D);
            } else {
              frame_stats(kp + f * n * D, n, D, norm_marginals, invp + f * n, mup + f * n);
            }
            softmax_frame(zt + f * S * n, S, n, ptc + t * S * n, buf.data(), buf.data() + n);
          }
          for (int64_t i = 0; i + 1 < T; ++i) {
            // The raw dot products of frame i with frames i+1..T-1: one single-threaded GEMM (we are inside the
            // parallel region) into an (n, (T-1-i) n) block, whose (n, n) sub-blocks are the pairs' K, built
            // while the block is still in L2 (768 KB at SMTC's shape).
            const int64_t w = (T - 1 - i) * n;
            if (amx_keys) {  // scalar is float here (bf16 keys come with float32 logits)
              const auto* a = reinterpret_cast<const at::BFloat16*>(kb + (b * T + i) * n * D);
              for (int64_t j = i + 1; j < T; ++j) {
                const auto* bj = reinterpret_cast<const at::BFloat16*>(packed + (j - 1) * n * D);
                float* c = reinterpret_cast<float*>(Kb + (j - i - 1) * n);
                at::native::cpublas::brgemm(n, n, D, D, n, w, false, a, bj, c);
              }
            } else {
              auto block = at::from_blob(Kb, {n, w}, opts);
              at::mm_out(block, keys[b][i], keys[b].narrow(0, i + 1, T - 1 - i).reshape({w, D}).t());
            }
            for (int64_t j = i + 1; j < T; ++j) {
              const int64_t fi = b * T + i, fj = b * T + j;  // frame indices into (B, T)
              Pair<scalar> p;
              p.K = Kb + (j - i - 1) * n;
              p.ld = w;
              p.n = n;
              p.S = S;
              p.D = D;
              p.inv_i = invp + fi * n;
              p.inv_j = invp + fj * n;
              p.mu_i = mup + fi * n;
              p.mu_j = mup + fj * n;
              p.pt_i = ptc + i * S * n;
              p.pt_j = ptc + j * S * n;
              p.key_i = amx_keys ? nullptr : kp + fi * n * D;
              p.key_j = amx_keys ? nullptr : kp + fj * n * D;
              p.key_i_bf16 = amx_keys ? kb + fi * n * D : nullptr;
              p.key_j_bf16 = amx_keys ? kb + fj * n * D : nullptr;
              p.q_i = q.data();
              p.q_j = q.data() + S * n;
              solve_pair(p, e, iters, iters0_factor, buf.data());
              scalar* ti = tp + fi * S * n;
              scalar* tj = tp + fj * S * n;
              for (int64_t k = 0; k < S * n; ++k) ti[k] += p.q_i[k];
              for (int64_t k = 0; k < S * n; ++k) tj[k] += p.q_j[k];
            }
          }
          // The clip's part of sum log(p_s + 1e-8) * targets (transport_loss.h).
          double acc = 0;
          for (int64_t t = 0; t < T; ++t) {
            const int64_t f = b * T + t;
            softmax_frame(zs + f * S * n, S, n, ps, buf.data(), buf.data() + n);
            const scalar* tg = tp + f * S * n;
            scalar part = scalar(0);
            SMTC_SIMD_SUM(part)
            for (int64_t k = 0; k < S * n; ++k) part += log_prob(ps[k]) * tg[k];
            acc += static_cast<double>(part);
          }
          lp[b] = acc;
        }
        if (amx_keys) at::native::cpublas::brgemm_release();  // this thread's AMX tile configuration
      });
      for (int64_t b = 0; b < B; ++b) loss_sum += lp[b];  // fixed order: deterministic
    });
  }
  // L = -1/(B T (T-1)) sum log(p_s + 1e-8) * targets; B = 0 gives NaN like the reference's empty mean.
  const double count = double(B * T * (T - 1));
  const auto loss = at::scalar_tensor(-loss_sum / count, student_logits.options());
  return {loss, targets};
}

// dL/dz_s = coef * p_s * (w_s - sum_r w_r p_r), w = targets / (p + 1e-8), coef = -grad / (B T (T-1)): one pass
// over the tokens of each (clip, frame), vectorised across tokens.
template <typename T>
void backward_frame(const T* z, const T* tg, T coef, int64_t S, int64_t n, T* p, T* mx, T* sum, T* wp, T* gz) {
  softmax_frame(z, S, n, p, mx, sum);
  std::fill(wp, wp + n, T(0));
  for (int64_t s = 0; s < S; ++s) {
    SMTC_SIMD
    for (int64_t a = 0; a < n; ++a) wp[a] += target_weight(tg[s * n + a], p[s * n + a]) * p[s * n + a];
  }
  for (int64_t s = 0; s < S; ++s) {
    SMTC_SIMD
    for (int64_t a = 0; a < n; ++a) {
      const T ps = p[s * n + a];
      gz[s * n + a] = logit_grad(coef, ps, target_weight(tg[s * n + a], ps), wp[a]);
    }
  }
}

at::Tensor transport_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& student_logits_in,
                                       const at::Tensor& targets_in) {
  check_transport_loss_grads(grad_loss, student_logits_in, targets_in);
  const auto z = student_logits_in.contiguous();
  const auto targets = targets_in.contiguous();
  const int64_t B = z.size(0), T = z.size(1), S = z.size(2), n = z.size(3);
  auto grad = at::empty(z.sizes(), z.options());
  if (grad.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "smtc_fast::_transport_loss_backward (CPU)", [&] {
    const scalar_t coef = -grad_loss.item<scalar_t>() / static_cast<scalar_t>(B * T * (T - 1));
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* tp = targets.data_ptr<scalar_t>();
    scalar_t* gp = grad.data_ptr<scalar_t>();
    for_chunks(B * T, 8, [&](int64_t f0, int64_t f1) {
      std::vector<scalar_t> buf(S * n + 3 * n);
      for (int64_t f = f0; f < f1; ++f) {
        backward_frame<scalar_t>(zp + f * S * n, tp + f * S * n, coef, S, n, buf.data(), buf.data() + S * n,
                                 buf.data() + S * n + n, buf.data() + S * n + 2 * n, gp + f * S * n);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(smtc_fast, CPU, m) {
  m.impl("transport_loss", &transport_loss_cpu);
  m.impl("_transport_loss_backward", &transport_loss_backward_cpu);
}

}  // namespace transport_loss
}  // namespace smtc
