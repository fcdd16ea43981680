"""Shared plumbing of the public ops: input validation and the kernel-or-reference decision.

Validation lives here so that the public function, the fake (meta) kernel and the reference raise the same
clear errors; the C++ side repeats them with TORCH_CHECK for callers of `torch.ops.smtc_fast.*` directly.
"""
import contextlib
import os

import torch

from smtc_fast import _extension

# Which dtypes each backend's kernels were compiled for (csrc/*/<op>_cpu.cpp, <op>_cuda.cpp).
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Decided once at import: querying the extension inside a traced function would break torch.compile graphs.
_KERNELS = {"cpu": _extension.has_kernel("cpu"), "cuda": _extension.has_kernel("cuda"),
            "cuda_emu": _extension.has_kernel("cuda_emu")}

# The operator namespaces the extension registered: smtc_fast (CPU and CUDA kernels) and, where the CPU execution
# tier of the CUDA kernels was built, smtc_fast_cuda_emu (same schemas; the .cu kernels run on CPU tensors).
NAMESPACES = tuple(ns for ns, ok in (("smtc_fast", _extension.extension_loaded()),
                                     ("smtc_fast_cuda_emu", _KERNELS["cuda_emu"])) if ok)

_emulating = False


@contextlib.contextmanager
def emulated_cuda():
    """Inside this block the public ops send CPU tensors to the CUDA kernels run by the CPU execution tier
    (torch.ops.smtc_fast_cuda_emu), with the CUDA kernels' dtypes, instead of the CPU kernels. For tests and for
    debugging a CUDA kernel without a GPU; the schedule comes from SMTC_FAST_EMU_SCHEDULE."""
    global _emulating
    if not _KERNELS["cuda_emu"]:
        raise RuntimeError("the CUDA execution tier is not built: " + str(_extension.build_info()["why_no_cuda_emu"]))
    saved, _emulating = _emulating, True
    try:
        yield
    finally:
        _emulating = saved


def _kernel_device(x):
    return "cuda_emu" if _emulating and x.device.type == "cpu" else x.device.type


def kernel_ops(x):
    """The operator namespace whose kernel serves tensor `x`: torch.ops.smtc_fast, or the emulated CUDA kernels."""
    return torch.ops.smtc_fast_cuda_emu if _kernel_device(x) == "cuda_emu" else torch.ops.smtc_fast


def use_kernel(x, dtypes=None):
    """True when the compiled kernel serves tensor `x` (device and dtype), False -> use the reference.
    `dtypes` may be a tuple, or a dict from device kind ('cpu', 'cuda') to a tuple."""
    if os.environ.get("SMTC_FAST_FORCE_REFERENCE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    device = _kernel_device(x)
    if not _KERNELS.get(device, False):
        return False
    kind = "cpu" if device == "cpu" else "cuda"  # the emulated device runs the CUDA kernels, with their dtypes
    if dtypes is None:
        dtypes = CPU_DTYPES if kind == "cpu" else CUDA_DTYPES
    elif isinstance(dtypes, dict):
        dtypes = dtypes[kind]
    return x.dtype in dtypes


def autocast_inputs(*tensors):
    """Under CPU autocast, bf16/fp16 CPU tensors -> float32 (others and None unchanged).

    The CPU kernels are compiled for float32/float64 only; without this cast an op called inside
    `torch.autocast("cpu")` would see the bf16 outputs of the autocast GEMMs before it and fall back to the
    reference in bf16 (bf16 accumulation in the slot attention's weighted means). Casting up makes the op one of
    autocast's float32 ops, and its float32 result flows on; gradients are cast back by autograd."""
    if not torch.is_autocast_enabled("cpu"):
        return tensors
    return tuple(t.float() if t is not None and t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)
                 else t for t in tensors)


def autocast_gemm_inputs(*tensors):
    """Under CPU autocast, float32/bf16/fp16 CPU tensors -> the autocast dtype (others unchanged): the op is one of
    autocast's lower-precision GEMMs, as torch.bmm is (float64 is never cast, as autocast does not cast it). For
    ops whose CPU kernel is a BLAS GEMM that takes bf16 (correlation); the others cast up (autocast_inputs)."""
    if not torch.is_autocast_enabled("cpu"):
        return tensors
    dtype = torch.get_autocast_dtype("cpu")
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.device.type == "cpu"
                 and t.dtype in (torch.float32, torch.bfloat16, torch.float16) else t for t in tensors)


def check_tensor(name, x, ndim=None, floating=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in ndims:
            want = " or ".join(f"{d}-D" for d in ndims)
            raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_same(name_a, a, name_b, b, dtype=True):
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if dtype and a.dtype != b.dtype:
        raise ValueError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")


def check_dim(name, x, dim, expected, what):
    if x.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] ({what}) must be {expected}, got {x.shape[dim]} "
                         f"(shape {tuple(x.shape)})")
