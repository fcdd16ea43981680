"""Build of smtc_fast and its extension smtc_fast._C.

Every build decision lives here and is steered by environment variables (all in the README):

  SMTC_FAST_NO_EXTENSION=1  pure-Python install: every op runs its PyTorch reference.
  SMTC_FAST_NO_CUDA=1       build the C++ CPU kernels only, even where nvcc is found.
  FORCE_CUDA=1              build the CUDA kernels even without a visible GPU (the default
                            already does so whenever torch is a CUDA build and nvcc is found).
  TORCH_CUDA_ARCH_LIST      GPU architectures, e.g. "8.0;9.0" (our default when unset: "8.0;9.0").
  MAX_JOBS                  parallel compile jobs (ninja).
  DEBUG=1                   -O0 -g, no NDEBUG.

Build with `pip install --no-build-isolation -e .` after torch is installed.
"""
import glob
import json
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
RECORD = os.path.join(ROOT, "smtc_fast", "_build_record.json")


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """CUDA_HOME for torch.utils.cpp_extension, set before it is imported.

    torch guesses the toolkit from `which nvcc`, which is wrong where nvcc is a wrapper script outside the
    toolkit (/usr/local/bin/nvcc here -> /usr/local, without the CUDA headers). Keep an explicit
    CUDA_HOME/CUDA_PATH; otherwise take the first candidate that has both bin/nvcc and the runtime headers.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = home
            return


def _write_record(record):
    with open(RECORD, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)


def _extensions():
    record = {"extension": False, "cuda": False, "cuda_archs": [], "why_no_extension": None, "why_no_cuda": None}
    if _flag("SMTC_FAST_NO_EXTENSION"):
        record["why_no_extension"] = "SMTC_FAST_NO_EXTENSION=1 at build time"
        record["why_no_cuda"] = record["why_no_extension"]
        _write_record(record)
        return [], {}
    _find_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing: a pure-Python install still works
        record["why_no_extension"] = f"torch could not be imported at build time ({exc})"
        _write_record(record)
        return [], {}

    debug = _flag("DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: ATen's at::parallel_for is an inline `#pragma omp parallel` (ATen/ParallelOpenMP.h, torch is built
    # with AT_PARALLEL_OPENMP), so without it every parallel_for in our kernels runs on one thread. The extension
    # then needs libgomp.so.1, which resolves to the copy torch has already loaded (one OpenMP runtime, torch's
    # thread count). -fno-trapping-math: lets GCC if-convert the selects in the vectorised exp
    # (csrc/common/math.h). No -ffast-math: NaN/inf semantics are kept.
    cxx += ["-fvisibility=hidden", "-fopenmp", "-fno-trapping-math"]
    link = ["-fopenmp"]
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math"]
    nvcc += ["--expt-relaxed-constexpr"]
    define_macros = [] if debug else [("NDEBUG", None)]

    # csrc/tests/ is the ctest program (CMakeLists.txt), not part of the extension.
    sources = sorted(s for s in glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
                     if not s.startswith(os.path.join("csrc", "tests", "")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    cuda_only_cpp = [s for s in sources if s.endswith("_cuda_ops.cpp")]  # torch-facing CUDA wrappers

    use_cuda, why = False, None
    if _flag("SMTC_FAST_NO_CUDA"):
        why = "SMTC_FAST_NO_CUDA=1 at build time"
    elif torch.version.cuda is None:
        why = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        why = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    else:
        use_cuda = True

    record["extension"] = True
    if use_cuda:
        # Without a GPU torch would compile for every architecture it knows (slow); pick a short default.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        archs = os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").replace(" ", ";")
        record.update(cuda=True, cuda_archs=[a for a in archs.split(";") if a], nvcc_cuda_home=CUDA_HOME)
        define_macros.append(("WITH_CUDA", None))
        ext = CUDAExtension(
            "smtc_fast._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    else:
        record["why_no_cuda"] = why
        ext = CppExtension(
            "smtc_fast._C",
            [s for s in sources if s not in cuda_only_cpp],
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    record["torch_at_build"] = torch.__version__
    record["cuda_at_build"] = torch.version.cuda
    _write_record(record)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["smtc_fast", "smtc_fast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    include_package_data=True,
)
