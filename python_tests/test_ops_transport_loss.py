"""smtc_fast.ops.transport_loss (fused L_sem): kernel vs the unfused path (its reference) and vs the official
probability-domain Sinkhorn written out by hand; gradients, gradcheck, opcheck, torch.compile, edge shapes."""
import math

import pytest
import torch
import torch.nn.functional as F

import smtc_fast
from smtc_fast.losses import semantic_loss
from smtc_fast.ops import transport_loss, transport_loss_reference
from smtc_fast.testing import assert_close_to_reference

from smtc_fast import _extension

from conftest import CUDA_DEVICES, DEVICES, EmuDevice

HAS_KERNEL = smtc_fast.build_info()["cpu_kernels"]
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
pytestmark = pytest.mark.usefixtures("one_thread")


def inputs(B, T, S, n, D, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, T, S, n, generator=g, dtype=dtype) * 2).to(device)
    t = (torch.randn(B, T, S, n, generator=g, dtype=dtype) * 2).to(device)
    k = torch.randn(B, T, n, D, generator=g, dtype=dtype).to(device)
    return s, t, k


def kernel_ran(fn):
    """Runs fn() and returns True if a compiled op was dispatched (not the reference fallback): the CPU kernel, or
    the CUDA kernel (a GPU's, or the execution tier's under an emulated device)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name in ("smtc_fast::transport_loss", "smtc_fast_cuda_emu::transport_loss") for e in prof.events())


def official_loss(s_logits, t_logits, keys, eps=0.05, iters=3, marginals="norm", cost="one_minus_cos"):
    """Spec §2.1 by hand: per ordered pair, K = exp(-M/eps), b = 1, `iters` x (a = mu/(K b), b = nu/(K^T a))."""
    B, T = s_logits.shape[:2]
    total, count = 0.0, 0
    for b in range(B):
        for i in range(T):
            for j in range(T):
                if i == j:
                    continue
                fi, fj = F.normalize(keys[b, i], dim=-1), F.normalize(keys[b, j], dim=-1)
                M = 1 - fi @ fj.T if cost == "one_minus_cos" else -(fi @ fj.T)
                if marginals == "norm":
                    mu, nu = fi.abs().sum(-1), fj.abs().sum(-1)
                else:
                    mu, nu = torch.ones_like(fi[:, 0]), torch.ones_like(fj[:, 0])
                mu, nu = mu / mu.sum(), nu / nu.sum()
                K = torch.exp(-M / eps)
                a, bb = torch.ones_like(mu), torch.ones_like(nu)
                for _ in range(iters):
                    a = mu / (K @ bb)
                    bb = nu / (K.T @ a)
                plan = a[:, None] * K * bb[None, :]
                ps, pt = s_logits[b, i].softmax(0), t_logits[b, j].softmax(0)
                cross = torch.log(ps + 1e-8).T @ pt  # (n, n)
                total = total - (cross * plan).sum()
                count += 1
    return total / count


def compare(shape, dtype, eps=0.05, iters=3, marginals="norm", cost="one_minus_cos", device="cpu"):
    s, t, k = inputs(*shape, dtype=dtype, device=device)
    s.requires_grad_()
    got = transport_loss(s, t, k, eps, iters, marginals, cost)
    (g_got,) = torch.autograd.grad(got, s)
    want = transport_loss_reference(s, t, k, eps, iters, marginals, cost)
    (g_want,) = torch.autograd.grad(want, s)
    assert_close_to_reference(got, want)
    scale = g_want.abs().max().item() + 1e-30
    assert_close_to_reference(g_got / scale, g_want / scale, atol=1e-12 if dtype == torch.float64 else 1e-5)
    return got, want


@needs_kernel
def test_extension_serves_the_op():
    info = smtc_fast.build_info()
    assert info["extension"] and "transport_loss" in info["ops"]
    s, t, k = inputs(1, 2, 3, 4, 5)
    assert kernel_ran(lambda: transport_loss(s, t, k))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("marginals", ["norm", "uniform"])
@pytest.mark.parametrize("cost", ["one_minus_cos", "neg_cos"])
@pytest.mark.parametrize("iters", [3, 1, 0, 6])
def test_values_and_gradients_equal_unfused_path(dtype, marginals, cost, iters):
    s, t, k = inputs(2, 4, 16, 40, 24, dtype=dtype)
    assert kernel_ran(lambda: transport_loss(s, t, k, 0.05, iters, marginals, cost))
    compare((2, 4, 16, 40, 24), dtype, 0.05, iters, marginals, cost)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(3, 3, 5, 37, 7), (1, 2, 4, 256, 64), (2, 5, 2, 9, 3)])
def test_odd_shapes_and_frame_counts(dtype, shape):
    compare(shape, dtype, eps=0.1, iters=3)


@needs_kernel
def test_official_shape_float32():
    """SMTC's per-clip shape (T 4, S 16, n 256, D 384), a few clips: the kernel at the size it runs at."""
    compare((3, 4, 16, 256, 384), torch.float32)


