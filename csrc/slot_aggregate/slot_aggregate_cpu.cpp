// C++ CPU kernel of smtc_fast::slot_aggregate and its backward. Per (frame, group) tile: the attention (softmax
// over the slots of a group, +eps, mask, renormalisation over tokens) in one fused pass that stays in L1, then the
// contractions with the values over the group's masked tokens only (stage 2 of SMTC: ~38% of them), with
// register-blocked microkernels on packed token lists. Stage 1 (no mask) is the same code with every token listed.
// Dense BLAS over all tokens was measured against this: on SMTC's shapes the microkernels match MKL's bmm even at
// mask density 1 (and beat its transposed bmm for d_values), so there is no dense switch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/alloc.h"
#include "common/cpu.h"
#include "common/threads.h"
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
      e[n] = fast_exp_nonpositive(l[n] - colmax[n]);
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


// ---------------------------------------------------------------------------------------------------------------
// Packed contractions over a token list (the stage-2 GEMMs restricted to the tokens of a group's mask).
//
// A group's attention is exactly zero on the tokens outside its semantic mask (a = (p + eps) * 0), and so is its
// gradient (gp = ... * mask), so updates_g = attn_g @ values, its d_attn and its d_values only need the n_g tokens
// with mask != 0 (SMTC: ~38% of them). Each contraction below runs over such a token list idx[0..K) with a
// register-blocked microkernel: up to four rows of the group share every values-row load, the D axis is
// vectorised in 64-byte GCC vectors (one zmm on AVX-512, two ymm on AVX2: the clones of SMTC_CPU_CLONES), and
// the accumulators stay in registers for the whole token loop (on AVX-512; the blocking is sized for its 32
// registers, the AVX2 clone is correct but spills). -ffp-contract=fast (this region only) turns
// `acc += w * v` into FMAs; the attention math above stays as it was, so the eps placement is unchanged.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
// The 64-byte vector helpers below are always inlined into the SMTC_CPU_CLONES functions, so the ABI of a
// 64-byte vector passed by value (which differs with and without AVX-512) never matters.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// How far ahead (in tokens) the gathers prefetch their values rows; mask_tokens pads idx by this much.
constexpr int kPrefetchTokens = 4;

template <typename T> struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int L = 64 / sizeof(T);
};
template <typename T> SMTC_ALWAYS_INLINE typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T> SMTC_ALWAYS_INLINE void vstore(T* p, const typename Vec<T>::type& v) {
  std::memcpy(p, &v, sizeof(v));
}
// The values rows are T, or bf16 (raw bits, with float32 T: the values of a bf16 forward), widened exactly to
// float32 on load, so that every product and sum is the float32 kernel's on values.float(), bit for bit, from
// half the bytes (the contractions stream each frame's values from memory: SMTC's stage 2 reads them 3 x 2 times
// per forward).
typedef uint32_t Word16 __attribute__((vector_size(64)));  // 16 float32 bit patterns (32 bf16 values as pairs)
SMTC_ALWAYS_INLINE Vec<float>::type vload_bf16(const uint16_t* p) {
  typedef uint16_t Half16 __attribute__((vector_size(32)));
  Half16 h;
  std::memcpy(&h, p, sizeof(h));
  const Word16 w = __builtin_convertvector(h, Word16) << 16;  // bf16 bits are float32's top 16 bits
  Vec<float>::type f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}
// (selected at the call sites with if constexpr: a template wrapper around vload draws GCC's -Wpsabi note)

// 32 bf16 values (64 bytes) widened in place: `even` gets columns 0, 2, .., 30 and `odd` columns 1, 3, .., 31 as
// float32. In each 32-bit lane the even column's bits are the low half and the odd column's the high half, so one
// shift and one mask widen them, with no cross-lane shuffle: vload_bf16's zero-extension runs on the shuffle port,
// which the FMAs share, and cost the bf16 contraction ~40% of its speed against float32 values.
SMTC_ALWAYS_INLINE void vload_bf16_pair(const uint16_t* p, Vec<float>::type& even, Vec<float>::type& odd) {
  Word16 w;
  std::memcpy(&w, p, sizeof(w));
  const Word16 e = w << 16, o = w & 0xFFFF0000u;
  std::memcpy(&even, &e, sizeof(even));
  std::memcpy(&odd, &o, sizeof(odd));
}

