"""L_sem as one fused op: the transport-weighted cross-entropy of SMTC (spec §2.1, paper Eq. 9).

    transport_loss(student_logits, teacher_logits, teacher_keys, eps=0.05, iters=3, marginals="norm",
                   cost="one_minus_cos") -> loss ()

    student_logits  (B, T, S, n)  float; the only input that gets a gradient
    teacher_logits  (B, T, S, n)  same dtype; p_t = softmax over S (no gradient, as in the official code)
    teacher_keys    (B, T, n, D)  same dtype, or bfloat16 with float32 logits; the teacher's un-fused keys (both
                                  sides of the cost). bf16 keys (from a bf16 forward) are computed on as float32
                                  values; their products are exact in float32, and the CPU kernel forms them on
                                  AMX (csrc/transport_loss/transport_loss_cpu.cpp, pack_vnni)
    eps > 0, iters >= 0           the Sinkhorn's entropic regularisation and iteration count (official 0.05, 3)
    marginals  "norm"    official: mu[a] = ||f_hat[a]||_1 of the L2-normalised key, renormalised to sum 1
               "uniform" paper Eq. 8: 1/n
    cost       "one_minus_cos" official: 1 - cos;  "neg_cos" paper Eq. 8: -cos

Over all ordered frame pairs i != j of each clip, with the official probability-domain Sinkhorn plan_ij
(K = exp(-C/eps), b = 1, `iters` times a = mu_i/(K b), b = mu_j/(K^T a), plan = diag(a) K diag(b)):
    L = mean_{B x pairs} sum_{a, b} -plan_ij[a, b] sum_s p_t_j[s, b] log(p_s_i[s, a] + 1e-8)

The reference below is the path `semantic_loss` took before this op (costs, plans and the cross matrix as
(B*T*(T-1), n, n) tensors, through the `correlation` and `sinkhorn` ops), run in the inputs' dtype. The kernels
(csrc/transport_loss/: the CPU kernel, and the CUDA kernel with cuBLAS for its GEMMs) compute the same numbers
without materialising any of those tensors: per unordered pair one kernel matrix serves both orientations, and only
targets = sum_j plan_ij @ p_t_j^T (B, T, S, n) is kept for the backward. For iters >= 1 the two cost options give
the same plan (a constant shift of the cost only rescales K and a), so they differ only in rounding.
"""
import math

import torch
import torch.nn.functional as F

from smtc_fast.ops._common import NAMESPACES, check_same, check_tensor, kernel_ops, use_kernel
from smtc_fast.ops.correlation import correlation
from smtc_fast.ops.sinkhorn import sinkhorn

# CUDA: csrc/transport_loss/transport_loss_cuda.cu (half/bf16 inputs are computed in float32 by semantic_loss).
KERNEL_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)}


