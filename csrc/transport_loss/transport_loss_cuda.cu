// CUDA kernels of the fused L_sem (smtc_fast::transport_loss; math in transport_loss.h, the CPU kernel in
// transport_loss_cpu.cpp). The wrapper (transport_loss_cuda_ops.cpp) runs, per chunk of clips whose K blocks fit
// the L2 cache (kChunkElems in the wrapper: 32 MB of float32):
//   1. frame_stats_kernel (once for all frames): inverse key norms, marginals, p_t = softmax_S(teacher);
//   2. cuBLAS: per frame i, the raw keys' dot products with frames i+1..T-1 (one GEMM per i for the chunk);
//   3. pair_scalings_kernel, one block per unordered pair {i, j}: K = exp(-(1 - cos)/eps) in place, both
//      orientations' `iters` probability-domain iterations over the same K (transport_loss.h), and the small
//      (S, n) right-hand sides of the contractions y1 = x1 * p_t_j, y2 = x2 * p_t_i;
//   4. cuBLAS: z1 = y1 K^T, z2 = y2 K per pair (the contractions with the teacher masks are GEMMs: S = 16 columns);
//   5. combine_kernel: targets_i = sum_j a1 * z1 in pair order, and each frame's part of the loss.
// Nothing of size pairs x n x n outlives a chunk; every sum runs in a fixed order (warp shuffle trees, per-thread
// loops in index order, block partials added in warp order), no atomics: bitwise identical under every schedule.
//
// Parallel schedule of the pair kernel (256 threads): row sums (K v)_a by a warp per row (lanes over b, shuffle
// tree), column sums (K^T u)_b by a thread per column (a loop over a in order; adjacent threads read adjacent b:
// coalesced). The vectors a1, x1, a2, x2 (4n) live in shared memory; K stays in global memory / L2 (256 KB per
// pair at n = 256 in float32: more than a block's 227 KB of shared memory).
//
// Log-domain fallback: a pair whose scalings leave the bounds of transport_loss.h (eps far below SMTC's 0.05: rows
// of K underflow) is solved again in the log domain by its block, as in the CPU kernel (the reference's log-domain
// Sinkhorn on C = 1 - cos, recomputed from the keys over K's buffer), and its contractions are done in the block
// (its `flag` tells the combine kernel to take them instead of the GEMMs'). Scalar and unhurried: never at SMTC's
// settings.
//
// Roofline at SMTC's shape on an H100 SXM (B = 32 clips, T = 4: 192 pairs, n = 256, D = 384, S = 16, float32;
// 3.35 TB/s, 67 TFLOP/s FP32, 16 exps/SM/clk x 132 SMs x 1.75 GHz = 3.7 T exp/s):
//   dot-product GEMMs 192 x 2 n^2 D = 9.7 GFLOP -> 144 us in FP32 (about 20 us where torch allows TF32);
//   K: 192 x 256 KB = 50 MB; passes over it: GEMM write, build (read + write), column pass, 2 x 2 passes for
//   iterations 2..3, the last row pass, 2 GEMM reads = 11 passes = 550 MB: 165 us if every pass went to DRAM, ~35 us
//   from L2 (~15 TB/s) when a chunk's K (32 MB) stays resident, which is what the chunking is for;
//   exps 192 x n^2 = 12.6 M -> 3.4 us; contraction GEMMs 2 x 192 x 2 S n^2 = 0.8 GFLOP -> 12 us;
//   keys 50 MB + logits 2 x 8.4 MB + targets 8.4 MB -> 23 us of DRAM.
// So the op is bound by the dot-product GEMM's FP32 arithmetic (~150 us), then by the L2 traffic of the passes over
// K. Where K lives, per the roofline: a pair's K (256 KB in float32) does not fit one block's 227 KB of shared
// memory (a 2-CTA cluster's distributed shared memory would, but the execution tier cannot run clusters, and a
// half-precision K would cost the float32 tolerance: K's relative error would be 1e-3); recomputing K from the keys
// on tensor cores at every pass costs 2 n^2 D FLOP per pair per pass, 7 x 9.7 = 68 GFLOP (~140 us even at the
// dense TF32 rate of ~495 TFLOP/s, and TF32 cosines cost float32 accuracy at eps = 0.05) against ~35 us of L2 reads:
// K stays in global memory, written once by cuBLAS, its chunk sized for L2. At SMTC's shape that is 2 chunks of 16
// clips, 96 pair blocks per launch on 132 SMs: kChunkElems (the wrapper) trades L2 residency against filling the SMs;
// not yet measured on a GPU.
#include "common/cuda_utils.cuh"
#include "sinkhorn/sinkhorn.h"
#include "transport_loss/transport_loss.h"
#include "transport_loss/transport_loss_cuda.h"