template <typename T> SMTC_ALWAYS_INLINE T vsum(const typename Vec<T>::type& v) {
  T a[Vec<T>::L];
  std::memcpy(a, &v, sizeof(a));
#pragma GCC unroll 8
  for (int w = Vec<T>::L / 2; w > 0; w /= 2) {
#pragma GCC unroll 16
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  }
  return a[0];
}

// out[r, 0:C*L] = sum_k Wk[k, r] * V[idx[k], 0:C*L] for r < R: Wk (K x R) holds W[r, idx[k]] packed token-major
// (one token's R weights share a cache line); V and out rows are D apart.
template <typename T, int R, int C, typename TV>
SMTC_ALWAYS_INLINE void gather_gemm_block(const T* Wk, const int32_t* idx, int64_t K, const TV* V, int64_t D,
                                          const T* res, T* out) {
  using V_t = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  // bf16 values in column pairs (vload_bf16_pair) where the block spans whole 32-column pieces
  constexpr bool kPairs = !std::is_same_v<TV, T> && C % 2 == 0;
  V_t acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = V_t{};
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = idx[k];
    const TV* v = V + n * D;
    // idx is padded past K with valid tokens (mask_tokens), so this needs no bound check
    const TV* ahead = V + int64_t(idx[k + kPrefetchTokens]) * D;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) __builtin_prefetch(ahead + c * L, 0, 3);
    V_t vv[C];
    if constexpr (std::is_same_v<TV, T>) {
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) vv[c] = vload(v + c * L);
    } else if constexpr (kPairs) {  // vv[2j], vv[2j + 1]: the even and odd columns of columns [32 j, 32 j + 32)
#pragma GCC unroll 4
      for (int c = 0; c < C; c += 2) vload_bf16_pair(v + c * L, vv[c], vv[c + 1]);
    } else {
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) vv[c] = vload_bf16(v + c * L);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const T w = Wk[k * R + r];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) acc[r][c] += w * vv[c];
    }
  }
  if constexpr (kPairs) {  // back to column order: each column's sum is the same, only its lane differs
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < C; c += 2) {
        const V_t e = acc[r][c], o = acc[r][c + 1];
        acc[r][c] = __builtin_shufflevector(e, o, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        acc[r][c + 1] = __builtin_shufflevector(e, o, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      }
  }
  // res (the rows' residual, or null): out = res + acc, the one float addition of `residual + attn @ values`
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) vstore(out + r * D + c * L, res ? vload(res + r * D + c * L) + acc[r][c] : acc[r][c]);
}

// The last width < L columns of the block above.
template <typename T, int R, typename TV>
SMTC_ALWAYS_INLINE void gather_gemm_tail(const T* Wk, const int32_t* idx, int64_t K, const TV* V, int64_t D,
                                         int64_t width, const T* res, T* out) {
  T acc[R][Vec<T>::L] = {};
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = idx[k];
    for (int r = 0; r < R; ++r) {
      const T w = Wk[k * R + r];
      for (int64_t d = 0; d < width; ++d) acc[r][d] = std::fma(w, stored_value(V[n * D + d]), acc[r][d]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t d = 0; d < width; ++d) out[r * D + d] = res ? res[r * D + d] + acc[r][d] : acc[r][d];
}

template <typename T, int R, typename TV>
SMTC_ALWAYS_INLINE void gather_gemm_rows(const T* W, int64_t ldw, const int32_t* idx, int64_t K, const TV* V,
                                         int64_t D, const T* res, T* out, T* Wk) {
  constexpr int L = Vec<T>::L;
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r) Wk[k * R + r] = W[r * ldw + idx[k]];
  int64_t d = 0;
  const auto at = [&](int64_t d) { return res ? res + d : nullptr; };
  for (; d + 4 * L <= D; d += 4 * L) gather_gemm_block<T, R, 4>(Wk, idx, K, V + d, D, at(d), out + d);
  for (; d + L <= D; d += L) gather_gemm_block<T, R, 1>(Wk, idx, K, V + d, D, at(d), out + d);
  if (d < D) gather_gemm_tail<T, R>(Wk, idx, K, V + d, D, D - d, at(d), out + d);
}

