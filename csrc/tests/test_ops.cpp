// C++ test of the registered CPU kernels through the dispatcher, against plain loops (no Python involved).
// Run with `make ctest`.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "common/math.h"

static int failures = 0;
#define EXPECT(cond, ...)                 \
  do {                                    \
    if (!(cond)) {                        \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);           \
      std::printf("\n");                  \
      ++failures;                         \
    }                                     \
  } while (0)

static void test_fast_exp() {
  double worst = 0;
  for (float x = -87.0f; x < 88.0f; x += 0.0137f) {
    const double rel = std::abs(smtc::fast_exp(x) - std::exp(double(x))) / std::exp(double(x));
    worst = rel > worst ? rel : worst;
  }
  EXPECT(worst < 5e-7, "fast_exp max relative error %g", worst);
  EXPECT(smtc::fast_exp(-INFINITY) == 0.0f, "fast_exp(-inf) must be exactly 0");
  int differ = 0;
  for (float x = -100.0f; x <= 0.0f; x += 0.00731f) differ += smtc::fast_exp_nonpositive(x) != smtc::fast_exp(x);
  EXPECT(differ == 0, "fast_exp_nonpositive differs from fast_exp at %d points of [-100, 0]", differ);
  EXPECT(smtc::fast_exp_nonpositive(-INFINITY) == 0.0f, "fast_exp_nonpositive(-inf) must be exactly 0");
  EXPECT(std::isnan(smtc::fast_exp_nonpositive(NAN)), "fast_exp_nonpositive(nan) must be nan");
  // fast_exp2_nonpositive: relative error over float's normal range, exact powers of two at integers (the
  // Sinkhorn kernel's largest entry, at a zero cost, must be exactly 1), zeros below it.
  double worst2 = 0;
  for (float t = -126.0f; t <= 0.0f; t += 0.000913f) {
    const double ref = std::exp2(double(t));
    worst2 = std::max(worst2, std::abs(smtc::fast_exp2_nonpositive(t) - ref) / ref);
  }
  EXPECT(worst2 < 2e-7, "fast_exp2_nonpositive max relative error %g", worst2);
  int inexact = 0;
  for (int k = -126; k <= 0; ++k) inexact += smtc::fast_exp2_nonpositive(float(k)) != std::ldexp(1.0f, k);
  EXPECT(inexact == 0, "fast_exp2_nonpositive inexact at %d integers", inexact);
  EXPECT(smtc::fast_exp2_nonpositive(-0.0f) == 1.0f, "fast_exp2_nonpositive(-0) must be exactly 1");
  EXPECT(smtc::fast_exp2_nonpositive(-126.5f) == 0.0f && smtc::fast_exp2_nonpositive(-INFINITY) == 0.0f,
         "fast_exp2_nonpositive below -126 must be exactly 0");
  EXPECT(std::isnan(smtc::fast_exp2_nonpositive(NAN)), "fast_exp2_nonpositive(nan) must be nan");
  // fast_log_normal: error relative to max(|log x|, 1), over the normal range and densely around 1.
  double worst_log = 0;
  auto log_err = [](float x) {
    const double ref = std::log(double(x));
    return std::abs(smtc::fast_log_normal(x) - ref) / std::max(1.0, std::abs(ref));
  };
  for (float x = 1.2e-38f; x < 3e38f; x *= 1.0137f) worst_log = std::max(worst_log, log_err(x));
  for (float x = 0.5f; x < 2.0f; x += 1.3e-4f) worst_log = std::max(worst_log, log_err(x));
  EXPECT(worst_log < 2e-7, "fast_log_normal max error %g", worst_log);
  float mx = -INFINITY, s = 0;
  double direct = 0;
  for (int i = 0; i < 50; ++i) {
    const float v = std::sin(float(i)) * 30.0f;
    smtc::lse_push(mx, s, v);
    direct += std::exp(double(v));
  }
  EXPECT(std::abs((mx + std::log(s)) - std::log(direct)) < 1e-5, "online logsumexp");
}

static void test_correlation() {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("smtc_fast::correlation", "").typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  auto a = at::randn({2, 5, 7}, at::kDouble), b = at::randn({2, 4, 7}, at::kDouble);
  auto c = op.call(a, b);
  double err = 0;
  for (int i = 0; i < 2; ++i)
    for (int n = 0; n < 5; ++n)
      for (int m = 0; m < 4; ++m) {
        double s = 0;
        for (int d = 0; d < 7; ++d) s += a[i][n][d].item<double>() * b[i][m][d].item<double>();
        err = std::max(err, std::abs(s - c[i][n][m].item<double>()));
      }
  EXPECT(err < 1e-12, "correlation vs loops: %g", err);
}

static void test_sinkhorn() {
  using Fn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           double, int64_t, c10::optional<double>);
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow("smtc_fast::sinkhorn", "").typed<Fn>();
  const int N = 6, M = 5, iters = 3;
  const double eps = 0.1;
  auto C = at::rand({1, N, M}, at::kDouble);
  auto lmu = at::full({1, N}, -std::log(double(N)), at::kDouble);
  auto lnu = at::full({1, M}, -std::log(double(M)), at::kDouble);
  auto plan = std::get<0>(op.call(C, lmu, lnu, eps, iters, c10::nullopt));
  // Probability domain (spec §2.1): K = exp(-C/eps), b = 1, a = mu/(K b), b = nu/(K^T a).
  std::vector<double> a(N, 1.0), bb(M, 1.0);
  for (int t = 0; t < iters; ++t) {
    for (int n = 0; n < N; ++n) {
      double s = 0;
      for (int m = 0; m < M; ++m) s += std::exp(-C[0][n][m].item<double>() / eps) * bb[m];
      a[n] = (1.0 / N) / s;
    }
    for (int m = 0; m < M; ++m) {
      double s = 0;
      for (int n = 0; n < N; ++n) s += std::exp(-C[0][n][m].item<double>() / eps) * a[n];
      bb[m] = (1.0 / M) / s;
    }
  }
  double err = 0;
  for (int n = 0; n < N; ++n)
    for (int m = 0; m < M; ++m)
      err = std::max(err, std::abs(a[n] * std::exp(-C[0][n][m].item<double>() / eps) * bb[m] -
                                   plan[0][n][m].item<double>()));
  EXPECT(err < 1e-12, "sinkhorn vs probability domain: %g", err);
}

int main() {
  test_fast_exp();
  test_correlation();
  test_sinkhorn();
  if (failures == 0) std::printf("all C++ op tests passed\n");
  return failures == 0 ? 0 : 1;
}