namespace smtc {
namespace transport_loss {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Block-wide sum of one value per thread in a fixed order (shuffle tree, then warps in order); the result in every
// thread. red: kWarps shared values. Two barriers, so it can be called repeatedly.
template <typename T> __device__ __forceinline__ T block_sum(T v, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T s = T(0);
  for (int w = 0; w < kWarps; ++w) s += red[w];
  __syncthreads();
  return s;
}

// p (S values at stride n) = softmax over S of z (stride n), for one token: max, sum of exps, divide (the CPU's order).
template <typename T> __device__ __forceinline__ T softmax_max(const T* z, int64_t S, int64_t n) {
  T mx = neg_inf<T>();
  for (int64_t s = 0; s < S; ++s) mx = vmax(mx, z[s * n]);
  return mx;
}
template <typename T> __device__ __forceinline__ T softmax_sum(const T* z, int64_t S, int64_t n, T mx) {
  T sum = T(0);
  for (int64_t s = 0; s < S; ++s) sum += fast_exp_nonpositive(z[s * n] - mx);
  return sum;
}

// ---- 1. per frame: inverse norms, marginals (spec §2.1), teacher masks. One block per frame. -----------------------
template <typename T>
__global__ void frame_stats_kernel(const T* __restrict__ keys, const T* __restrict__ zt, int64_t n, int64_t D,
                                   int64_t S, bool norm_marginals, T* __restrict__ inv, T* __restrict__ mu,
                                   T* __restrict__ pt) {
  __shared__ T red[kWarps];
  const int64_t f = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* x = keys + f * n * D;
  T* fi = inv + f * n;
  T* fm = mu + f * n;
  // A warp per key: sums of squares and of absolute values over D (lanes, then the shuffle tree).
  for (int64_t a = warp; a < n; a += kWarps) {
    T s2 = T(0), s1 = T(0);
    for (int64_t k = lane; k < D; k += 32) {
      const T v = x[a * D + k];
      s2 += v * v;
      s1 += fabs(v);
    }
    s2 = warp_sum(s2);
    s1 = warp_sum(s1);
    if (lane == 0) {
      fi[a] = inverse_norm(s2);
      fm[a] = s1 * fi[a];
    }
  }
  __syncthreads();
  T part = T(0);
  for (int64_t a = threadIdx.x; a < n; a += kThreads) part += fm[a];
  const T total = block_sum(part, red);
  for (int64_t a = threadIdx.x; a < n; a += kThreads) fm[a] = norm_marginals ? fm[a] / total : T(1) / T(n);
  // p_t: a thread per token, softmax over the S slots.
  const T* z = zt + f * S * n;
  T* p = pt + f * S * n;
  for (int64_t a = threadIdx.x; a < n; a += kThreads) {
    const T mx = softmax_max(z + a, S, n);
    const T sum = softmax_sum(z + a, S, n, mx);
    for (int64_t s = 0; s < S; ++s) p[s * n + a] = fast_exp_nonpositive(z[s * n + a] - mx) / sum;
  }
}

// ---- 3. one block per unordered pair: K in place, both orientations' iterations --------------------------------
// The wrapper's GEMM for frame i writes, for all chunk clips, an (n, (T-1-i) n) block per clip: the dot products
// of frame i's keys with frames i+1..T-1 side by side. Regions for i = 0, 1, .. follow each other.
__device__ __forceinline__ void pair_of(int64_t p, int64_t T, int64_t& i, int64_t& j) {
  i = 0;
  while (p >= T - 1 - i) {
    p -= T - 1 - i;
    ++i;
  }
  j = i + 1 + p;
}

// out[a] = scaling(w[a], sum_b K[a, b] v[b]) for rows a (a warp per row); a second vector (v2 -> out2) in the same
// pass when v2 is given.
template <typename T>
__device__ __forceinline__ void row_pass(const T* K, int64_t ld, int64_t n, const T* w, const T* v, T* out,
                                         const T* v2, T* out2, int* bad) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t a = warp; a < n; a += kWarps) {
    const T* row = K + a * ld;
    T s = T(0), s2 = T(0);
    for (int64_t b = lane; b < n; b += 32) {
      s += row[b] * v[b];
      if (v2) s2 += row[b] * v2[b];
    }
    s = warp_sum(s);
    if (v2) s2 = warp_sum(s2);
    if (lane == 0) {
      bool b1 = false;
      out[a] = scaling(w[a], s, &b1);
      if (v2) out2[a] = scaling(w[a], s2, &b1);
      if (b1) *bad = 1;
    }
  }
}

