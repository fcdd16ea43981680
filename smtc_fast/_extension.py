"""Loads smtc_fast._C once and says what it provides.

The extension registers the `torch.ops.smtc_fast.*` operators (csrc/ops.cpp) and their CPU/CUDA kernels.
Nothing here raises: a missing or broken extension only means the ops run their PyTorch references.
"""
import importlib
import json
import os

import torch

# Public operators (csrc/ops.cpp); each also has a private `_<name>_backward` where differentiable.
OPS = ("correlation", "slot_aggregate", "sinkhorn", "propagate_labels", "transport_loss")
CPU_ONLY_OPS = ("jf_counts",)  # the DAVIS scorer's counts (evaluate/metrics.py): no CUDA kernel, no tier twin

_RECORD_PATH = os.path.join(os.path.dirname(__file__), "_build_record.json")

try:
    _C = importlib.import_module("smtc_fast._C")  # registers the operators as a side effect

    _LOAD_ERROR = None
except Exception as exc:  # ImportError, or an undefined symbol from a stale build
    _C = None
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def extension_loaded():
    return _C is not None


def force_reference():
    """SMTC_FAST_FORCE_REFERENCE=1 routes every op to its PyTorch reference (read on every call)."""
    return os.environ.get("SMTC_FAST_FORCE_REFERENCE", "0").lower() in ("1", "true", "yes", "on")


def has_kernel(device_type):
    """True when the extension has kernels for this device type ('cpu' or 'cuda')."""
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(_C.build_info()["cuda"])
    if device_type == "cuda_emu":  # the CUDA kernels run on the CPU by the execution tier (csrc/common/cuda_emu.h)
        return bool(_C.build_info().get("cuda_emu", False))
    return False


def _read_record():
    try:
        with open(_RECORD_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def build_info():
    """What was built and why anything is missing.

    Returns a dict: extension (bool), cpu_kernels (bool), cuda_kernels (bool), cuda_archs (list of str),
    torch_version, torch_cuda_version (None for CPU torch), compiled_torch_version, compiled_cuda_version,
    cuda_available (a GPU is visible now), force_reference (SMTC_FAST_FORCE_REFERENCE is set),
    cpu_bf16 (the CPU's native bf16 instructions, 'amx_bf16' / 'avx512_bf16', or None: then `--amp` on the CPU
    means float32; smtc_fast.precision), ops (registered operator names), why_no_extension / why_no_cuda
    (None or a sentence), cuda_emu (the CPU execution tier of the CUDA kernels, torch.ops.smtc_fast_cuda_emu, was
    built), why_no_cuda_emu, sanitize.
    """
    from smtc_fast.precision import cpu_bf16

    record = _read_record()
    info = {
        "extension": _C is not None,
        "cpu_kernels": False,
        "cuda_kernels": False,
        "cuda_archs": [],
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "compiled_torch_version": record.get("torch_at_build"),
        "compiled_cuda_version": None,
        "cuda_available": torch.cuda.is_available(),
        "force_reference": force_reference(),
        "cpu_bf16": cpu_bf16(),
        "ops": [],
        "why_no_extension": None,
        "why_no_cuda": None,
        "cuda_emu": False,
        "why_no_cuda_emu": None,
        "sanitize": record.get("sanitize"),  # "address" / "thread": a sanitizer build (make test-cuda-emu-asan/-tsan)
    }
    if _C is None:
        info["why_no_extension"] = record.get("why_no_extension") or (
            f"smtc_fast._C could not be imported ({_LOAD_ERROR}); "
            "build it with `pip install --no-build-isolation -e .`"
        )
        info["why_no_cuda"] = info["why_no_cuda_emu"] = info["why_no_extension"]
        return info
    compiled = _C.build_info()
    info["cpu_kernels"] = True
    info["cuda_kernels"] = bool(compiled["cuda"])
    info["cuda_archs"] = list(record.get("cuda_archs", [])) if compiled["cuda"] else []
    info["compiled_cuda_version"] = compiled.get("cuda_version") or None
    info["ops"] = [n for n in OPS + CPU_ONLY_OPS if hasattr(torch.ops.smtc_fast, n)]
    info["cuda_emu"] = bool(compiled.get("cuda_emu", False))
    if not info["cuda_emu"]:
        info["why_no_cuda_emu"] = record.get("why_no_cuda_emu") or "the extension was built without the CUDA execution tier"
    if not compiled["cuda"]:
        info["why_no_cuda"] = record.get("why_no_cuda") or "the extension was built without CUDA"
    elif not torch.cuda.is_available():
        info["why_no_cuda"] = "CUDA kernels are built, but no GPU is visible on this machine"
    return info


def cpu_cache_info():
    """The CPU kernels' output cache (csrc/common/alloc.h): {"kept_bytes", "limit_bytes"}.

    The CPU kernels take their large outputs (>= 4 MB) from a cache of blocks freed earlier, because on
    virtual machines the page faults of fresh memory cost more than the kernels' arithmetic. kept_bytes is what
    the cache holds now (resident, but not in use); limit_bytes is its cap (SMTC_FAST_CPU_CACHE_MB, default
    1024; 0 turns it off). Both are 0 without the extension.
    """
    if _C is None or not hasattr(_C, "cpu_cache_info"):
        return {"kept_bytes": 0, "limit_bytes": 0}
    return dict(_C.cpu_cache_info())


def release_cpu_cache():
    """Gives the blocks the CPU output cache keeps back to the OS (the CPU twin of torch.cuda.empty_cache);
    returns the number of bytes released. Tensors in use are not affected."""
    if _C is None or not hasattr(_C, "release_cpu_cache"):
        return 0
    return int(_C.release_cpu_cache())
