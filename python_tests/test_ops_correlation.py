"""smtc_fast.ops.correlation: kernel vs reference vs brute force, autograd, opcheck, compile, bad input."""
import pytest
import torch

import smtc_fast
from smtc_fast.ops import correlation, correlation_reference
from smtc_fast.testing import assert_close_to_reference, assert_within_reference_error, kernel_ran

from conftest import CUDA_DEVICES, DEVICES

HAS_KERNEL = smtc_fast.build_info()["cpu_kernels"]


def brute_force(a, b):
    out = torch.zeros(a.shape[0], a.shape[1], b.shape[1], dtype=torch.float64)
    for i in range(a.shape[0]):
        for n in range(a.shape[1]):
            for m in range(b.shape[1]):
                out[i, n, m] = sum(float(a[i, n, d]) * float(b[i, m, d]) for d in range(a.shape[2]))
    return out


def test_reference_equals_brute_force():
    a, b = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(2, 3, 7, dtype=torch.float64)
    torch.testing.assert_close(correlation_reference(a, b), brute_force(a, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 63, 70, 37), (1, 1, 1, 1), (2, 7 * 9, 5, 48), (4, 256, 256, 33)])
def test_forward_backward_match_reference(device, dtype, shape):
    B, N, M, D = shape
    a = torch.randn(B, N, D, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(B, M, D, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(B, N, M, dtype=dtype, device=device)
    with kernel_ran(device, "correlation", "_correlation_backward"):
        out = correlation(a, b)
        ga, gb = torch.autograd.grad(out, (a, b), g)
    ref = correlation_reference(a, b)
    ra, rb = torch.autograd.grad(ref, (a, b), g)
    if dtype == torch.float64:
        for x, r in ((out, ref), (ga, ra), (gb, rb)):
            assert_close_to_reference(x, r)
    else:
        # float32: sums of up to 256 terms in another order (cuBLAS, MKL, the reference) differ by more than a
        # fixed rtol allows; the house rule judges each against float64 (at most twice the reference's own error).
        a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        e = correlation_reference(a64, b64)
        ea, eb = torch.autograd.grad(e, (a64, b64), g.double())
        for x, r, ex in ((out, ref, e), (ga, ra, ea), (gb, rb, eb)):
            assert_within_reference_error(x, r, ex)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    a = torch.randn(3, 12, 10, device=device).transpose(1, 2)  # (3, 10, 12), strided
    b = torch.randn(3, 12, 9, device=device)[:, :, ::2].transpose(1, 2)  # (3, 5, 12)
    assert not a.is_contiguous() and not b.is_contiguous()
    assert_close_to_reference(correlation(a, b), correlation_reference(a.contiguous(), b.contiguous()))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_dims(device):
    for B, N, M, D in [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0)]:
        a = torch.randn(B, N, D, device=device, requires_grad=True)
        b = torch.randn(B, M, D, device=device, requires_grad=True)
        out = correlation(a, b)
        assert out.shape == (B, N, M)
        assert torch.all(out == 0)
        out.sum().backward()
        assert a.grad.shape == a.shape and b.grad.shape == b.shape


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_gradcheck_float64():
    a = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.smtc_fast.correlation, (a, b))


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_opcheck():
    a = torch.randn(2, 4, 3, requires_grad=True)
    b = torch.randn(2, 5, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.smtc_fast.correlation.default, (a, b))


def test_torch_compile_fullgraph():
    a, b = torch.randn(2, 6, 8), torch.randn(2, 5, 8)
    compiled = torch.compile(correlation, fullgraph=True, backend="eager")
    compiled(a, b)  # traced here: the graph, not the tracing, must call the kernel below
    with kernel_ran("cpu", "correlation"):
        out = compiled(a, b)
    assert_close_to_reference(out, correlation_reference(a, b))


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_forced_reference_equals_kernel(monkeypatch):
    a, b = torch.randn(3, 9, 16), torch.randn(3, 11, 16)
    kernel = correlation(a, b)
    monkeypatch.setenv("SMTC_FAST_FORCE_REFERENCE", "1")
    assert_close_to_reference(correlation(a, b), kernel)


def test_unsupported_dtype_falls_back():
    a, b = torch.randn(2, 3, 4).bfloat16(), torch.randn(2, 5, 4).bfloat16()
    torch.testing.assert_close(correlation(a, b), correlation_reference(a, b))


@pytest.mark.parametrize("args, match", [
    ((torch.randn(3, 4), torch.randn(2, 3, 4)), "a must be 3-D"),
    ((torch.randn(2, 3, 4), torch.randn(3, 3, 4)), "batch B"),
    ((torch.randn(2, 3, 4), torch.randn(2, 3, 5)), "feature dim D"),
    ((torch.randn(2, 3, 4), torch.randn(2, 3, 4).double()), "same dtype"),
    ((torch.ones(2, 3, 4, dtype=torch.long), torch.ones(2, 3, 4, dtype=torch.long)), "floating-point"),
    ((torch.randn(2, 3, 4), torch.randn(2, 3, 4, device="meta")), "same device"),
])
def test_bad_input(args, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        correlation(*args)


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_cpp_op_validates_too():
    with pytest.raises(RuntimeError, match="feature dim D"):
        torch.ops.smtc_fast.correlation(torch.randn(2, 3, 4), torch.randn(2, 3, 5))


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_within_policy(device, dtype):
    a, b = torch.randn(4, 100, 70, device=device), torch.randn(4, 90, 70, device=device)
    exact = correlation_reference(a.double(), b.double())
    assert_within_reference_error(correlation(a.to(dtype), b.to(dtype)),
                                  correlation_reference(a.to(dtype), b.to(dtype)), exact)