// out[b] = scaling(w[b], sum_a K[a, b] u[a]) and out2[b] = scaling(w[b], sum_a K[a, b] u2[a]) (u2 null: all ones),
// a thread per column, the sum over a in order.
template <typename T>
__device__ __forceinline__ void column_pass(const T* K, int64_t ld, int64_t n, const T* w, const T* u, T* out,
                                            const T* u2, T* out2, int* bad) {
  for (int64_t b = threadIdx.x; b < n; b += kThreads) {
    T c1 = T(0), c2 = T(0);
    for (int64_t a = 0; a < n; ++a) {
      const T k = K[a * ld + b];
      c1 += k * u[a];
      c2 += u2 ? k * u2[a] : k;
    }
    bool b1 = false;
    out[b] = scaling(w[b], c1, &b1);
    out2[b] = scaling(w[b], c2, &b1);
    if (b1) *bad = 1;
  }
}

// ---- The log-domain fallback of one pair (the whole block; f1, g1, f2, g2: n shared values each) -------------------
// i -> j: f1 over the rows (frame i), g1 over the columns; j -> i: f2 over the columns (frame j), g2 over the rows.
// out[a] = eps log w[a] - eps LSE_b((v[b] - C[a, b])/eps), a warp per row.
template <typename T>
__device__ __forceinline__ void lse_rows(const T* C, int64_t ld, int64_t n, T eps, const T* w, const T* v, T* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t a = warp; a < n; a += kWarps) {
    T mx = neg_inf<T>(), s = T(0);
    for (int64_t b = lane; b < n; b += 32) lse_push(mx, s, (v[b] - C[a * ld + b]) / eps);
    warp_lse(mx, s);
    if (lane == 0) out[a] = sinkhorn::potential(eps, smtc_log(w[a]), mx, s);
  }
}
// out[b] = eps log w[b] - eps LSE_a((v[a] - C[a, b])/eps), a thread per column.
template <typename T>
__device__ __forceinline__ void lse_cols(const T* C, int64_t ld, int64_t n, T eps, const T* w, const T* v, T* out) {
  for (int64_t b = threadIdx.x; b < n; b += kThreads) {
    T mx = neg_inf<T>(), s = T(0);
    for (int64_t a = 0; a < n; ++a) lse_push(mx, s, (v[a] - C[a * ld + b]) / eps);
    out[b] = sinkhorn::potential(eps, smtc_log(w[b]), mx, s);
  }
}