// updates (P x D) = res + W[:, idx] (P x K) @ V[idx, :] (K x D); W is one group's attention tile (P x N), res the
// residual rows (P x D) or null. Wk: scratch of 4 * N entries.
template <typename T, typename TV>
SMTC_ALWAYS_INLINE void packed_updates_impl(const T* W, int64_t P, int64_t N, const int32_t* idx, int64_t K,
                                            const TV* V, int64_t D, const T* res, T* out, T* Wk) {
  for (int64_t r = 0; r < P; r += 4) {
    const T* w = W + r * N;
    const T* rr = res ? res + r * D : nullptr;
    T* o = out + r * D;
    switch (std::min<int64_t>(4, P - r)) {
      case 4: gather_gemm_rows<T, 4>(w, N, idx, K, V, D, rr, o, Wk); break;
      case 3: gather_gemm_rows<T, 3>(w, N, idx, K, V, D, rr, o, Wk); break;
      case 2: gather_gemm_rows<T, 2>(w, N, idx, K, V, D, rr, o, Wk); break;
      default: gather_gemm_rows<T, 1>(w, N, idx, K, V, D, rr, o, Wk); break;
    }
  }
}

// GW[r, idx[k]] += <GU[r, :], V[idx[k], :]> for r < R and KB tokens idx[0..KB): the path of d_updates into d_attn.
template <typename T, int R, int KB, typename TV>
SMTC_ALWAYS_INLINE void gather_dot_block(const T* GU, const int32_t* idx, const TV* V, int64_t D, T* GW,
                                         int64_t ldg) {
  static_assert(KB <= kPrefetchTokens, "the next block's rows are prefetched from idx[KB..2 KB)");
  using V_t = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  V_t acc[R][KB];
  const TV* v[KB];
#pragma GCC unroll 4
  for (int t = 0; t < KB; ++t) v[t] = V + int64_t(idx[t]) * D;
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < KB; ++t) acc[r][t] = V_t{};
  const TV* ahead[KB];
#pragma GCC unroll 4
  for (int t = 0; t < KB; ++t) ahead[t] = V + int64_t(idx[t + KB]) * D;
  int64_t d = 0;
  for (; d + L <= D; d += L) {
#pragma GCC unroll 4
    for (int t = 0; t < KB; ++t) __builtin_prefetch(ahead[t] + d, 0, 3);
    V_t g[R], x[KB];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) g[r] = vload(GU + r * D + d);
#pragma GCC unroll 4
    for (int t = 0; t < KB; ++t) {
      if constexpr (std::is_same_v<TV, T>) {
        x[t] = vload(v[t] + d);
      } else {
        x[t] = vload_bf16(v[t] + d);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int t = 0; t < KB; ++t) acc[r][t] += g[r] * x[t];
  }
  T sums[R][KB];
  if constexpr (std::is_same_v<T, float> && R == 4 && KB == 4) {
    // The 16 horizontal sums at once: a transpose-and-add tree, 15 vector adds instead of 16 separate reductions.
    V_t a[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a[i] = acc[i / 4][i % 4];
    V_t b[8], c[4], dd[2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
      b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
             __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                     31);
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)
      c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
             __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                     31);
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i)
      dd[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28,
                                      29) +
              __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                      31);
    const V_t all = __builtin_shufflevector(dd[0], dd[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
                    __builtin_shufflevector(dd[0], dd[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) sums[i / 4][i % 4] = all[i];  // lane r*4+t = sum of acc[r][t]
  } else {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int t = 0; t < KB; ++t) sums[r][t] = vsum<T>(acc[r][t]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int t = 0; t < KB; ++t) {
      T s = sums[r][t];
      // explicit FMAs: the same rounding whichever way GCC vectorises this tail for float or bf16 values
      for (int64_t e = d; e < D; ++e) s = std::fma(GU[r * D + e], stored_value(v[t][e]), s);
      GW[r * ldg + idx[t]] += s;
    }
}

template <typename T, int R, typename TV>
SMTC_ALWAYS_INLINE void gather_dot_rows(const T* GU, const int32_t* idx, int64_t K, const TV* V, int64_t D, T* GW,
                                        int64_t ldg) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) gather_dot_block<T, R, 4>(GU, idx + k, V, D, GW, ldg);
  for (; k < K; ++k) gather_dot_block<T, R, 1>(GU, idx + k, V, D, GW, ldg);
}