@needs_kernel
@pytest.mark.parametrize("marginals", ["norm", "uniform"])
@pytest.mark.parametrize("cost", ["one_minus_cos", "neg_cos"])
def test_equals_official_probability_domain(marginals, cost):
    s, t, k = inputs(2, 3, 5, 10, 6)
    got = transport_loss(s, t, k, 0.05, 3, marginals, cost)
    torch.testing.assert_close(got, official_loss(s, t, k, 0.05, 3, marginals, cost), rtol=1e-10, atol=1e-12)


@needs_kernel
def test_zero_keys_and_repeated_frames():
    """A zero key (F.normalize gives 0: cos 0, L1 marginal 0, a zero-mass row) and a clip of identical frames
    (cos = 1 on the diagonal, 1 - cos ~ -1e-7 by rounding)."""
    s, t, k = inputs(2, 3, 4, 16, 8)
    k = k.clone()
    k[0, 1, 3] = 0.0
    k[1, 1] = k[1, 0]
    k[1, 2] = k[1, 0]
    s.requires_grad_()
    got = transport_loss(s, t, k)
    want = transport_loss_reference(s, t, k)
    assert_close_to_reference(got, want)
    assert_close_to_reference(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])


def test_uniform_masks_give_log_S():
    B, T, S, n, D = 2, 4, 16, 12, 8
    logits = torch.zeros(B, T, S, n)
    loss = transport_loss(logits, torch.randn(B, T, S, n), torch.randn(B, T, n, D))
    torch.testing.assert_close(loss, torch.tensor(math.log(S)), atol=1e-5, rtol=0)


@needs_kernel
def test_no_gradient_to_the_teacher():
    s, t, k = inputs(1, 2, 3, 5, 4)
    s.requires_grad_()
    t.requires_grad_()
    k.requires_grad_()
    transport_loss(s, t, k).backward()
    assert s.grad is not None and t.grad is None and k.grad is None


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 2, 1, 1, 1), (1, 2, 3, 1, 2), (2, 2, 1, 6, 1), (1, 3, 2, 4, 1)])
def test_size_one_dims(shape):
    compare(shape, torch.float64)


@needs_kernel
@pytest.mark.parametrize("shape", [(0, 3, 4, 5, 6), (2, 3, 4, 0, 6), (2, 3, 0, 5, 6)])
def test_empty_dims(shape):
    s, t, k = inputs(*shape)
    s.requires_grad_()
    got = transport_loss(s, t, k)
    want = transport_loss_reference(s, t, k)
    torch.testing.assert_close(got, want, equal_nan=True)
    got.backward()
    assert s.grad.shape == s.shape


@needs_kernel
def test_non_contiguous_inputs():
    s, t, k = inputs(2, 3, 4, 10, 6)
    s2 = s.transpose(2, 3).contiguous().transpose(2, 3)
    k2 = k.transpose(2, 3).contiguous().transpose(2, 3)
    assert not s2.is_contiguous() and not k2.is_contiguous()
    torch.testing.assert_close(transport_loss(s2, t, k2), transport_loss_reference(s, t, k), rtol=1e-10, atol=1e-12)


