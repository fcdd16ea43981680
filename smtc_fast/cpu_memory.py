"""Keep freed memory mapped in CPU training: glibc malloc settings that stop the per-step page faults.

glibc serves every allocation above its mmap threshold (128 KB, growing to at most 32 MB as large blocks are
freed) with a fresh mmap and unmaps it on free, and trims the heap's free top back to the OS. A training step
allocates and frees the same large tensors every iteration (the head's (B*T, n, D) activations are 12-50 MB at
the official shape), so each one is page-faulted in again, 4 KB at a time, at every step. On virtual machines a
fault costs microseconds: measured on the 2-vCPU CI machine, a fresh 50 MB tensor costs ~70 ms of faults, and
the head step at the official shape (32 clips x 4 frames, 256^2, two threads, float32, kernels) takes 1.13-1.17 s
with the settings below against 1.30-1.35 s without (the references' step: 1.64-1.67 s against 2.40-2.41 s, as
their unfused L_sem allocates 100 MB temporaries). The CPU kernels already avoid this for their own outputs
(csrc/common/alloc.h); this covers everything else in the process.

    M_MMAP_MAX = 0                 no block is served by its own mmap: all come from the heap and stay mapped
    M_TRIM_THRESHOLD = 2^31 - 1    the heap's free top is not returned until 2 GB of it are free

The cost: the process keeps its peak memory mapped (its RSS does not shrink after a step), which a training
process reaches at every step anyway. torch allocates with posix_memalign, whose freed blocks glibc reuses only
once the heap holds a few of each size: the faults stop after the first steps, not at the second (a 48 MB block
allocated and freed in a loop: the heap settles at ~8 of them, python_tests/test_model_train.py). Linux with
glibc only; elsewhere nothing changes. `smtc train` applies it on the CPU unless --no-keep-cpu-memory; it is a
process-wide setting, so it is not applied on import.
"""
import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def keep_freed_memory():
    """Apply the settings above to this process (and to the processes it forks later). Returns True when glibc
    accepted both, False where there is no glibc mallopt (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