template <typename T>
__device__ void log_domain_pair(T* C, int64_t ld, int64_t n, int64_t D, int64_t S, T eps, int64_t iters,
                                const T* key_i, const T* key_j, const T* inv_i, const T* inv_j, const T* mu_i,
                                const T* mu_j, const T* pt_i, const T* pt_j, T* f1, T* g1, T* f2, T* g2, T* q_i,
                                T* q_j) {
  // C = 1 - cos from the keys (K overwrote the dot products), an entry per thread.
  for (int64_t e = threadIdx.x; e < n * n; e += kThreads) {
    const int64_t a = e / n, b = e % n;
    T dot = T(0);
    for (int64_t k = 0; k < D; ++k) dot += key_i[a * D + k] * key_j[b * D + k];
    C[a * ld + b] = T(1) - cosine(dot, inv_i[a], inv_j[b]);
  }
  for (int64_t a = threadIdx.x; a < n; a += kThreads) g1[a] = g2[a] = T(0);
  __syncthreads();
  for (int64_t t = 0; t < iters; ++t) {
    lse_rows(C, ld, n, eps, mu_i, g1, f1);
    __syncthreads();
    lse_cols(C, ld, n, eps, mu_j, f1, g1);
    lse_cols(C, ld, n, eps, mu_j, g2, f2);
    __syncthreads();
    lse_rows(C, ld, n, eps, mu_i, f2, g2);
    __syncthreads();
  }
  // q_i[s, a] = sum_b plan_ij[a, b] pt_j[s, b] (a warp per row); q_j[s, b] = sum_a plan_ji[b, a] pt_i[s, a] (a
  // thread per column).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t a = warp; a < n; a += kWarps) {
    for (int64_t s = 0; s < S; ++s) {
      T acc = T(0);
      for (int64_t b = lane; b < n; b += 32) acc += exp((f1[a] + g1[b] - C[a * ld + b]) / eps) * pt_j[s * n + b];
      acc = warp_sum(acc);
      if (lane == 0) q_i[s * n + a] = acc;
    }
  }
  for (int64_t b = threadIdx.x; b < n; b += kThreads) {
    for (int64_t s = 0; s < S; ++s) {
      T acc = T(0);
      for (int64_t a = 0; a < n; ++a) acc += exp((f2[b] + g2[a] - C[a * ld + b]) / eps) * pt_i[s * n + a];
      q_j[s * n + b] = acc;
    }
  }
}