@needs_kernel
def test_gradcheck_float64():
    s, t, k = inputs(1, 3, 3, 4, 3)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: transport_loss(x, t, k, 0.3, 4), (s,))


@needs_kernel
def test_opcheck():
    s, t, k = inputs(2, 3, 4, 5, 6, dtype=torch.float32)
    s.requires_grad_()
    torch.library.opcheck(torch.ops.smtc_fast.transport_loss.default, (s, t, k, 0.05, 3, "norm", "one_minus_cos"))
    torch.library.opcheck(torch.ops.smtc_fast.transport_loss.default, (s, t, k, 0.2, 0, "uniform", "neg_cos"))


@needs_kernel
def test_torch_compile_fullgraph():
    s, t, k = inputs(2, 3, 4, 6, 5, dtype=torch.float32)
    s.requires_grad_()
    compiled = torch.compile(lambda a, b, c: transport_loss(a, b, c), fullgraph=True, backend="eager")
    got = compiled(s, t, k)
    (g,) = torch.autograd.grad(got, s)
    assert kernel_ran(lambda: compiled(s, t, k))
    want = transport_loss_reference(s, t, k)
    assert_close_to_reference(got, want)
    assert_close_to_reference(g, torch.autograd.grad(want, s)[0], atol=1e-6)


@needs_kernel
def test_forced_reference_equals_kernel(monkeypatch):
    s, t, k = inputs(2, 3, 4, 8, 5, dtype=torch.float32)
    kernel = transport_loss(s, t, k)
    monkeypatch.setenv("SMTC_FAST_FORCE_REFERENCE", "1")
    assert not kernel_ran(lambda: transport_loss(s, t, k))
    assert_close_to_reference(transport_loss(s, t, k), kernel)


@pytest.mark.parametrize("device", DEVICES)
def test_semantic_loss_uses_the_op_and_keeps_its_options(device):
    s, t, k = inputs(2, 3, 4, 9, 5, dtype=torch.float32, device=device)
    for marginals, cost, eps, iters in [("norm", "one_minus_cos", 0.05, 3), ("uniform", "neg_cos", 0.1, 5)]:
        got = semantic_loss(s, t, k, eps, iters, marginals, cost)
        assert_close_to_reference(got, transport_loss_reference(s, t, k, eps, iters, marginals, cost))
    if HAS_KERNEL:  # the CPU kernel, or the CUDA kernel (also the execution tier's, under an emulated device)
        assert kernel_ran(lambda: semantic_loss(s, t, k))
    # bf16 inputs are computed in float32, as before (the keys go to the op as bf16: it widens them exactly)
    got = semantic_loss(s.bfloat16(), t.bfloat16(), k.bfloat16())
    want = transport_loss_reference(s.bfloat16().float(), t.bfloat16().float(), k.bfloat16().float())
    assert got.dtype == torch.float32
    assert_close_to_reference(got, want)


@pytest.mark.parametrize("kwargs, match", [
    (dict(student_logits=torch.rand(2, 3, 4)), "student_logits must be 4-D"),
    (dict(teacher_logits=torch.rand(2, 3, 4, 6)), "teacher_logits .* must match"),
    (dict(teacher_keys=torch.rand(2, 3, 6, 7)), "teacher_keys must be"),
    (dict(teacher_keys=torch.rand(2, 3, 5, 7).double()), "dtype of student_logits"),
    (dict(teacher_keys=torch.rand(2, 3, 5, 7).half()), "dtype of student_logits"),
    (dict(student_logits=torch.rand(2, 3, 4, 5).double(), teacher_logits=torch.rand(2, 3, 4, 5).double(),
          teacher_keys=torch.rand(2, 3, 5, 7).bfloat16()), "dtype of student_logits"),
    (dict(teacher_logits=torch.rand(2, 3, 4, 5, device="meta")), "same device"),
    (dict(student_logits=torch.randint(0, 3, (2, 3, 4, 5))), "floating-point"),
    (dict(eps=0.0), "eps must be"),
    (dict(eps=float("inf")), "eps must be"),
    (dict(iters=-1), "iters must be"),
    (dict(iters=1.5), "iters must be"),
    (dict(marginals="l2"), "marginals must be"),
    (dict(cost="cos"), "cost must be"),
])
def test_bad_input(kwargs, match):
    args = dict(student_logits=torch.rand(2, 3, 4, 5), teacher_logits=torch.rand(2, 3, 4, 5),
                teacher_keys=torch.rand(2, 3, 5, 7))
    args.update(kwargs)
    with pytest.raises((ValueError, RuntimeError, TypeError), match=match):
        transport_loss(**args)


