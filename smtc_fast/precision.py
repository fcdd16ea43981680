"""Which precision a run computes in: bf16 autocast on CUDA and on CPUs with native bf16, float32 elsewhere.

bf16 autocast on the CPU pays off only where the CPU multiplies bf16 natively (AVX512-BF16 `vdpbf16ps`, or AMX
tiles): oneDNN then runs the ViT's GEMMs at about twice the float32 rate (issue 15: ViT-S/16 forward 1.9x,
forward + backward 1.5x on a 2-core AVX512-BF16 machine). Without those instructions bf16 is emulated and slower
than float32, so `--amp` there means float32. The trainer's `--amp` and the evaluators' feature extraction both
ask `autocast_dtype(device, amp)`; `--no-amp` is float32 everywhere.

Under CPU autocast the smtc_fast operators still run their float32 CPU kernels (compiled for float32/float64): the
public functions cast bf16 inputs up (`smtc_fast.ops._common.autocast_inputs`), as autocast does for its own
float32-list ops, so the slot attention accumulates in float32 as the CUDA kernels do. `correlation` is a GEMM
and runs as one of autocast's bf16 GEMMs (bf16 result, float32 accumulation), as torch.bmm would.
"""
import functools

import torch

# /proc/cpuinfo flags, best first: AMX tiles (Sapphire Rapids on), then AVX512-BF16 (Cooper Lake, Zen 4 on).
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=None)
def cpu_bf16():
    """The CPU's native bf16 instruction set: 'amx_bf16', 'avx512_bf16', or None (bf16 would be emulated).

    Read from /proc/cpuinfo (Linux); elsewhere, torch's own check (`torch.backends.mkldnn`'s bf16 support,
    which is the same CPUID test oneDNN uses) decides, reported as 'avx512_bf16'."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        for name in _BF16_FLAGS:
            if name in flags:
                return name
        return None
    except OSError:
        pass
    try:
        return "avx512_bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


def autocast_dtype(device, amp=True):
    """torch.bfloat16 when `amp` and the device computes bf16 natively (any CUDA GPU this package supports, or a
    CPU with cpu_bf16()), else None (= float32)."""
    device = torch.device(device)
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_bf16() is not None:
        return torch.bfloat16
    return None


def autocast(device, amp=True):
    """The autocast context for `device` (disabled when autocast_dtype says float32)."""
    device = torch.device(device)
    dtype = autocast_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def describe(device, amp=True):
    """One line for a run banner, e.g. 'bf16 autocast (CPU amx_bf16)' or 'float32 (--no-amp)'."""
    device = torch.device(device)
    if autocast_dtype(device, amp) is not None:
        return "bf16 autocast (" + ("CUDA" if device.type == "cuda" else f"CPU {cpu_bf16()}") + ")"
    if not amp:
        return "float32 (--no-amp)"
    return "float32 (this CPU has no native bf16: AVX512-BF16 / AMX)"