template <typename T>
__global__ void pair_scalings_kernel(T* __restrict__ dots, const T* __restrict__ keys, const T* __restrict__ inv,
                                     const T* __restrict__ mu, const T* __restrict__ pt, int64_t c0, int64_t Bc,
                                     int64_t T_, int64_t S, int64_t n, int64_t D, T eps, T scale2, int64_t iters,
                                     T iters0_factor, T* __restrict__ a1_out, T* __restrict__ a2_out,
                                     T* __restrict__ y1_out, T* __restrict__ y2_out, int* __restrict__ flag) {
  SMTC_DYNAMIC_SHARED(unsigned char, smem_raw);
  __shared__ int bad;
  T* a1 = reinterpret_cast<T*>(smem_raw);
  T* x1 = a1 + n;
  T* a2 = x1 + n;
  T* x2 = a2 + n;
  const int64_t p = blockIdx.x / Bc, c = blockIdx.x % Bc;
  int64_t i, j;
  pair_of(p, T_, i, j);
  const int64_t ld = (T_ - 1 - i) * n;
  const int64_t region = Bc * n * n * (i * (T_ - 1) - i * (i - 1) / 2);
  T* K = dots + region + c * n * ld + (j - i - 1) * n;
  const int64_t fi = (c0 + c) * T_ + i, fj = (c0 + c) * T_ + j;  // frames in (B, T)
  const T *inv_i = inv + fi * n, *inv_j = inv + fj * n, *mu_i = mu + fi * n, *mu_j = mu + fj * n;
  if (threadIdx.x == 0) bad = 0;
  __syncthreads();
  // Build: K = exp(-(1 - cos)/eps) in place, a warp per row; the row sums give a1 = mu_i / (K 1).
  {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int64_t a = warp; a < n; a += kWarps) {
      T* row = K + a * ld;
      const T ia = inv_i[a];
      T s = T(0);
      for (int64_t b = lane; b < n; b += 32) {
        const T e = kernel_entry(cosine(row[b], ia, inv_j[b]), scale2);
        row[b] = e;
        s += e;
      }
      s = warp_sum(s);
      if (lane == 0) {
        bool b1 = false;
        a1[a] = iters > 0 ? scaling(mu_i[a], s, &b1) : iters0_factor;
        if (b1) bad = 1;
      }
    }
  }
  __syncthreads();
  if (iters > 0) {
    // x1 = mu_j / (K^T a1) (i -> j), a2 = mu_j / (K^T 1) (j -> i starts at x2 = 1).
    column_pass(K, ld, n, mu_j, a1, x1, static_cast<const T*>(nullptr), a2, &bad);
    __syncthreads();
    for (int64_t t = 2; t <= iters; ++t) {
      row_pass(K, ld, n, mu_i, x1, a1, a2, x2, &bad);  // a1 = mu_i / (K x1), x2 = mu_i / (K a2)
      __syncthreads();
      column_pass(K, ld, n, mu_j, a1, x1, x2, a2, &bad);  // x1 = mu_j / (K^T a1), a2 = mu_j / (K^T x2)
      __syncthreads();
    }
    row_pass(K, ld, n, mu_i, a2, x2, static_cast<const T*>(nullptr), static_cast<T*>(nullptr), &bad);
  } else {
    // iters = 0: the plan is exp(-C/eps) itself (a1 = a2 = the cost's constant factor, x = 1).
    for (int64_t a = threadIdx.x; a < n; a += kThreads) {
      x1[a] = T(1);
      a2[a] = iters0_factor;
      x2[a] = T(1);
    }
  }
  __syncthreads();
  const int64_t pc = p * Bc + c;
  T* A1 = a1_out + pc * n;
  T* A2 = a2_out + pc * n;
  T* Y1 = y1_out + pc * S * n;
  T* Y2 = y2_out + pc * S * n;
  const T* pt_i = pt + fi * S * n;
  const T* pt_j = pt + fj * S * n;
  if (threadIdx.x == 0) flag[pc] = bad;
  if (bad) {  // the same in every thread (shared, read after the barrier): the whole block takes the fallback
    log_domain_pair(K, ld, n, D, S, eps, iters, keys + fi * n * D, keys + fj * n * D, inv_i, inv_j, mu_i, mu_j, pt_i,
                    pt_j, a1, x1, a2, x2, Y1, Y2);
    return;
  }
  for (int64_t a = threadIdx.x; a < n; a += kThreads) {
    A1[a] = a1[a];
    A2[a] = a2[a];
  }
  for (int64_t e = threadIdx.x; e < S * n; e += kThreads) {
    const int64_t b = e % n;
    Y1[e] = x1[b] * pt_j[e];
    Y2[e] = x2[b] * pt_i[e];
  }
}

