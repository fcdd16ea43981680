// run_on_threads: the one thread runner of the CPU kernels (propagate, slot_aggregate).
#pragma once

#include <ATen/Parallel.h>  // at::parallel_for, at::in_parallel_region

#include <cstdint>
#include <thread>
#include <vector>

namespace smtc {

// Runs fn(0), ..., fn(n - 1) on up to n threads. With ATen's OpenMP backend, at::parallel_for's parallel region is
// a `#pragma omp parallel` in a header (ATen/ParallelOpenMP.h): it only runs in parallel where our code is
// compiled with -fopenmp (setup.py does; a build without it would run the whole range on the calling thread). So:
// at::parallel_for under OpenMP, std::thread otherwise (inside another parallel region, or for n = 1, everything
// runs here). Callers hand out their work from a shared counter inside fn, so a thread that gets several s, or
// none, changes nothing but the speed.
template <typename F>
void run_on_threads(int64_t n, const F& fn) {
#if defined(_OPENMP)
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s) fn(s);
  });
#else
  if (n <= 1 || at::in_parallel_region()) {
    for (int64_t s = 0; s < n; ++s) fn(s);
    return;
  }
  std::vector<std::thread> threads;
  for (int64_t s = 1; s < n; ++s) threads.emplace_back([&fn, s] { fn(s); });
  fn(0);
  for (auto& t : threads) t.join();
#endif
}

}  // namespace smtc
