// The Python module smtc_fast._C: loading it registers the operators (ops.cpp and the kernels' static
// TORCH_LIBRARY_IMPL blocks). It exposes build facts and the CPU output cache's controls (common/alloc.h); no
// tensor function goes through pybind.
#include <pybind11/pybind11.h>

#include "common/alloc.h"

#include <string>

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, mod) {
  mod.def("build_info", [] {
    py::dict d;
#ifdef WITH_CUDA
    d["cuda"] = true;
    d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
#else
    d["cuda"] = false;
    d["cuda_version"] = "";
#endif
#ifdef NDEBUG
    d["debug"] = false;
#else
    d["debug"] = true;
#endif
    d["compiler"] = std::string(__VERSION__);
    return d;
  });
  mod.def("release_cpu_cache", [] { return smtc::OutputCache::get().release(); });
  mod.def("cpu_cache_info", [] {
    py::dict d;
    d["kept_bytes"] = smtc::OutputCache::get().kept_bytes();
    d["limit_bytes"] = smtc::OutputCache::limit_bytes();
    return d;
  });
}