// GW[:, idx] (P x K) += GU (P x D) @ V[idx, :]^T (D x K).
template <typename T, typename TV>
SMTC_ALWAYS_INLINE void packed_grad_attn_impl(const T* GU, int64_t P, const int32_t* idx, int64_t K, const TV* V,
                                              int64_t D, T* GW, int64_t N) {
  for (int64_t r = 0; r < P; r += 4) {
    const T* g = GU + r * D;
    T* o = GW + r * N;
    switch (std::min<int64_t>(4, P - r)) {
      case 4: gather_dot_rows<T, 4>(g, idx, K, V, D, o, N); break;
      case 3: gather_dot_rows<T, 3>(g, idx, K, V, D, o, N); break;
      case 2: gather_dot_rows<T, 2>(g, idx, K, V, D, o, N); break;
      default: gather_dot_rows<T, 1>(g, idx, K, V, D, o, N); break;
    }
  }
}

// GV[idx[k], 0:C*L] += sum_{r<R} W[r, idx[k]] * GU[r, 0:C*L]: the rows of d_values, GU held in registers.
template <typename T, int R, int C>
SMTC_ALWAYS_INLINE void scatter_gemm_block(const T* W, int64_t ldw, const int32_t* idx, int64_t K, const T* GU,
                                           int64_t D, T* GV) {
  using V_t = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  V_t g[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) g[r][c] = vload(GU + r * D + c * L);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t n = idx[k];
    T* o = GV + n * D;
    V_t a[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) a[c] = vload(o + c * L);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const T w = W[r * ldw + n];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) a[c] += w * g[r][c];
    }
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) vstore(o + c * L, a[c]);
  }
}

template <typename T, int R>
SMTC_ALWAYS_INLINE void scatter_gemm_rows(const T* W, int64_t ldw, const int32_t* idx, int64_t K, const T* GU,
                                          int64_t D, T* GV) {
  constexpr int L = Vec<T>::L;
  int64_t d = 0;
  for (; d + 4 * L <= D; d += 4 * L) scatter_gemm_block<T, R, 4>(W, ldw, idx, K, GU + d, D, GV + d);
  for (; d + L <= D; d += L) scatter_gemm_block<T, R, 1>(W, ldw, idx, K, GU + d, D, GV + d);
  if (d < D) {
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = idx[k];
      for (int r = 0; r < R; ++r) {
        const T w = W[r * ldw + n];
        for (int64_t e = d; e < D; ++e) GV[n * D + e] += w * GU[r * D + e];
      }
    }
  }
}

// GV[idx, :] (K x D) += W[:, idx]^T (K x P) @ GU (P x D).
template <typename T>
SMTC_ALWAYS_INLINE void packed_grad_values_impl(const T* W, int64_t P, int64_t N, const int32_t* idx, int64_t K,
                                                const T* GU, int64_t D, T* GV) {
  for (int64_t r = 0; r < P; r += 4) {
    const T* w = W + r * N;
    const T* g = GU + r * D;
    switch (std::min<int64_t>(4, P - r)) {
      case 4: scatter_gemm_rows<T, 4>(w, N, idx, K, g, D, GV); break;
      case 3: scatter_gemm_rows<T, 3>(w, N, idx, K, g, D, GV); break;
      case 2: scatter_gemm_rows<T, 2>(w, N, idx, K, g, D, GV); break;
      default: scatter_gemm_rows<T, 1>(w, N, idx, K, g, D, GV); break;
    }
  }
}

