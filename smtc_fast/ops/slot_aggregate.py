"""Masked slot aggregation: one slot-attention step's attention and weighted mean, for both stages of
SMTC's semantic-aware masked slot attention (official_smtc_spec.md §1.3).

    slot_aggregate(logits, values, mask=None, eps=1e-8, residual=None) -> (updates, attn)

Stage 1 (semantic slots), `logits` (B, S, N) = q.k^T * scale, `mask` must be None:
    attn    = softmax over the S slots (dim 1) + eps
    attn    = attn / sum_n attn                      (renormalised over tokens; no eps in the denominator)
    updates = attn @ values                          (B, S, D)
Stage 2 (instance slots), `logits` (B, S, P, N), `mask` (B, S, N) or None:
    attn    = softmax over the P instances of each semantic group (dim 2) + eps
    attn    = attn * mask[:, :, None]                (the group's semantic mask; official: logits > 0.3)
    attn    = attn / (sum_n attn + eps)              (eps in the denominator: an all-zero mask gives zeros)
    updates = attn @ values                          (B, S, P, D)
With mask=None in stage 2, the mask step is skipped and the denominator has no eps (plain slot attention
over P slots per group).

    values  (B, N, D)  same dtype and device as logits, or bfloat16 with float32 logits (a bf16 forward's values):
                       computed on their exact float32 values (the CPU kernel reads the bf16 directly, the
                       reference and the CUDA kernels widen them); their gradient is bf16
    mask    (B, S, N)  any real or bool tensor; used as a non-negative weight (binary in the official
                       model, the soft semantic probability in its first release); not differentiated.
    residual (the shape of updates) or None: updates = residual + attn @ values, the slot attention's s + attn.v
                       in the same pass (the same float addition as adding afterwards; differentiable)
    returns updates (B, S, D) | (B, S, P, D) and attn with the shape of logits (the normalised weights).

Differentiable w.r.t. logits, values and residual. The order of operations (softmax, +eps, *mask, sum, +eps,
divide) is the official one, so the reference matches it bit for bit in float64.
"""
import torch

from smtc_fast.ops._common import NAMESPACES, autocast_inputs, check_dim, check_same, check_tensor, kernel_ops, use_kernel


def _check_values_dtype(values, logits):
    if not (values.dtype == logits.dtype or (values.dtype == torch.bfloat16 and logits.dtype == torch.float32)):
        raise ValueError(f"values must have the dtype of logits (or be bfloat16 with float32 logits), got "
                         f"{values.dtype} and {logits.dtype}")


def _check(logits, values, mask, eps, residual=None):
    check_tensor("logits", logits, (3, 4))
    check_tensor("values", values, 3)
    check_same("logits", logits, "values", values, dtype=False)
    _check_values_dtype(values, logits)
    check_dim("values", values, 0, logits.shape[0], "batch B of logits")
    check_dim("values", values, 1, logits.shape[-1], "tokens N of logits")
    if mask is not None:
        check_tensor("mask", mask, 3, floating=False)
        if logits.dim() != 4:
            raise ValueError("mask is only used in stage 2: logits must then be 4-D (B, S, P, N), "
                             f"got shape {tuple(logits.shape)}")
        if mask.device != logits.device:
            raise ValueError(f"mask must be on the device of logits ({logits.device}), got {mask.device}")
        want = (logits.shape[0], logits.shape[1], logits.shape[3])
        if tuple(mask.shape) != want:
            raise ValueError(f"mask must have shape (B, S, N) = {want}, got {tuple(mask.shape)}")
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if residual is not None:
        check_tensor("residual", residual)
        check_same("residual", residual, "logits", logits)
        want = (*logits.shape[:-1], values.shape[-1])
        if tuple(residual.shape) != want:
            raise ValueError(f"residual must have the shape of updates {want}, got {tuple(residual.shape)}")


def slot_aggregate_reference(logits, values, mask=None, eps=1e-8, residual=None):
    """Pure-PyTorch reference of `slot_aggregate` (same signature and results); the op's specification."""
    _check(logits, values, mask, eps, residual)
    values = values.to(logits.dtype)  # bf16 values with float32 logits: their exact float32 values
    if logits.dim() == 3:  # stage 1: (B, S, N)
        attn = logits.softmax(dim=1) + eps
        attn = attn / attn.sum(dim=-1, keepdim=True)
        updates = torch.einsum("bsn,bnd->bsd", attn, values)
    else:
        attn = logits.softmax(dim=2) + eps  # (B, S, P, N)
        if mask is not None:
            attn = attn * mask.to(attn.dtype)[:, :, None]
            attn = attn / (attn.sum(dim=-1, keepdim=True) + eps)
        else:
            attn = attn / attn.sum(dim=-1, keepdim=True)
        updates = torch.einsum("bspn,bnd->bspd", attn, values)
    return (updates if residual is None else residual + updates), attn