def test_one_frame_is_rejected():
    with pytest.raises(ValueError, match="at least 2 frames"):
        transport_loss(torch.rand(2, 1, 4, 5), torch.rand(2, 1, 4, 5), torch.rand(2, 1, 5, 7))


@needs_kernel
def test_cpp_op_validates_too():
    s, t, k = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5), torch.rand(2, 3, 5, 7)
    with pytest.raises(RuntimeError, match="eps must be"):
        torch.ops.smtc_fast.transport_loss(s, t, k, -1.0, 3, "norm", "one_minus_cos")
    with pytest.raises(RuntimeError, match="marginals must be"):
        torch.ops.smtc_fast.transport_loss(s, t, k, 0.05, 3, "l1", "one_minus_cos")
    with pytest.raises(RuntimeError, match="tokens n"):
        torch.ops.smtc_fast.transport_loss(s, t, torch.rand(2, 3, 6, 7), 0.05, 3, "norm", "one_minus_cos")
    with pytest.raises(RuntimeError, match="at least 2 frames"):
        torch.ops.smtc_fast.transport_loss(s[:, :1], t[:, :1], k[:, :1], 0.05, 3, "norm", "one_minus_cos")
    with pytest.raises(RuntimeError, match="targets must have the shape"):
        torch.ops.smtc_fast._transport_loss_backward(torch.ones(()), s, torch.rand(2, 3, 4, 6))
    with pytest.raises(RuntimeError, match="dtype of student_logits"):
        torch.ops.smtc_fast.transport_loss(s, t, k.half(), 0.05, 3, "norm", "one_minus_cos")


def check_bf16_keys(shape, device):
    """Keys from a bf16 forward (--amp) go to the op as bf16 with float32 logits. Each product of two bf16 numbers
    is exact in float32, so the CPU kernel's bf16 GEMM with float32 accumulation (cpublas::brgemm on AMX) must give
    what the float32 path gives on the widened keys, and both must be as close to the float64 truth."""
    s, t, k = inputs(*shape, dtype=torch.float32, device=device)
    kb = k.bfloat16()
    s.requires_grad_()
    got = _cuda_kernel_ran(device, lambda: transport_loss(s, t, kb))
    (g_got,) = torch.autograd.grad(got, s)
    assert got.dtype == g_got.dtype == torch.float32
    if device == "cpu":
        assert kernel_ran(lambda: transport_loss(s, t, kb))
    want = transport_loss(s, t, kb.float())  # the float32 path on the same values
    (g_want,) = torch.autograd.grad(want, s)
    assert_close_to_reference(got, want)
    scale = g_want.abs().max().item()
    assert_close_to_reference(g_got / scale, g_want / scale, atol=1e-5)
    s64 = s.detach().double().requires_grad_()
    truth = transport_loss_reference(s64, t.double(), kb.double())
    (g_truth,) = torch.autograd.grad(truth, s64)
    err_bf16 = (g_got.double() - g_truth).abs().max().item()
    err_f32 = (g_want.double() - g_truth).abs().max().item()
    assert err_bf16 <= 4 * err_f32 + 1e-12 * scale, (err_bf16, err_f32)
    assert_close_to_reference(transport_loss_reference(s, t, kb), want)  # the reference widens them too