// (T, TV): the compute type and the values' storage type (bf16 values as uint16_t bits, with float T)
#define SMTC_SLOT_VALUES_INSTANTIATE(T, TV)                                                                     \
  SMTC_CPU_CLONES void packed_updates(const T* W, int64_t P, int64_t N, const int32_t* idx, int64_t K,         \
                                      const TV* V, int64_t D, const T* res, T* out, T* Wk) {                    \
    packed_updates_impl<T, TV>(W, P, N, idx, K, V, D, res, out, Wk);                                             \
  }                                                                                                             \
  SMTC_CPU_CLONES void packed_grad_attn(const T* GU, int64_t P, const int32_t* idx, int64_t K, const TV* V,    \
                                        int64_t D, T* GW, int64_t N) {                                          \
    packed_grad_attn_impl<T, TV>(GU, P, idx, K, V, D, GW, N);                                                    \
  }

SMTC_SLOT_VALUES_INSTANTIATE(float, float)
SMTC_SLOT_VALUES_INSTANTIATE(double, double)
SMTC_SLOT_VALUES_INSTANTIATE(float, uint16_t)

#define SMTC_SLOT_PACKED_INSTANTIATE(T)                                                                         \
  SMTC_CPU_CLONES void packed_grad_values(const T* W, int64_t P, int64_t N, const int32_t* idx, int64_t K,     \
                                          const T* GU, int64_t D, T* GV) {                                      \
    packed_grad_values_impl<T>(W, P, N, idx, K, GU, D, GV);                                                      \
  }

SMTC_SLOT_PACKED_INSTANTIATE(float)
SMTC_SLOT_PACKED_INSTANTIATE(double)

#pragma GCC diagnostic pop
#pragma GCC pop_options

// Part `part` of `parts` of a frame's values (bytes long), prefetched into L2 while the current frame computes:
// the packed contractions read a frame's values rows in mask order, a pattern the hardware prefetcher cannot
// follow, so without this each frame's first pass over its values waits on DRAM row by row.
SMTC_ALWAYS_INLINE void prefetch_part(const void* base, int64_t bytes, int64_t part, int64_t parts) {
  const char* p = static_cast<const char*>(base);
  const int64_t lines = (bytes + 63) / 64;
  for (int64_t l = lines * part / parts; l < lines * (part + 1) / parts; ++l) __builtin_prefetch(p + l * 64, 0, 2);
}

// The tokens of a group's mask: idx[0..K) = {n : mask[n] != 0}, or all N tokens without a mask. Returns K.
// idx must hold N + kPrefetchTokens entries: the ones past K are set to token 0, a valid row to prefetch.
template <typename T> int64_t mask_tokens(const T* mask, int64_t N, int32_t* idx) {
  int64_t K = 0;
  for (int64_t n = 0; n < N; ++n) {
    idx[K] = static_cast<int32_t>(n);
    K += (mask == nullptr || mask[n] != T(0)) ? 1 : 0;
  }
  std::fill(idx + K, idx + N + kPrefetchTokens, 0);
  return K;
}

// float32 -> bf16 bits, rounded to nearest even as at::BFloat16 (and torch's .to(torch.bfloat16)) round; NaN stays
// a NaN. The bf16 values' gradient is accumulated in float32 per frame and rounded once, here, as autograd rounds
// the float32 gradient of values.float() when it reaches bf16 values.
SMTC_CPU_CLONES void round_to_bf16(const float* x, int64_t n, uint16_t* out) {
  SMTC_SIMD
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w;
    std::memcpy(&w, x + i, sizeof(w));
    const uint16_t rounded = static_cast<uint16_t>((w + 0x7FFFu + ((w >> 16) & 1u)) >> 16);
    out[i] = x[i] != x[i] ? uint16_t(0x7FC0) : rounded;
  }
}

// Frames per task of the dynamic schedule (for_chunks): a thread's consecutive frames within a chunk let it
// prefetch the next frame's values while it computes the current one.
constexpr int64_t kFramesPerTask = 8;