def _check(student_logits, teacher_logits, teacher_keys, eps, iters, marginals, cost):
    check_tensor("student_logits", student_logits, 4)
    check_tensor("teacher_logits", teacher_logits, 4)
    check_tensor("teacher_keys", teacher_keys, 4)
    check_same("student_logits", student_logits, "teacher_logits", teacher_logits)
    check_same("student_logits", student_logits, "teacher_keys", teacher_keys, dtype=False)
    if teacher_keys.dtype != student_logits.dtype and not (teacher_keys.dtype == torch.bfloat16
                                                           and student_logits.dtype == torch.float32):
        raise ValueError("teacher_keys must have the dtype of student_logits (or be bfloat16 with float32 logits), "
                         f"got {teacher_keys.dtype} and {student_logits.dtype}")
    B, T, S, n = student_logits.shape
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must match student_logits "
                         f"{tuple(student_logits.shape)}")
    if teacher_keys.shape[:3] != (B, T, n):
        raise ValueError(f"teacher_keys must be (B, T, n, D) = ({B}, {T}, {n}, D), got {tuple(teacher_keys.shape)}")
    if T < 2:
        raise ValueError(f"L_sem needs at least 2 frames per clip, got T={T}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if marginals not in ("norm", "uniform"):
        raise ValueError(f"marginals must be 'norm' or 'uniform', got {marginals!r}")
    if cost not in ("one_minus_cos", "neg_cos"):
        raise ValueError(f"cost must be 'one_minus_cos' or 'neg_cos', got {cost!r}")


def transport_loss_reference(student_logits, teacher_logits, teacher_keys, eps=0.05, iters=3, marginals="norm",
                             cost="one_minus_cos"):
    """Pure-PyTorch reference of `transport_loss` (same signature and result): the unfused path."""
    _check(student_logits, teacher_logits, teacher_keys, eps, iters, marginals, cost)
    B, T, S, n = student_logits.shape
    pairs = [(i, j) for i in range(T) for j in range(T) if i != j]
    I = torch.tensor([i for i, _ in pairs], device=student_logits.device)
    J = torch.tensor([j for _, j in pairs], device=student_logits.device)
    with torch.no_grad():
        f = F.normalize(teacher_keys.to(student_logits.dtype), dim=-1)  # bf16 keys: their exact float32 values
        fi, fj = f[:, I].flatten(0, 1), f[:, J].flatten(0, 1)  # (B*Np, n, D)
        cos = correlation(fi.contiguous(), fj.contiguous())  # (B*Np, n, n)
        C = 1.0 - cos if cost == "one_minus_cos" else -cos
        if marginals == "norm":
            log_mu = fi.abs().sum(-1).log()
            log_nu = fj.abs().sum(-1).log()
            log_mu = log_mu - log_mu.logsumexp(-1, keepdim=True)  # renormalised to sum 1, as inside sinkhorn_cluster
            log_nu = log_nu - log_nu.logsumexp(-1, keepdim=True)
        else:
            log_mu = log_nu = None
        plan = sinkhorn(C, log_mu, log_nu, eps=eps, iters=iters)  # (B*Np, n, n)
        pt = teacher_logits.softmax(dim=2)
    log_ps = torch.log(student_logits.softmax(dim=2) + 1e-8)  # (B, T, S, n)
    # cross[a, b] = sum_s log p_s_i[s, a] * p_t_j[s, b]: a correlation over the slot dim
    cross = correlation(log_ps[:, I].transpose(2, 3).flatten(0, 1).contiguous(),
                        pt[:, J].transpose(2, 3).flatten(0, 1).contiguous())  # (B*Np, n, n)
    return -(cross * plan).sum(dim=(1, 2)).mean()


def transport_loss(student_logits, teacher_logits, teacher_keys, eps=0.05, iters=3, marginals="norm",
                   cost="one_minus_cos"):
    """Fused L_sem (see the module docstring). Differentiable w.r.t. student_logits only."""
    _check(student_logits, teacher_logits, teacher_keys, eps, iters, marginals, cost)
    if not use_kernel(student_logits, KERNEL_DTYPES):
        return transport_loss_reference(student_logits, teacher_logits, teacher_keys, eps, iters, marginals, cost)
    loss, _ = kernel_ops(student_logits).transport_loss(student_logits, teacher_logits.detach(),
                                                        teacher_keys.detach(), float(eps), int(iters), marginals, cost)
    return loss


def _register(ns):
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::transport_loss")
    def _transport_loss_fake(student_logits, teacher_logits, teacher_keys, eps, iters, marginals, cost):
        _check(student_logits, teacher_logits, teacher_keys, eps, iters, marginals, cost)
        return student_logits.new_empty(()), torch.empty_like(student_logits)

    @torch.library.register_fake(f"{ns}::_transport_loss_backward")
    def _transport_loss_backward_fake(grad_loss, student_logits, targets):
        return torch.empty_like(student_logits)

    def _setup_context(ctx, inputs, output):
        student_logits = inputs[0]
        _, targets = output
        ctx.save_for_backward(student_logits, targets)
        ctx.mark_non_differentiable(targets)

    def _backward(ctx, grad_loss, grad_targets):
        student_logits, targets = ctx.saved_tensors
        grad = ops._transport_loss_backward(grad_loss.contiguous(), student_logits, targets)
        return grad, None, None, None, None, None, None

    torch.library.register_autograd(f"{ns}::transport_loss", _backward, setup_context=_setup_context)


for _ns in NAMESPACES:
    _register(_ns)