def slot_values(values):
    """`values` as a caller that passes them to many slot_aggregate calls should hold them (SMTC's slot attention:
    2 x iters calls on one v). Under CPU autocast a bf16 v is kept where the CPU kernel reads bf16 directly (half
    its bytes; the same results), and is otherwise cast up to float32 once here rather than once per call (the
    reference, and the CUDA kernels' execution tier, which widen it)."""
    if values.dtype == torch.bfloat16 and use_kernel(values, {"cpu": (torch.bfloat16,), "cuda": ()}):
        return values
    (values,) = autocast_inputs(values)
    return values


def slot_aggregate(logits, values, mask=None, eps=1e-8, residual=None):
    """Attention + weighted mean of one slot-attention step (stage 1 or 2, see the module docstring).
    Under CPU autocast, bf16 inputs run the float32 kernel (float32 results; ops._common.autocast_inputs); bf16
    values reach the CPU kernel as they are (it computes on their float32 values)."""
    logits, residual = autocast_inputs(logits, residual)
    values = slot_values(values)
    _check(logits, values, mask, eps, residual)
    if not use_kernel(logits):
        return slot_aggregate_reference(logits, values, mask, eps, residual)
    stage1 = logits.dim() == 3
    logits4 = logits.unsqueeze(1) if stage1 else logits  # stage 1 = one group of S slots: (B, 1, S, N)
    if residual is not None and stage1:
        residual = residual.unsqueeze(1)
    mask_f = None if mask is None else mask.to(logits.dtype)
    updates, attn = kernel_ops(logits).slot_aggregate(logits4, values, mask_f, float(eps), residual)
    if stage1:
        return updates.squeeze(1), attn.squeeze(1)
    return updates, attn


def _register(ns):
    ops = getattr(torch.ops, ns)

    @torch.library.register_fake(f"{ns}::slot_aggregate")
    def _slot_aggregate_fake(logits, values, mask, eps, residual=None):
        torch._check(logits.dim() == 4, lambda: "logits must be 4-D (B, G, P, N)")
        _check(logits, values, None, eps, residual)
        B, G, P, _ = logits.shape
        return logits.new_empty((B, G, P, values.shape[2])), torch.empty_like(logits)

    @torch.library.register_fake(f"{ns}::_slot_aggregate_backward")
    def _slot_aggregate_backward_fake(grad_updates, grad_attn, logits, values, mask, attn, eps):
        # the checks of csrc/slot_aggregate/slot_aggregate_check.h: a tensor on another device or of another dtype
        # than logits (a float64 attn, a CPU attn next to CUDA logits) must fail here as it does in the kernels
        check_same("values", values, "logits", logits, dtype=False)
        _check_values_dtype(values, logits)
        check_same("attn", attn, "logits", logits)
        check_same("grad_updates", grad_updates, "logits", logits)
        if grad_attn is not None:
            check_same("grad_attn", grad_attn, "logits", logits)
        return torch.empty_like(logits), torch.empty_like(values)

    def _setup_context(ctx, inputs, output):
        logits, values, mask, eps = inputs[:4]
        updates, attn = output
        ctx.save_for_backward(logits, values, mask, attn)
        ctx.eps = eps
        ctx.has_residual = len(inputs) > 4 and inputs[4] is not None
        # SMTC uses only the updates: leave the unused output's gradient None instead of a materialised zero
        # tensor of attn's size (8 MB per stage-2 call, allocated and zero-filled for nothing).
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_updates, grad_attn):
        logits, values, mask, attn = ctx.saved_tensors
        # updates = residual + attn @ values: the residual's gradient is the updates' (None when nothing used them)
        grad_residual = grad_updates if ctx.has_residual else None
        if grad_updates is None:
            grad_updates = torch.zeros((*attn.shape[:3], values.shape[2]), dtype=attn.dtype, device=attn.device)
        if grad_attn is not None:
            grad_attn = grad_attn.contiguous()
        # grad_attn None (only the updates are used, as in SMTC): the kernel skips that term, no zero tensor
        grad_logits, grad_values = ops._slot_aggregate_backward(
            grad_updates.contiguous(), grad_attn, logits, values, mask, attn, ctx.eps)
        return grad_logits, grad_values, None, None, grad_residual

    torch.library.register_autograd(f"{ns}::slot_aggregate", _backward, setup_context=_setup_context)


for _ns in NAMESPACES:
    _register(_ns)
