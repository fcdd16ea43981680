"""Batched dense correlation  C[b, n, m] = <a[b, n, :], b[b, m, :]>.

SMTC builds this map between a frame's attention keys and the previous frame's keys (spec §1.2: raw dot
products, no normalisation) and between L2-normalised teacher keys of every ordered frame pair for the
transport cost (spec §2.1).

    a  (B, N, D)  float
    b  (B, M, D)  float, same dtype and device as a
    -> (B, N, M)

Backward: grad_a = grad @ b, grad_b = grad^T @ a (registered op `_correlation_backward`).
"""
import torch

from smtc_fast.ops._common import (CPU_DTYPES, CUDA_DTYPES, NAMESPACES, autocast_gemm_inputs, check_dim, check_same,
                                   check_tensor, kernel_ops, use_kernel)

# The CPU kernel is at::bmm into the output cache (csrc/correlation/correlation_cpu.cpp): it serves every floating
# dtype that bmm does, bf16 included.
_KERNEL_DTYPES = {"cpu": CPU_DTYPES + (torch.bfloat16, torch.float16), "cuda": CUDA_DTYPES}


def _check(a, b):
    check_tensor("a", a, 3)
    check_tensor("b", b, 3)
    check_same("a", a, "b", b)
    check_dim("b", b, 0, a.shape[0], "batch B of a")
    check_dim("b", b, 2, a.shape[2], "feature dim D of a")


def correlation_reference(a, b):
    """Pure-PyTorch reference of `correlation` (same signature and result)."""
    _check(a, b)
    return torch.bmm(a, b.transpose(1, 2))


def correlation(a, b):
    """C = a @ b^T per batch: a (B, N, D), b (B, M, D) -> (B, N, M). Differentiable in a and b.

    Under CPU autocast the op is one of autocast's lower-precision GEMMs, as torch.bmm (its reference) is: float
    inputs are cast to the autocast dtype and the result has it (oneDNN accumulates the bf16 products in float32).
    Its consumer, h_c's GEMM in the model's fusion (models/smtc.py), runs in bf16 under autocast anyway, so a
    float32 correlation there bought no precision and made the kernels' bf16 fusion slower than the reference's
    (80 vs 59 ms at the official head shape, issue 15)."""
    a, b = autocast_gemm_inputs(a, b)
    _check(a, b)
    if use_kernel(a, _KERNEL_DTYPES):
        return kernel_ops(a).correlation(a, b)
    return correlation_reference(a, b)


def _register(ns):
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::correlation")
    def _correlation_fake(a, b):
        _check(a, b)
        return a.new_empty((a.shape[0], a.shape[1], b.shape[1]))

    @torch.library.register_fake(f"{ns}::_correlation_backward")
    def _correlation_backward_fake(grad, a, b):
        _check(a, b)
        check_same("grad", grad, "a", a)
        return torch.empty_like(a), torch.empty_like(b)

    def _setup_context(ctx, inputs, output):
        a, b = inputs
        ctx.save_for_backward(a, b)

    def _backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a, grad_b = ops._correlation_backward(grad.contiguous(), a, b)
        return grad_a, grad_b

    torch.library.register_autograd(f"{ns}::correlation", _backward, setup_context=_setup_context)


for _ns in NAMESPACES:
    _register(_ns)
