"""Numerics policy in one place (house style rule 10): the tolerances every op test uses.

`assert_close_to_reference(actual, expected)` compares a kernel's result with the PyTorch reference run in the
same dtype. For half/bf16 on the GPU, `assert_within_reference_error` checks the kernel's error against a
float64 reference is at most twice the error of the reference itself run in that dtype.

`require_kernel(device)` and `kernel_ran(device, *ops)` make a kernel-vs-reference test prove the compiled kernel
ran; `check_build_loaded()` is `make test`'s check that the extension it built imports.
"""
import collections
import contextlib

import torch

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=1e-2, atol=1e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=1e-2),
}


def tolerance(dtype):
    return TOLERANCES[dtype]


def assert_close_to_reference(actual, expected, **overrides):
    tol = dict(tolerance(expected.dtype))
    tol.update(overrides)
    torch.testing.assert_close(actual, expected, **tol)


def assert_within_reference_error(kernel_out, reference_low, reference_f64, factor=2.0, floor=1e-6):
    """Low-precision policy: |kernel - f64| <= factor * |reference_in_dtype - f64| (+ a tiny floor)."""
    err_kernel = (kernel_out.double() - reference_f64).abs().max().item()
    err_ref = (reference_low.double() - reference_f64).abs().max().item()
    assert err_kernel <= factor * err_ref + floor, f"kernel error {err_kernel:.3g} > {factor} x reference error {err_ref:.3g}"


# ------------------------------------------------------------------------------------------- did the kernel run?
# A kernel-vs-reference test compares the reference with itself when the op silently falls back (the extension did
# not import, the dtype has no kernel, SMTC_FAST_FORCE_REFERENCE is set): both sides then pass whatever the kernel
# does. `require_kernel` turns "not built" into a skip that says why and "built but not loaded" into a failure;
# `kernel_ran` proves, from the dispatcher's own record (torch.profiler), that the compiled operators were called.

# The operator namespace each test "device" dispatches to: the extension's CPU and CUDA kernels are both
# `torch.ops.smtc_fast.*` (csrc/ops.cpp); the CPU emulation of the CUDA kernels registers its own namespace.
KERNEL_NAMESPACES = {"cpu": "smtc_fast", "cuda": "smtc_fast", "cuda_emu": "smtc_fast_cuda_emu"}
# The _build_record.json key (written by setup.py) that says the kernels of each device were built.
BUILD_RECORD_KEYS = {"cpu": "extension", "cuda": "cuda", "cuda_emu": "cuda_emu"}


def _device_name(device):
    name = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    from smtc_fast.ops import _common

    if name == "cpu" and _common._emulating:  # a CPU tensor inside emulated_cuda(): the CUDA kernels on the tier
        name = "cuda_emu"
    if name not in KERNEL_NAMESPACES:
        raise ValueError(f"device must be one of {sorted(KERNEL_NAMESPACES)}, got {device!r}")
    return name


def kernel_namespace(device):
    """'smtc_fast' for 'cpu' and 'cuda' (a str or torch.device), 'smtc_fast_cuda_emu' for 'cuda_emu'."""
    return KERNEL_NAMESPACES[_device_name(device)]


def kernel_status(device, ops=None):
    """(loaded, built, why) for the compiled kernels a test device runs.

    loaded: every operator in `ops` (default: all public ops) is registered in the device's namespace and, for
    'cuda', the extension has CUDA kernels; built: the build record (smtc_fast/_build_record.json) says they were
    built; why: a sentence when not loaded.
    """
    from smtc_fast import _extension

    name = _device_name(device)
    ops = _extension.OPS if ops is None else ops
    record = _extension._read_record()
    built = bool(record.get(BUILD_RECORD_KEYS[name]))
    if not _extension.extension_loaded():
        why = f"smtc_fast._C did not import ({_extension._LOAD_ERROR})"
        if not built:
            why = record.get("why_no_extension") or why
        return False, built, why
    if name == "cuda" and not _extension.has_kernel("cuda"):
        return False, built, record.get("why_no_cuda") or "the extension was built without CUDA"
    namespace = getattr(torch.ops, kernel_namespace(name))
    missing = [op for op in ops if not hasattr(namespace, op)]
    if missing:
        return False, built, f"torch.ops.{kernel_namespace(name)} has no {', '.join(missing)}"
    return True, built, None


def require_kernel(device, ops=None):
    """In a test: return when the kernels of `device` are loaded; skip (with the build's reason) where they were not
    built, or 'cuda' without a GPU; fail where the build record says they were built but they are not loaded."""
    import pytest

    loaded, built, why = kernel_status(device, ops)
    if loaded:
        if _device_name(device) == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        return
    if built:
        pytest.fail(f"the build record says the {_device_name(device)} kernels were built, but they are not "
                    f"loaded: {why}", pytrace=False)
    pytest.skip(f"no compiled {_device_name(device)} kernels: {why}")


@contextlib.contextmanager
def dispatched_ops(namespace):
    """Counts the calls of `torch.ops.<namespace>.*` operators inside the block: yields a Counter {op name: calls},
    filled when the block ends. Read from torch.profiler's record of the dispatcher, so it sees eager calls, the
    autograd backward and torch.compile graphs alike, without changing what runs."""
    calls = collections.Counter()
    prefix = namespace + "::"
    # The legacy (non-Kineto) profiler: the dispatcher's record of every operator call at ~2 ms a use, where
    # torch.profiler.profile costs ~140 ms to start and stop (hundreds of parametrised op tests use this).
    with torch.autograd.profiler.profile(use_kineto=False) as prof:
        yield calls
    for event in prof.function_events:
        if event.name.startswith(prefix):
            calls[event.name[len(prefix):]] += 1


@contextlib.contextmanager
def kernel_ran(device, *ops):
    """In a test: `with kernel_ran(device, "correlation", "_correlation_backward"): ...` fails unless each named
    compiled operator of the device's namespace was called inside the block (and skips or fails first, as
    `require_kernel` does, where the kernels are missing)."""
    require_kernel(device)
    namespace = kernel_namespace(device)
    with dispatched_ops(namespace) as calls:
        yield calls
    missing = [op for op in ops if calls[op] == 0]
    assert not missing, (f"the compiled {', '.join(namespace + '::' + op for op in missing)} did not run (the op fell "
                         f"back to its reference?); operators called: {dict(calls) or 'none'}")


def check_build_loaded():
    """Raises SystemExit naming the cause when the build record says kernels were built that do not load now (a
    stale or broken smtc_fast._C); `make test` runs it first, so a broken build cannot pass as reference-only."""
    from smtc_fast import _extension

    for device in ("cpu", "cuda"):
        loaded, built, why = kernel_status(device)
        if built and not loaded:
            raise SystemExit(f"smtc_fast: the build record ({_extension._RECORD_PATH}) says the {device} kernels "
                             f"were built, but they are not loaded: {why}")