std::tuple<at::Tensor, at::Tensor> slot_aggregate_cpu(const at::Tensor& logits_in, const at::Tensor& values_in,
                                                      const c10::optional<at::Tensor>& mask_in, double eps,
                                                      const c10::optional<at::Tensor>& residual_in) {
  check_slot_aggregate_args(logits_in, values_in, mask_in, eps);
  check_slot_aggregate_residual(logits_in, values_in, residual_in);
  const auto logits = logits_in.contiguous();
  const auto values = values_in.contiguous();
  const int64_t B = logits.size(0), G = logits.size(1), P = logits.size(2), N = logits.size(3);
  const int64_t D = values.size(2);
  at::Tensor mask, residual;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  if (residual_in.has_value()) residual = residual_in->contiguous();
  auto attn = empty_output(logits.sizes(), logits.options());
  auto updates = empty_output({B, G, P, D}, logits.options());
  if (B * G * P == 0) return {updates, attn};
  // The kernel for compute type scalar_t (logits') and values stored as *Vp (scalar_t, or bf16 bits with float).
  auto run = [&](auto compute_type, const auto* Vp) {
    using scalar_t = decltype(compute_type);
    const scalar_t* Lp = logits.data_ptr<scalar_t>();
    const scalar_t* Mp = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    scalar_t* Wp = attn.data_ptr<scalar_t>();
    scalar_t* Up = updates.data_ptr<scalar_t>();
    const scalar_t* Rp = residual.defined() ? residual.data_ptr<scalar_t>() : nullptr;
    const scalar_t e = static_cast<scalar_t>(eps);
    // One (frame, group) tile per step: the attention (P x N), then updates_g = attn_g[:, idx] @ values[idx] over
    // the group's masked tokens (all N without a mask) while the tile is still in L1. A thread walks the groups of
    // a frame, so the frame's values stay in L2, and prefetches the next frame's meanwhile.
    for_chunks(B, kFramesPerTask, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> scratch(2 * N + 4 * N);  // column max, 1 / column sum, packed weights (4 x N)
      std::vector<int32_t> idx(N + kPrefetchTokens);
      for (int64_t bg = b0 * G; bg < b1 * G; ++bg) {
        const int64_t b = bg / G;
        if (b + 1 < b1) prefetch_part(Vp + (b + 1) * N * D, sizeof(*Vp) * N * D, bg % G, G);
        const scalar_t* M = Mp ? Mp + bg * N : nullptr;
        scalar_t* W = Wp + bg * P * N;
        forward_tile(Lp + bg * P * N, M, e, P, N, W, scratch.data(), scratch.data() + N);
        const int64_t K = mask_tokens(M, N, idx.data());
        packed_updates(W, P, N, idx.data(), K, Vp + b * N * D, D, Rp ? Rp + bg * P * D : nullptr, Up + bg * P * D,
                       scratch.data() + 2 * N);
      }
    });
  };
  if (values.scalar_type() == at::kBFloat16) {  // then logits are float32 (checked)
    run(float{}, reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()));
  } else {
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "smtc_fast::slot_aggregate (CPU)",
                               [&] { run(scalar_t{}, values.data_ptr<scalar_t>()); });
  }
  return {updates, attn};
}