// ---- 5. targets and the loss, a thread per token of one frame -----------------------------------------------------
// targets_t[s, a] = sum over the pairs p = (i, j) in order: a1_p[a] z1_p[s, a] if i = t, a2_p[a] z2_p[s, a] if j = t
// (y1_p, y2_p for a pair the log-domain fallback solved: flag_p = 1).
template <typename T>
__global__ void combine_kernel(const T* __restrict__ zs, const T* __restrict__ a1, const T* __restrict__ a2,
                               const T* __restrict__ z1, const T* __restrict__ z2, const T* __restrict__ y1,
                               const T* __restrict__ y2, const int* __restrict__ flag, int64_t c0, int64_t Bc,
                               int64_t T_, int64_t S, int64_t n, T* __restrict__ targets, T* __restrict__ loss_part) {
  __shared__ T red[kWarps];
  const int64_t c = blockIdx.x / T_, t = blockIdx.x % T_;
  const int64_t f = (c0 + c) * T_ + t;
  const T* z = zs + f * S * n;
  T* tg = targets + f * S * n;
  T part = T(0);
  for (int64_t a = threadIdx.x; a < n; a += kThreads) {
    const T mx = softmax_max(z + a, S, n);
    const T sum = softmax_sum(z + a, S, n, mx);
    for (int64_t s = 0; s < S; ++s) {
      // The pairs holding frame t, in pair order: (u, t) for u < t (t is their j), then (t, u) for u > t.
      T q = T(0);
      for (int64_t u = 0; u < T_; ++u) {
        if (u == t) continue;
        const bool first = t < u;  // t is frame i of the pair
        const int64_t i = first ? t : u, j = first ? u : t;
        const int64_t pc = (i * (T_ - 1) - i * (i - 1) / 2 + (j - i - 1)) * Bc + c;
        const int64_t e = (pc * S + s) * n + a;
        if (flag[pc]) {
          q += first ? y1[e] : y2[e];
        } else {
          q += first ? a1[pc * n + a] * z1[e] : a2[pc * n + a] * z2[e];
        }
      }
      tg[s * n + a] = q;
      const T ps = fast_exp_nonpositive(z[s * n + a] - mx) / sum;
      part += smtc_log(ps + T(kProbEps)) * q;
    }
  }
  const T total = block_sum(part, red);
  if (threadIdx.x == 0) loss_part[f] = total;
}

// ---- backward: dL/dz_s = coef p_s (w_s - sum_r w_r p_r), a thread per token ---------------------------------------
template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad_loss, const T* __restrict__ zs, const T* __restrict__ tg,
                                int64_t F, int64_t S, int64_t n, T count, T* __restrict__ grad) {
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (tok >= F * n) return;
  const int64_t f = tok / n, a = tok % n;
  const T coef = -grad_loss[0] / count;
  const T* z = zs + f * S * n + a;
  const T* q = tg + f * S * n + a;
  T* g = grad + f * S * n + a;
  const T mx = softmax_max(z, S, n);
  const T sum = softmax_sum(z, S, n, mx);
  T wp = T(0);
  for (int64_t s = 0; s < S; ++s) {
    const T p = fast_exp_nonpositive(z[s * n] - mx) / sum;
    wp += target_weight(q[s * n], p) * p;
  }
  for (int64_t s = 0; s < S; ++s) {
    const T p = fast_exp_nonpositive(z[s * n] - mx) / sum;
    g[s * n] = logit_grad(coef, p, target_weight(q[s * n], p), wp);
  }
}

constexpr int64_t kMaxBlocks = 2147483647;  // gridDim.x limit

void check_blocks(int64_t blocks, const char* what) {
  if (blocks > kMaxBlocks) throw std::runtime_error(std::string(what) + ": too many blocks for one launch");
}

}  // namespace

void launch_frame_stats(DType dtype, const void* keys, const void* teacher_logits, int64_t F, int64_t n, int64_t D,
                        int64_t S, bool norm_marginals, void* inv, void* mu, void* pt, cudaStream_t stream) {
  if (F == 0 || n == 0) return;
  check_blocks(F, "smtc_fast frame_stats_kernel");
  SMTC_DISPATCH_FLOAT_DOUBLE(dtype, "smtc_fast::transport_loss (CUDA)", [&] {
    SMTC_LAUNCH(static_cast<unsigned>(F), kThreads, 0, stream, frame_stats_kernel<scalar_t>)(
        static_cast<const scalar_t*>(keys), static_cast<const scalar_t*>(teacher_logits), n, D, S, norm_marginals,
        static_cast<scalar_t*>(inv), static_cast<scalar_t*>(mu), static_cast<scalar_t*>(pt));
    check_launch("smtc_fast frame_stats_kernel");
  });
}

