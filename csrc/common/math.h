// Scalar math shared by the C++ CPU kernels and the CUDA kernels (house style rule 3: one kernel's math,
// two backends). Everything here is __host__ __device__ inline and free of torch headers so that .cu files
// can include it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SMTC_HD __host__ __device__ __forceinline__
#else
#define SMTC_HD inline
#endif

// SMTC_DEVICE_MATH: this translation unit computes as the GPU does: nvcc's device pass, or a .cu file compiled for
// the CPU execution tier (common/cuda_emu.h emulates __expf, exp2f and friends), so the tier runs the device
// branch of every function below, not the host's polynomials.
#if defined(__CUDA_ARCH__) || defined(SMTC_CUDA_EMU)
#define SMTC_DEVICE_MATH 1
#endif

namespace smtc {

// Accumulation type: float for float/half/bf16 inputs, double for double (house style rule 6).
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

// exp for the hot loops.
// Host, float: a branch-free Cody-Waite + degree-6 polynomial exp (max rel. error ~2 ulp on [-87, 88]) that
// GCC vectorises inside `#pragma omp simd` loops, unlike std::exp. Arguments below -87.3 give exactly 0 (the
// exact result is < 1.2e-38, under float's normal range), so masked entries (-inf) stay exactly zero.
// Device: the hardware exp. Double: std::exp on both (the float64 path exists for gradcheck, not speed).
#if !defined(SMTC_DEVICE_MATH)
// exp(xc) for xc in [-87.3, 88.3].
inline float exp_polynomial(float xc) {
  const float t = xc * 1.44269504088896341f;               // x / ln 2, in [-126, 127.4]
  const int k = static_cast<int>(t + 128.5f) - 128;        // round to nearest (truncation of a positive)
  const float kf = static_cast<float>(k);
  const float r = (xc - kf * 0.693359375f) + kf * 2.12194440e-4f;  // x - k ln2, two-part ln2 (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int bits = (k + 127) << 23;                               // 2^k as a float
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
#endif

SMTC_HD float fast_exp(float x) {
#if defined(SMTC_DEVICE_MATH)
  return __expf(x);
#else
  const float y = exp_polynomial(x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x));
  return x < -87.3f ? 0.0f : y;
#endif
}
SMTC_HD double fast_exp(double x) { return exp(x); }

// fast_exp for arguments that cannot overflow (x <= 88.3; in practice x - max(x) <= 0 inside a log-sum-exp
// or a softmax): the same result, bit for bit, without the upper clamp. Vectorised, GCC then folds the lower
// clamp into the final zeroing mask: ~22 instead of ~32 AVX-512 instructions per 16 lanes, 0.68 instead of
// 0.97 cycles per element in a loop of exps (dev VM). Larger arguments give garbage.
SMTC_HD float fast_exp_nonpositive(float x) {
#if defined(SMTC_DEVICE_MATH)
  return __expf(x);
#else
  const float y = exp_polynomial(x < -87.3f ? -87.3f : x);  // the clamp keeps the int conversion defined
  return x < -87.3f ? 0.0f : y;
#endif
}
SMTC_HD double fast_exp_nonpositive(double x) { return exp(x); }

// 2^t for t <= 0 (t up to 127 is still right; larger t gives garbage, NaN gives NaN). For a caller that can form
// its argument in log2 units in the one multiply it needs anyway: Sinkhorn's kernel exp(-C/eps) is
// 2^(C * (-log2(e)/eps)), the same single rounding of the argument as -C/eps. Then t - round(t) is exact, so
// there is no Cody-Waite reduction, and with round-to-nearest by the 1.5*2^23 shifter (its low mantissa bits
// are round(t)) there is no float -> int conversion, whose clamp the fast_exp above needs to stay defined.
// Host, float: Cephes' exp2f polynomial on [-0.5, 0.5] (max rel. error 1.7 ulp over [-126, 0]); arguments below
// -126 give exactly 0 (2^-126 is float's smallest normal), so -inf gives 0. GCC makes it 14 AVX-512
// instructions per 16 lanes (the zeroing folds into the last multiply's mask), against ~22 for
// fast_exp_nonpositive: the Sinkhorn first pass (an exp, a min and a sum per cost) ran in 58k instead of 82k
// cycles per 256 x 256 problem (rdtsc, data in L2, dev VM). Device: the hardware exp2.
#if !defined(SMTC_DEVICE_MATH)
inline float exp2_polynomial_nonpositive(float t) {
  const float shifter = 12582912.0f;                       // 1.5 * 2^23: t + shifter rounds t to an integer
  const float ts = t + shifter;
  const float k = ts - shifter;                            // round(t), exact for |t| < 2^22
  const float r = t - k;                                   // in [-0.5, 0.5], exact
  float p = 1.535336188319500e-4f;
  p = p * r + 1.339887440266574e-3f;
  p = p * r + 9.618437357674640e-3f;
  p = p * r + 5.550332471162809e-2f;
  p = p * r + 2.402264791363012e-1f;
  p = p * r + 6.931472028550421e-1f;
  p = p * r + 1.0f;                                        // 2^r
  uint32_t bits;
  std::memcpy(&bits, &ts, sizeof(bits));
  bits = (bits << 23) + (127u << 23);                      // ts's low bits hold k: 2^k as a float, for k >= -126
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float y = p * scale;
  return t < -126.0f ? 0.0f : y;
}
#endif

SMTC_HD float fast_exp2_nonpositive(float t) {
#if defined(SMTC_DEVICE_MATH)
  return exp2f(t);
#else
  return exp2_polynomial_nonpositive(t);
#endif
}
SMTC_HD double fast_exp2_nonpositive(double t) { return exp2(t); }

// log for positive normal floats (FLT_MIN <= x <= FLT_MAX; callers route zeros, denormals, inf and NaN to
// smtc_log): Cephes' logf polynomial (max rel. error ~1 ulp), branch-free so that GCC vectorises it where glibc's
// logf stays a scalar call. Sinkhorn's potentials take 512 logs per 256 x 256 problem (~0.5 ms of a ~13 ms
// forward at SMTC's shapes as calls).
#if !defined(SMTC_DEVICE_MATH)
inline float fast_log_normal(float x) {
  int bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int e = ((bits >> 23) & 0xff) - 126;                     // x = m * 2^e with m in [0.5, 1)
  const int mbits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool small = m < 0.707106781186547524f;            // keep m - 1 in [-0.29, 0.41]
  e = small ? e - 1 : e;
  const float t = small ? m + m - 1.0f : m - 1.0f;
  const float fe = static_cast<float>(e);
  const float z = t * t;
  float y = 7.0376836292e-2f;
  y = y * t - 1.1514610310e-1f;
  y = y * t + 1.1676998740e-1f;
  y = y * t - 1.2420140846e-1f;
  y = y * t + 1.4249322787e-1f;
  y = y * t - 1.6668057665e-1f;
  y = y * t + 2.0000714765e-1f;
  y = y * t - 2.4999993993e-1f;
  y = y * t + 3.3333331174e-1f;
  y = y * t * z;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (t + y) + 0.693359375f * fe;
}
#endif

SMTC_HD float smtc_log(float x) { return logf(x); }
SMTC_HD double smtc_log(double x) { return log(x); }

// max by value: std::max returns a reference, which keeps GCC from vectorising the loops that use it.
template <typename T> SMTC_HD T vmax(T a, T b) { return a > b ? a : b; }

template <typename T> SMTC_HD T neg_inf() { return -static_cast<T>(INFINITY); }

// Online log-sum-exp: fold x into the running (max, sum of exp(. - max)) pair. Used where one pass must do.
template <typename T> SMTC_HD void lse_push(T& mx, T& s, T x) {
  if (x > mx) {
    s = s * fast_exp(mx - x) + T(1);
    mx = x;
  } else if (x != neg_inf<T>()) {
    s += fast_exp(x - mx);
  }
}
// Merge two running pairs (for tree reductions across threads).
template <typename T> SMTC_HD void lse_merge(T& mx, T& s, T mx2, T s2) {
  if (mx2 == neg_inf<T>()) return;
  if (mx == neg_inf<T>()) { mx = mx2; s = s2; return; }
  if (mx2 > mx) { s = s * fast_exp(mx - mx2) + s2; mx = mx2; }
  else { s += s2 * fast_exp(mx2 - mx); }
}

}  // namespace smtc