std::tuple<at::Tensor, at::Tensor> slot_aggregate_backward_cpu(const at::Tensor& grad_updates_in,
                                                               const c10::optional<at::Tensor>& grad_attn_in,
                                                               const at::Tensor& logits_in, const at::Tensor& values_in,
                                                               const c10::optional<at::Tensor>& mask_in,
                                                               const at::Tensor& attn_in, double eps) {
  check_slot_aggregate_backward_args(grad_updates_in, grad_attn_in, logits_in, values_in, mask_in, attn_in, eps);
  const auto logits = logits_in.contiguous();
  const auto attn = attn_in.contiguous();
  const auto values = values_in.contiguous();
  const auto grad_updates = grad_updates_in.contiguous();
  const int64_t B = logits.size(0), G = logits.size(1), P = logits.size(2), N = logits.size(3);
  const int64_t D = values.size(2);
  at::Tensor mask, grad_attn;
  if (mask_in.has_value()) mask = mask_in->contiguous();
  if (grad_attn_in.has_value()) grad_attn = grad_attn_in->contiguous();
  auto grad_logits = empty_output(logits.sizes(), logits.options());
  auto grad_values = empty_output({B, N, D}, values.options());  // values' dtype: bf16 values get a bf16 gradient
  if (grad_values.numel() > 0 && G * P == 0) grad_values.zero_();
  if (B * G * P == 0) return {grad_logits, grad_values};
  // The kernel for compute type scalar_t (logits') and values (and their gradient) stored as *Vp: scalar_t, or
  // bf16 bits with float.
  auto run = [&](auto compute_type, const auto* Vp, auto* GVp) {
    using scalar_t = decltype(compute_type);
    const scalar_t* Lp = logits.data_ptr<scalar_t>();
    const scalar_t* Mp = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    const scalar_t* Wp = attn.data_ptr<scalar_t>();
    const scalar_t* GUp = grad_updates.data_ptr<scalar_t>();
    const scalar_t* GAp = grad_attn.defined() ? grad_attn.data_ptr<scalar_t>() : nullptr;
    scalar_t* GWp = grad_logits.data_ptr<scalar_t>();
    const scalar_t e = static_cast<scalar_t>(eps);
    // One frame per step: all its groups add into the frame's d_values rows. Per group, over its masked tokens only
    // (the masked attention and its gradient are exactly zero elsewhere):
    //   d_attn[:, idx] = grad_attn + d_updates_g @ values[idx]^T, then the attention backward on the tile,
    //   d_values[idx] += attn_g[:, idx]^T @ d_updates_g.
    // bf16 values: the frame's d_values rows are summed in a float32 scratch and rounded to bf16 once at its end.
    for_chunks(B, kFramesPerTask, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> scratch(3 * N + P * N);  // column max, 1 / column sum, column dot, softmax (P x N)
      std::vector<int32_t> idx(N + kPrefetchTokens);
      constexpr bool widened = !std::is_same_v<std::remove_pointer_t<decltype(GVp)>, scalar_t>;
      aligned_vector<scalar_t> gv_frame(widened ? N * D : 0);
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* GV;
        if constexpr (widened) {
          GV = gv_frame.data();
        } else {
          GV = GVp + b * N * D;
        }
        std::fill(GV, GV + N * D, scalar_t(0));
        for (int64_t g = 0; g < G; ++g) {
          const int64_t bg = b * G + g;
          if (b + 1 < b1) prefetch_part(Vp + (b + 1) * N * D, sizeof(*Vp) * N * D, g, G);
          const scalar_t* M = Mp ? Mp + bg * N : nullptr;
          const scalar_t* W = Wp + bg * P * N;
          const scalar_t* GU = GUp + bg * P * D;
          scalar_t* GW = GWp + bg * P * N;
          if (GAp) {
            std::memcpy(GW, GAp + bg * P * N, sizeof(scalar_t) * P * N);
          } else {  // no gradient reaches attn directly (SMTC): only the path through the updates
            std::fill(GW, GW + P * N, scalar_t(0));
          }
          const int64_t K = mask_tokens(M, N, idx.data());
          packed_grad_attn(GU, P, idx.data(), K, Vp + b * N * D, D, GW, N);
          backward_tile(Lp + bg * P * N, M, W, e, P, N, GW, scratch.data(), scratch.data() + N,
                        scratch.data() + 2 * N, scratch.data() + 3 * N);
          packed_grad_values(W, P, N, idx.data(), K, GU, D, GV);
        }
        if constexpr (widened) round_to_bf16(GV, N * D, GVp + b * N * D);
      }
    });
  };
  if (values.scalar_type() == at::kBFloat16) {  // then logits are float32 (checked)
    run(float{}, reinterpret_cast<const uint16_t*>(values.data_ptr<at::BFloat16>()),
        reinterpret_cast<uint16_t*>(grad_values.data_ptr<at::BFloat16>()));
  } else {
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "smtc_fast::_slot_aggregate_backward (CPU)",
                               [&] { run(scalar_t{}, values.data_ptr<scalar_t>(), grad_values.data_ptr<scalar_t>()); });
  }
  return {grad_logits, grad_values};
}

}  // namespace

TORCH_LIBRARY_IMPL(smtc_fast, CPU, m) {
  m.impl("slot_aggregate", &slot_aggregate_cpu);
  m.impl("_slot_aggregate_backward", &slot_aggregate_backward_cpu);
}

}  // namespace slot_aggregate
}  // namespace smtc