@needs_kernel
@pytest.mark.parametrize("shape", [
    (3, 4, 16, 256, 384),  # SMTC's per-clip shape: D a multiple of 32, the AMX GEMM (where the CPU has AMX)
    (2, 3, 5, 37, 64),     # odd n
    (1, 5, 3, 70, 32),     # five frames
    (2, 3, 4, 20, 48),     # D not a multiple of 32: the keys are widened to float32 first
])
def test_bf16_keys_are_computed_on_their_float32_values(shape):
    check_bf16_keys(shape, "cpu")


@needs_kernel
def test_bf16_keys_log_domain_fallback():
    """The fallback recomputes the pair's cosines from the keys: from the bf16 ones too. As in
    test_log_domain_fallback, 3 non-zero dims (cosines spread over [-1, 1]) and eps 0.01 send pairs there; D = 32
    keeps the AMX GEMM for the rest."""
    s, t, k3 = inputs(2, 3, 4, 12, 3, dtype=torch.float32)
    k = torch.zeros(2, 3, 12, 32)
    k[..., :3] = k3
    k = k.bfloat16()
    s.requires_grad_()
    got = transport_loss(s, t, k, 0.01, 4)
    want = transport_loss_reference(s, t, k, 0.01, 4)
    assert torch.isfinite(got)
    assert_close_to_reference(got, want, rtol=1e-4)
    torch.testing.assert_close(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], rtol=1e-4,
                               atol=1e-7)


# ---- The CUDA kernel (csrc/transport_loss/transport_loss_cuda.cu): a real GPU, and the CPU execution tier under two
# schedules. Emulated shapes stay small (n <= 64, D <= 32): every CUDA thread is a fiber on the CPU.

def _emu_launches(device):
    return _extension._C.emu_launch_count() if isinstance(device, EmuDevice) else 0


def _cuda_kernel_ran(device, fn):
    """Runs fn(); on the emulated device, asserts that the emulated CUDA kernels served it."""
    before = _emu_launches(device)
    out = fn()
    if isinstance(device, EmuDevice):
        assert _extension._C.emu_launch_count() > before, "the emulated CUDA kernel did not run"
    return out


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("marginals, cost, iters", [("norm", "one_minus_cos", 3), ("uniform", "neg_cos", 1),
                                                    ("norm", "neg_cos", 0), ("uniform", "one_minus_cos", 5)])
def test_cuda_kernel_equals_reference(device, dtype, marginals, cost, iters):
    _cuda_kernel_ran(device, lambda: compare((2, 3, 5, 24, 16), dtype, 0.05, iters, marginals, cost, device=device))


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 24, 32), (2, 3, 4, 20, 12)])
def test_cuda_kernel_bf16_keys(device, shape):
    """The CUDA wrapper widens bf16 keys to the logits' float32 (its GEMMs are float32)."""
    check_bf16_keys(shape, device)


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 2, 3, 7, 5), (2, 5, 2, 9, 3), (3, 4, 16, 33, 8), (1, 3, 4, 64, 32),
                                   (2, 2, 1, 1, 1), (1, 3, 2, 40, 1), (5, 3, 2, 30, 4)])
