"""Numerics policy in one place (house style rule 10): the tolerances every op test uses.

`assert_close_to_reference(actual, expected)` compares a kernel's result with the PyTorch reference run in the
same dtype. For half/bf16 on the GPU, `assert_within_reference_error` checks the kernel's error against a
float64 reference is at most twice the error of the reference itself run in that dtype.
"""
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