void launch_pair_scalings(DType dtype, void* dots, const void* keys, const void* inv, const void* mu, const void* pt,
                          int64_t c0, int64_t Bc, int64_t T, int64_t S, int64_t n, int64_t D, double eps,
                          int64_t iters, double iters0_factor, void* a1, void* a2, void* y1, void* y2, void* flag,
                          cudaStream_t stream) {
  const int64_t P = T * (T - 1) / 2;
  if (Bc == 0 || n == 0) return;
  check_blocks(P * Bc, "smtc_fast pair_scalings_kernel");
  SMTC_DISPATCH_FLOAT_DOUBLE(dtype, "smtc_fast::transport_loss (CUDA)", [&] {
    const std::size_t smem = 4 * static_cast<std::size_t>(n) * sizeof(scalar_t);
    // Above the default 48 KB (n > 1536 in float32) the kernel opts in, as a GPU requires; past 227 KB it cannot.
    if (smem > 227 * 1024)
      throw std::runtime_error("smtc_fast::transport_loss (CUDA): n = " + std::to_string(n) +
                               " tokens need more shared memory than a block has");
    if (smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(pair_scalings_kernel<scalar_t>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess)
        throw std::runtime_error(std::string("smtc_fast pair_scalings_kernel: ") + cudaGetErrorString(err));
    }
    const scalar_t scale2 = static_cast<scalar_t>(1.4426950408889634 / eps);  // exp(x) = 2^(x log2(e))
    SMTC_LAUNCH(static_cast<unsigned>(P * Bc), kThreads, smem, stream, pair_scalings_kernel<scalar_t>)(
        static_cast<scalar_t*>(dots), static_cast<const scalar_t*>(keys), static_cast<const scalar_t*>(inv),
        static_cast<const scalar_t*>(mu), static_cast<const scalar_t*>(pt), c0, Bc, T, S, n, D,
        static_cast<scalar_t>(eps), scale2, iters, static_cast<scalar_t>(iters0_factor), static_cast<scalar_t*>(a1),
        static_cast<scalar_t*>(a2), static_cast<scalar_t*>(y1), static_cast<scalar_t*>(y2), static_cast<int*>(flag));
    check_launch("smtc_fast pair_scalings_kernel");
  });
}

void launch_combine(DType dtype, const void* student_logits, const void* a1, const void* a2, const void* z1,
                    const void* z2, const void* y1, const void* y2, const void* flag, int64_t c0, int64_t Bc,
                    int64_t T, int64_t S, int64_t n, void* targets, void* loss_part, cudaStream_t stream) {
  if (Bc == 0) return;
  check_blocks(Bc * T, "smtc_fast combine_kernel");
  SMTC_DISPATCH_FLOAT_DOUBLE(dtype, "smtc_fast::transport_loss (CUDA)", [&] {
    SMTC_LAUNCH(static_cast<unsigned>(Bc * T), kThreads, 0, stream, combine_kernel<scalar_t>)(
        static_cast<const scalar_t*>(student_logits), static_cast<const scalar_t*>(a1),
        static_cast<const scalar_t*>(a2), static_cast<const scalar_t*>(z1), static_cast<const scalar_t*>(z2),
        static_cast<const scalar_t*>(y1), static_cast<const scalar_t*>(y2), static_cast<const int*>(flag), c0, Bc, T,
        S, n, static_cast<scalar_t*>(targets), static_cast<scalar_t*>(loss_part));
    check_launch("smtc_fast combine_kernel");
  });
}

void launch_backward(DType dtype, const void* grad_loss, const void* student_logits, const void* targets,
                     int64_t F, int64_t S, int64_t n, double count, void* grad, cudaStream_t stream) {
  if (F * n == 0 || S == 0) return;
  const int64_t blocks = (F * n + kThreads - 1) / kThreads;
  check_blocks(blocks, "smtc_fast transport_loss backward_kernel");
  SMTC_DISPATCH_FLOAT_DOUBLE(dtype, "smtc_fast::_transport_loss_backward (CUDA)", [&] {
    SMTC_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, backward_kernel<scalar_t>)(
        static_cast<const scalar_t*>(grad_loss), static_cast<const scalar_t*>(student_logits),
        static_cast<const scalar_t*>(targets), F, S, n, static_cast<scalar_t>(count), static_cast<scalar_t*>(grad));
    check_launch("smtc_fast transport_loss backward_kernel");
  });
}

}  // namespace transport_loss
}  // namespace smtc
