"""Batched entropic optimal transport, Sinkhorn iterations in the log domain.

    sinkhorn(cost, log_mu=None, log_nu=None, eps=0.05, iters=3, tol=None, return_potentials=False)
        -> plan (B, N, M)   or   (plan, f (B, N), g (B, M))

    cost    (B, N, M)  float
    log_mu  (B, N)     log of the source weights, used as given (uniform -log N when None)
    log_nu  (B, M)     log of the target weights (uniform -log M when None)
    eps     > 0        entropic regularisation, in the units of the cost
    iters   >= 0       number of (f, g) updates
    tol     None or >= 0: a problem stops early once the L1 error of its row marginals is below tol
            (checked after every iteration; problems stop independently).

Potentials start at g = 0 and each iteration does
    f_n = eps*log_mu_n - eps*LSE_m((g_m - C_nm)/eps)
    g_m = eps*log_nu_m - eps*LSE_n((f_n - C_nm)/eps)
    plan_nm = exp((f_n + g_m - C_nm)/eps)
which is the probability-domain iteration a = mu/(K b), b = nu/(K^T a) with K = exp(-C/eps), b = 1 at the
start, f = eps log a, g = eps log b, written so that it never under- or overflows. With SMTC's settings
(spec §2.1: eps 0.05, 3 iterations, cost 1 - cosine, marginals = L1 norms of the L2-normalised keys, each
renormalised to sum 1) the plan equals the official `sinkhorn_cluster` to float precision.

Backward: the exact gradient of (plan, f, g) w.r.t. the cost for the map actually run (the fixed iteration
count, or each problem's iterations until it met `tol`), i.e. what autograd through the reference gives.
The marginals are not differentiated.
"""
import math

import torch

from smtc_fast.ops._common import NAMESPACES, autocast_inputs, check_same, check_tensor, kernel_ops, use_kernel

KERNEL_CPU_DTYPES = (torch.float32, torch.float64)
KERNEL_CUDA_DTYPES = (torch.float32, torch.float64)


def _check(cost, log_mu, log_nu, eps, iters, tol):
    check_tensor("cost", cost, 3)
    B, N, M = cost.shape
    for name, lw, n in (("log_mu", log_mu, N), ("log_nu", log_nu, M)):
        if lw is None:
            continue
        check_tensor(name, lw, 2)
        check_same("cost", cost, name, lw)
        if tuple(lw.shape) != (B, n):
            raise ValueError(f"{name} must have shape {(B, n)} to match cost {tuple(cost.shape)}, "
                             f"got {tuple(lw.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0):
        raise ValueError(f"tol must be None or a number >= 0, got {tol!r}")


def _uniform(cost, log_mu, log_nu):
    B, N, M = cost.shape
    if log_mu is None:
        log_mu = cost.new_full((B, N), -math.log(N) if N else 0.0)
    if log_nu is None:
        log_nu = cost.new_full((B, M), -math.log(M) if M else 0.0)
    return log_mu, log_nu


def sinkhorn_reference(cost, log_mu=None, log_nu=None, eps=0.05, iters=3, tol=None, return_potentials=False):
    """Pure-PyTorch reference of `sinkhorn` (same signature and results); the op's specification."""
    _check(cost, log_mu, log_nu, eps, iters, tol)
    log_mu, log_nu = _uniform(cost, log_mu, log_nu)
    B, N, M = cost.shape
    f = cost.new_zeros((B, N))
    g = cost.new_zeros((B, M))
    active = torch.ones(B, dtype=torch.bool, device=cost.device)
    for _ in range(iters):
        f_new = eps * log_mu - eps * torch.logsumexp((g[:, None, :] - cost) / eps, dim=2)
        g_new = eps * log_nu - eps * torch.logsumexp((f_new[:, :, None] - cost) / eps, dim=1)
        if tol is None:
            f, g = f_new, g_new
            continue
        f = torch.where(active[:, None], f_new, f)
        g = torch.where(active[:, None], g_new, g)
        rows = torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps).sum(dim=2)  # (B, N)
        err = (rows - log_mu.exp()).abs().sum(dim=1)
        active = active & ~(err < tol)
        if not bool(active.any()):
            break
    plan = torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps)
    return (plan, f, g) if return_potentials else plan


def sinkhorn(cost, log_mu=None, log_nu=None, eps=0.05, iters=3, tol=None, return_potentials=False):
    """Batched log-domain Sinkhorn (see the module docstring). Differentiable w.r.t. cost.
    Under CPU autocast, bf16 inputs run the float32 kernel (ops._common.autocast_inputs)."""
    cost, log_mu, log_nu = autocast_inputs(cost, log_mu, log_nu)
    _check(cost, log_mu, log_nu, eps, iters, tol)
    if not use_kernel(cost, {"cpu": KERNEL_CPU_DTYPES, "cuda": KERNEL_CUDA_DTYPES}):
        return sinkhorn_reference(cost, log_mu, log_nu, eps, iters, tol, return_potentials)
    log_mu, log_nu = _uniform(cost, log_mu, log_nu)
    plan, f, g = kernel_ops(cost).sinkhorn(cost, log_mu, log_nu, float(eps), int(iters),
                                           None if tol is None else float(tol))
    return (plan, f, g) if return_potentials else plan


def _register(ns):
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::sinkhorn")
    def _sinkhorn_fake(cost, log_mu, log_nu, eps, iters, tol):
        _check(cost, log_mu, log_nu, eps, iters, tol)
        B, N, M = cost.shape
        return torch.empty_like(cost), cost.new_empty((B, N)), cost.new_empty((B, M))

    @torch.library.register_fake(f"{ns}::_sinkhorn_backward")
    def _sinkhorn_backward_fake(grad_plan, grad_f, grad_g, cost, log_mu, log_nu, eps, iters, tol):
        _check(cost, log_mu, log_nu, eps, iters, tol)
        for name, t in (("grad_plan", grad_plan), ("grad_f", grad_f), ("grad_g", grad_g)):
            check_same(name, t, "cost", cost)
        return torch.empty_like(cost)

    def _setup_context(ctx, inputs, output):
        cost, log_mu, log_nu, eps, iters, tol = inputs
        ctx.save_for_backward(cost, log_mu, log_nu)
        ctx.args = (eps, iters, tol)

    def _backward(ctx, grad_plan, grad_f, grad_g):
        cost, log_mu, log_nu = ctx.saved_tensors
        B, N, M = cost.shape
        grad_plan = torch.zeros_like(cost) if grad_plan is None else grad_plan.contiguous()
        grad_f = cost.new_zeros((B, N)) if grad_f is None else grad_f.contiguous()
        grad_g = cost.new_zeros((B, M)) if grad_g is None else grad_g.contiguous()
        grad_cost = ops._sinkhorn_backward(grad_plan, grad_f, grad_g, cost, log_mu, log_nu, *ctx.args)
        return grad_cost, None, None, None, None, None

    torch.library.register_autograd(f"{ns}::sinkhorn", _backward, setup_context=_setup_context)


for _ns in NAMESPACES:
    _register(_ns)
