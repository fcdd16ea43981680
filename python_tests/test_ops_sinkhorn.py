"""smtc_fast.ops.sinkhorn: the official probability-domain iteration, scipy logsumexp, kernel vs reference."""
import math

import numpy as np
import pytest
import scipy.special
import torch
import torch.nn.functional as F

import smtc_fast
from smtc_fast.ops import sinkhorn, sinkhorn_reference
from smtc_fast.testing import assert_close_to_reference, kernel_ran

from conftest import DEVICES

HAS_KERNEL = smtc_fast.build_info()["cpu_kernels"]


def official_sinkhorn(M, mu, nu, eps=0.05, iters=3):
    """The official `sinkhorn_cluster` (spec §2.1): K = exp(-M/eps), b = 1, a = mu/(K b), b = nu/(K^T a)."""
    K = torch.exp(-M / eps)
    b = torch.ones_like(nu)
    for _ in range(iters):
        a = mu / (K @ b[..., None])[..., 0]
        b = nu / (K.transpose(-1, -2) @ a[..., None])[..., 0]
    return a[..., :, None] * K * b[..., None, :]


def smtc_inputs(B, N, M, D=24, dtype=torch.float64, device="cpu"):
    """SMTC's transport problem (spec §2.1): cost 1 - cos of keys, marginals = L1 norm of L2-normalised keys."""
    fi = F.normalize(torch.randn(B, N, D, dtype=dtype, device=device), dim=-1)
    fj = F.normalize(torch.randn(B, M, D, dtype=dtype, device=device), dim=-1)
    cost = 1 - fi @ fj.transpose(1, 2)
    mu = fi.abs().sum(-1)
    nu = fj.abs().sum(-1)
    mu, nu = mu / mu.sum(-1, keepdim=True), nu / nu.sum(-1, keepdim=True)
    return cost, mu, nu


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_equals_official_probability_domain(dtype):
    cost, mu, nu = smtc_inputs(6, 64, 48, dtype=dtype)
    plan = sinkhorn_reference(cost, mu.log(), nu.log(), eps=0.05, iters=3)
    official = official_sinkhorn(cost, mu, nu, 0.05, 3)
    tol = dict(rtol=1e-10, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(plan, official, **tol)
    torch.testing.assert_close(plan.sum(1), nu, **tol)  # columns exact after the last g update


def test_reference_equals_scipy_loops():
    rng = np.random.default_rng(0)
    C = rng.random((2, 5, 4))
    lmu, lnu = np.log(rng.dirichlet(np.ones(5), 2)), np.log(rng.dirichlet(np.ones(4), 2))
    eps, iters = 0.3, 4
    for b in range(2):
        f, g = np.zeros(5), np.zeros(4)
        for _ in range(iters):
            f = np.array([eps * lmu[b, n] - eps * scipy.special.logsumexp((g - C[b, n]) / eps) for n in range(5)])
            g = np.array([eps * lnu[b, m] - eps * scipy.special.logsumexp((f - C[b, :, m]) / eps) for m in range(4)])
        plan = np.exp((f[:, None] + g[None, :] - C[b]) / eps)
        ref, rf, rg = sinkhorn_reference(torch.tensor(C), torch.tensor(lmu), torch.tensor(lnu), eps, iters,
                                         return_potentials=True)
        np.testing.assert_allclose(ref[b].numpy(), plan, rtol=1e-12)
        np.testing.assert_allclose(rf[b].numpy(), f, rtol=1e-12, atol=1e-14)


def test_converges_to_marginals_with_tol():
    cost, mu, nu = smtc_inputs(3, 20, 30)
    plan = sinkhorn_reference(cost, mu.log(), nu.log(), eps=0.1, iters=500, tol=1e-9)
    torch.testing.assert_close(plan.sum(2), mu, atol=1e-8, rtol=0)
    torch.testing.assert_close(plan.sum(1), nu, atol=1e-12, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, iters, tol", [((4, 256, 256), 3, None), ((3, 7 * 9, 50), 5, None),
                                              ((5, 30, 40), 50, 1e-4), ((1, 1, 1), 3, None), ((2, 3, 9), 0, None)])
