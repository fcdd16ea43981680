"""Prints the cmake -D arguments that let find_package(Torch) configure against the installed (pip) torch.

A CUDA build of torch makes Caffe2's CMake look for the CUDA toolkit; the pip wheels carry the runtime
libraries but the toolkit's CMake hints must be given by hand (build_notes.md, "CMake"). Used by `make ctest`.
"""
import glob
import os
import shutil

import torch

args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
if torch.version.cuda is not None:
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME", "")] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    toolkit = next((h for h in homes if h and os.path.exists(os.path.join(h, "include", "cuda_runtime_api.h"))), None)
    import nvidia

    nvlib = next((p for p in glob.glob(os.path.join(os.path.dirname(nvidia.__path__[0]), "nvidia", "cu[0-9]*", "lib"))), None)
    if toolkit:
        args += [f"-DCUDA_TOOLKIT_ROOT_DIR={toolkit}", f"-DCUDA_INCLUDE_DIRS={toolkit}/include",
                 f"-DCUDA_CUDART_LIBRARY={toolkit}/lib/libcudart.so"]
    if nvlib:
        nvrtc = sorted(glob.glob(os.path.join(nvlib, "libnvrtc.so.*")))
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
        args.append(f"-DSMTC_NVLIB={nvlib}")
print(" ".join(args))