def test_cuda_kernel_odd_shapes_and_frame_counts(device, dtype, shape):
    """T = 2..5, n and D off the warp size, size-1 dims. Under the execution tier (a small chunk budget,
    transport_loss_cuda_ops.cpp) (3, 4, 16, 33, 8) runs in three chunks of one clip and (5, 3, 2, 30, 4) in chunks
    of 3 + 2 clips."""
    _cuda_kernel_ran(device, lambda: compare(shape, dtype, eps=0.1, iters=3, device=device))


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5, 6), (2, 3, 4, 0, 6), (2, 3, 0, 5, 6)])
def test_cuda_kernel_empty_dims(device, shape):
    s, t, k = inputs(*shape, device=device)
    s.requires_grad_()
    got = transport_loss(s, t, k)
    torch.testing.assert_close(got, transport_loss_reference(s, t, k), equal_nan=True)
    got.backward()
    assert s.grad.shape == s.shape


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_kernel_zero_keys_and_repeated_frames(device):
    s, t, k = inputs(2, 3, 4, 16, 8, device=device)
    k = k.clone()
    k[0, 1, 3] = 0.0
    k[1, 1] = k[1, 0]
    k[1, 2] = k[1, 0]
    s.requires_grad_()
    got = _cuda_kernel_ran(device, lambda: transport_loss(s, t, k))
    want = transport_loss_reference(s, t, k)
    assert_close_to_reference(got, want)
    assert_close_to_reference(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0])


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_domain_fallback(device, dtype):
    """Tiny eps: rows of K underflow, the scalings leave the bounds of transport_loss.h (the probability-domain
    iterations alone give NaN here) and the kernel solves such pairs again in the log domain (transport_loss_cpu.cpp;
    on CUDA the pair's block); loss and gradient must equal the reference's log-domain path."""
    eps = 0.002 if dtype == torch.float64 else 0.01
    s, t, k = inputs(2, 3, 4, 12, 3, dtype=dtype, device=device)  # D = 3: cosines spread over [-1, 1]
    s.requires_grad_()
    got = _cuda_kernel_ran(device, lambda: transport_loss(s, t, k, eps, 4))
    want = transport_loss_reference(s, t, k, eps, 4)
    assert torch.isfinite(got)
    assert_close_to_reference(got, want, rtol=1e-9 if dtype == torch.float64 else 1e-4)
    (g_got,) = torch.autograd.grad(got, s)
    (g_want,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9 if dtype == torch.float64 else 1e-4, atol=1e-7)


@pytest.mark.cuda_emu
@pytest.mark.skipif(not smtc_fast.build_info()["cuda_emu"], reason="the CUDA execution tier is not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [0.05, 0.003])  # 0.003: pairs solved by the log-domain fallback too
def test_cuda_kernel_bitwise_identical_across_schedules(monkeypatch, dtype, eps):
    """Fixed-order reductions, no atomics: loss, targets and gradient are the same bits under every thread order."""
    from smtc_fast.ops import _common

    s, t, k = inputs(3, 4, 5, 33, 8, dtype=dtype)
    results = []
    with _common.emulated_cuda():
        for schedule in ("forward", "reverse", "random:3", "random:11"):
            monkeypatch.setenv("SMTC_FAST_EMU_SCHEDULE", schedule)
            loss, targets = torch.ops.smtc_fast_cuda_emu.transport_loss(s, t, k, eps, 3, "norm", "one_minus_cos")
            assert torch.isfinite(loss)
            grad = torch.ops.smtc_fast_cuda_emu._transport_loss_backward(torch.ones((), dtype=dtype), s, targets)
            results.append((loss, targets, grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_cuda_kernel_opcheck_and_compile(device):
    """The registered fake and autograd of the CUDA kernel's namespace (torch.ops.smtc_fast on a GPU,
    torch.ops.smtc_fast_cuda_emu under the execution tier)."""
    from smtc_fast.ops._common import kernel_ops

    s, t, k = inputs(2, 3, 4, 6, 5, dtype=torch.float32, device=device)
    s.requires_grad_()
    op = kernel_ops(s).transport_loss.default
    torch.library.opcheck(op, (s, t, k, 0.05, 3, "norm", "one_minus_cos"))
    torch.library.opcheck(op, (s, t, k, 0.2, 0, "uniform", "neg_cos"))
    compiled = torch.compile(lambda a, b, c: transport_loss(a, b, c), fullgraph=True, backend="eager")
    got = _cuda_kernel_ran(device, lambda: compiled(s, t, k))
    want = transport_loss_reference(s, t, k)
    assert_close_to_reference(got, want)
    assert_close_to_reference(torch.autograd.grad(got, s)[0], torch.autograd.grad(want, s)[0], atol=1e-6)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda)])
def test_cuda_kernel_official_shape(device):
    """SMTC's per-clip shape (T 4, S 16, n 256, D 384) on a GPU (too large for the execution tier), float32 with
    torch's default (no TF32) matmul precision."""
    compare((3, 4, 16, 256, 384), torch.float32, device=device)