def test_forward_backward_match_reference(device, dtype, shape, iters, tol):
    cost, mu, nu = smtc_inputs(*shape, dtype=dtype, device=device)
    cost.requires_grad_()
    with kernel_ran(device, "sinkhorn", "_sinkhorn_backward"):
        out = sinkhorn(cost, mu.log(), nu.log(), eps=0.05, iters=iters, tol=tol, return_potentials=True)
        gp, gf, gg = torch.randn_like(out[0]), torch.randn_like(out[1]), torch.randn_like(out[2])
        (grad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, (gp, gf, gg))), cost)
    ref = sinkhorn_reference(cost, mu.log(), nu.log(), eps=0.05, iters=iters, tol=tol, return_potentials=True)
    for o, r in zip(out, ref):
        assert_close_to_reference(o, r, atol=1e-5 if dtype == torch.float32 else 1e-12)
    (rgrad,) = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref, (gp, gf, gg))), cost)
    scale = rgrad.abs().max().item() + 1e-30
    assert_close_to_reference(grad / scale, rgrad / scale, atol=1e-4 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_official_float32_at_smtc_settings(device):
    cost, mu, nu = smtc_inputs(12, 256, 256, D=64, dtype=torch.float32, device=device)
    plan = sinkhorn(cost, mu.log(), nu.log())
    official = official_sinkhorn(cost, mu, nu)
    torch.testing.assert_close(plan, official, rtol=1e-4, atol=1e-10)


def assert_plan_and_potentials_match_reference(cost, lmu, lnu, **kwargs):
    """The kernel's plan and potentials against the reference's, at the dtype's tolerance; the potentials carry
    the cost's units (and its rounding), so their tolerance scales with the largest finite cost."""
    out = sinkhorn(cost, lmu, lnu, eps=0.05, return_potentials=True, **kwargs)
    ref = sinkhorn_reference(cost, lmu, lnu, eps=0.05, return_potentials=True, **kwargs)
    assert torch.isfinite(out[0]).all()
    atol = 1e-5 if cost.dtype == torch.float32 else 1e-12
    assert_close_to_reference(out[0], ref[0], atol=atol)
    scale = cost[cost.isfinite()].abs().max().item()
    for o, r in zip(out[1:], ref[1:]):
        assert_close_to_reference(o, r, atol=atol * scale)


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tol", [None, 1e-3])
def test_scaling_form_and_log_domain_fallback_in_one_batch(dtype, tol):
    """The CPU kernel solves a problem in the scaling form while its scalings stay bounded and reruns it in the
    log domain otherwise (sinkhorn_cpu.cpp); a batch mixing both, with forbidden (+inf) pairs and zero-mass
    rows, must still equal the reference problem by problem."""
    cost, mu, nu = smtc_inputs(6, 40, 30, dtype=dtype)
    cost = cost.clone()
    cost[1] *= 1e3 if dtype == torch.float64 else 40  # exp(-cost/eps) underflows: the log domain must take over
    cost[2, :20, :5] = math.inf                        # forbidden pairs
    lmu = mu.log()
    lmu[3, 7] = -math.inf                              # rows with no mass
    lmu[4, :3] = -math.inf
    assert_plan_and_potentials_match_reference(cost, lmu, nu.log(), iters=20, tol=tol)


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_redone_with_their_minimum(dtype):
    """The CPU kernel's first pass takes E = exp(-C/eps) for a row whose costs are >= 0 and whose sum and scaling
    stay bounded, and redoes any other row shifted by its minimum cost (sinkhorn_cpu.cpp, first_pass_impl).
    Rows of both kinds in one problem, and problems of each kind, must equal the reference."""
    cost, mu, nu = smtc_inputs(4, 37, 30, dtype=dtype)  # M = 30: the vector loop's remainder runs too
    cost = cost.clone()
    cost[0, :5] -= 3.0    # negative costs: exp(-C/eps) would overflow
    cost[1, 2:4] += 20.0  # rows far from every column: exp(-C/eps) underflows, or u_n = mu_n / sum is huge
    cost[2] += 20.0       # every row shifted
    cost[3, 7] = -cost[3, 7]  # one row of negative costs in an otherwise ordinary problem
    assert_plan_and_potentials_match_reference(cost, mu.log(), nu.log(), iters=3)


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_default_and_zero_mass(device):
    cost = torch.rand(2, 6, 5, device=device)
    torch.testing.assert_close(sinkhorn(cost), sinkhorn_reference(cost))
    lmu = torch.full((2, 6), -math.log(5), device=device)
    lmu[:, 0] = -math.inf  # a row with no mass gets an all-zero plan row, not NaN
    plan = sinkhorn(cost, lmu, None, eps=0.2, iters=10)
    assert torch.isfinite(plan).all() and torch.all(plan[:, 0] == 0)
    torch.testing.assert_close(plan, sinkhorn_reference(cost, lmu, None, eps=0.2, iters=10))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_non_contiguous(device):
    for shape in [(0, 4, 5), (2, 0, 5), (2, 4, 0)]:
        assert sinkhorn(torch.rand(shape, device=device)).shape == shape
    cost = torch.rand(3, 9, 7, device=device).transpose(1, 2)
    torch.testing.assert_close(sinkhorn(cost, iters=4), sinkhorn_reference(cost.contiguous(), iters=4))


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
@pytest.mark.parametrize("tol", [None, 1e-3])
def test_gradcheck_float64(tol):
    cost = torch.rand(2, 4, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda c: sinkhorn(c, eps=0.3, iters=6, tol=tol, return_potentials=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (cost,))


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_opcheck():
    cost = torch.rand(2, 4, 3, requires_grad=True)
    lmu, lnu = torch.full((2, 4), -math.log(4)), torch.full((2, 3), -math.log(3))
    torch.library.opcheck(torch.ops.smtc_fast.sinkhorn.default, (cost, lmu, lnu, 0.1, 3, None))
    torch.library.opcheck(torch.ops.smtc_fast.sinkhorn.default, (cost, lmu, lnu, 0.1, 3, 1e-3))


def test_torch_compile_fullgraph():
    cost = torch.rand(2, 6, 5)
    compiled = torch.compile(lambda c: sinkhorn(c, iters=3), fullgraph=True, backend="eager")
    compiled(cost)  # traced here: the graph, not the tracing, must call the kernel below
    with kernel_ran("cpu", "sinkhorn"):
        plan = compiled(cost)
    torch.testing.assert_close(plan, sinkhorn_reference(cost, iters=3))


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_forced_reference_equals_kernel(monkeypatch):
    cost, mu, nu = smtc_inputs(4, 32, 24, dtype=torch.float32)
    kernel = sinkhorn(cost, mu.log(), nu.log())
    monkeypatch.setenv("SMTC_FAST_FORCE_REFERENCE", "1")
    torch.testing.assert_close(sinkhorn(cost, mu.log(), nu.log()), kernel, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cost=torch.rand(4, 5)), "cost must be 3-D"),
    (dict(cost=torch.rand(2, 4, 5), eps=-0.1), "eps must be"),
    (dict(cost=torch.rand(2, 4, 5), eps=0.0), "eps must be"),
    (dict(cost=torch.rand(2, 4, 5), eps=float("nan")), "eps must be"),
    (dict(cost=torch.rand(2, 4, 5), iters=-1), "iters must be"),
    (dict(cost=torch.rand(2, 4, 5), iters=2.5), "iters must be"),
    (dict(cost=torch.rand(2, 4, 5), tol=-1.0), "tol must be"),
    (dict(cost=torch.rand(2, 4, 5), log_mu=torch.zeros(2, 5)), "log_mu must have shape"),
    (dict(cost=torch.rand(2, 4, 5), log_nu=torch.zeros(3, 5)), "log_nu must have shape"),
    (dict(cost=torch.rand(2, 4, 5), log_mu=torch.zeros(2, 4).double()), "same dtype"),
    (dict(cost=torch.rand(2, 4, 5), log_mu=torch.zeros(2, 4, device="meta")), "same device"),
])
def test_bad_input(kwargs, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        sinkhorn(**kwargs)


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_cpp_op_validates_too():
    with pytest.raises(RuntimeError, match="eps must be"):
        torch.ops.smtc_fast.sinkhorn(torch.rand(2, 3, 4), torch.zeros(2, 3), torch.zeros(2, 4), -1.0, 3, None)
