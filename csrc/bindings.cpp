// The Python module smtc_fast._C: loading it registers the operators (ops.cpp and the kernels' static
// TORCH_LIBRARY_IMPL blocks). It exposes build facts, the CPU output cache's controls (common/alloc.h) and the
// CUDA execution tier's counters and self-tests (common/cuda_emu.h); no tensor function goes through pybind.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common/alloc.h"

#include <string>

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>
#endif
#ifdef SMTC_WITH_CUDA_EMU
#include "common/cuda_emu_selftest.h"
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
#ifdef SMTC_WITH_CUDA_EMU
    d["cuda_emu"] = true;
#else
    d["cuda_emu"] = false;
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
#ifdef SMTC_WITH_CUDA_EMU
  mod.def("emu_launch_count", [] { return cuda_emu_selftest::launch_count(); },
          "Kernel launches the CUDA execution tier has run in this process.");
  mod.def("emu_schedule", [] { return cuda_emu_selftest::schedule_name(); },
          "The thread schedule SMTC_FAST_EMU_SCHEDULE selects now (forward, reverse, random:SEED).");
  mod.def("emu_selftest_names", [] { return cuda_emu_selftest::names(); });
  mod.def("emu_selftest", [](const std::string& name) {
    const auto r = cuda_emu_selftest::run(name);
    return py::make_tuple(r.error, r.values);
  }, "Runs one of the tier's self-test kernels: (error reported by the launch, the kernel's output).");
#endif
}
