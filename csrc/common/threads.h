// run_on_threads: the one thread runner of the CPU kernels; for_chunks: the dynamic schedule on top of it.
#pragma once

#include <ATen/Parallel.h>  // at::parallel_for, at::in_parallel_region

#include <algorithm>
#include <atomic>
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

// fn(begin, end) over [0, n) in chunks of `chunk` items that the threads take from a shared counter. A dynamic
// schedule: a thread whose core another process is using (common on the shared machines we measure on) leaves
// its remaining chunks to the others instead of holding the whole op up, which a static split would.
template <typename F>
void for_chunks(int64_t n, int64_t chunk, const F& fn) {
  const int64_t n_tasks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  run_on_threads(std::min<int64_t>(n_tasks, at::get_num_threads()), [&](int64_t) {
    for (int64_t t; (t = next.fetch_add(1)) < n_tasks;) fn(t * chunk, std::min(n, (t + 1) * chunk));
  });
}

}  // namespace smtc
