"""smtc_fast.ops.slot_aggregate: the spec's eps placement bit for bit, kernel vs reference, autograd, bad input."""
import pytest
import torch

import smtc_fast
from smtc_fast.ops import slot_aggregate, slot_aggregate_reference
from smtc_fast.testing import assert_close_to_reference, assert_within_reference_error, kernel_ran, require_kernel

from conftest import CUDA_DEVICES, DEVICES

HAS_KERNEL = smtc_fast.build_info()["cpu_kernels"]


def official_stage1(dots, v, eps=1e-8):
    """Stage 1 as official_smtc_spec.md §1.3 words it: softmax over slots, + eps, weighted mean over tokens."""
    attn = dots.softmax(dim=1) + eps
    attn = attn / attn.sum(dim=-1, keepdim=True)
    return torch.einsum("bjd,bij->bid", v, attn), attn


def official_stage2(dots, v, semantic_logits, eps=1e-8):
    """Stage 2 per §1.3: softmax over instances, + eps, * (semantic logits > 0.3), / (sum + eps)."""
    attn = dots.softmax(dim=2) + eps
    mask = (semantic_logits > 0.3).float().to(dots.dtype)
    attn = attn * mask[:, :, None]
    attn = attn / (attn.sum(dim=-1, keepdim=True) + eps)
    return torch.einsum("bjd,bsij->bsid", v, attn), attn


def test_reference_bitwise_equals_official_float64():
    dots = torch.randn(3, 16, 40, dtype=torch.float64)
    v = torch.randn(3, 40, 8, dtype=torch.float64)
    u, a = slot_aggregate_reference(dots, v)
    ou, oa = official_stage1(dots, v)
    assert torch.equal(a, oa) and torch.equal(u, ou)
    idots = torch.randn(3, 16, 4, 40, dtype=torch.float64)
    mask = (dots > 0.3).double()
    u, a = slot_aggregate_reference(idots, v, mask)
    ou, oa = official_stage2(idots, v, dots)
    assert torch.equal(a, oa) and torch.equal(u, ou)


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
def test_reference_equals_brute_force_loops(eps):
    """Scalar loops of spec §1.3 in float64, at a tolerance (1e-12) that sees eps = 1e-8 in each place it enters:
    the + eps after each stage's softmax and the + eps of stage 2's denominator. The stage-2 mask is soft
    (non-negative weights, zeros included), so a reference that binarised it would differ too."""
    B, S, P, N, D = 2, 3, 2, 5, 4
    tol = dict(rtol=1e-12, atol=1e-14)
    logits = torch.randn(B, S, P, N, dtype=torch.float64)
    v = torch.randn(B, N, D, dtype=torch.float64)
    mask = torch.rand(B, S, N, dtype=torch.float64) * (torch.rand(B, S, N) > 0.4)
    assert 0 < mask[mask > 0].min() and mask.max() < 1 and (mask == 0).any()
    u, a = slot_aggregate_reference(logits, v, mask, eps)
    for b in range(B):
        for s in range(S):
            num = torch.zeros(P, N, dtype=torch.float64)
            for n in range(N):
                e = [float(torch.exp(logits[b, s, p, n])) for p in range(P)]
                for p in range(P):
                    num[p, n] = (e[p] / sum(e) + eps) * float(mask[b, s, n])
            for p in range(P):
                w = num[p] / (num[p].sum() + eps)
                torch.testing.assert_close(a[b, s, p], w, **tol)
                torch.testing.assert_close(u[b, s, p], (w[:, None] * v[b]).sum(0), **tol)
    # stage 1: softmax over the S slots, + eps, renormalised over tokens (no eps in that denominator)
    logits1 = torch.randn(B, S, N, dtype=torch.float64)
    u, a = slot_aggregate_reference(logits1, v, None, eps)
    for b in range(B):
        num = torch.zeros(S, N, dtype=torch.float64)
        for n in range(N):
            e = [float(torch.exp(logits1[b, s, n])) for s in range(S)]
            for s in range(S):
                num[s, n] = e[s] / sum(e) + eps
        for s in range(S):
            w = num[s] / num[s].sum()
            torch.testing.assert_close(a[b, s], w, **tol)
            torch.testing.assert_close(u[b, s], (w[:, None] * v[b]).sum(0), **tol)


CASES = [  # (B, S, P or None for stage 1, N, D)
    (4, 16, None, 256, 48),
    (4, 16, 4, 256, 48),
    (2, 5, 1, 7 * 9, 33),   # P = 1, odd N and D
    (3, 7, None, 7 * 9, 33),
    (1, 1, None, 1, 1),
    (1, 1, 1, 1, 1),
]


def make(case, device, dtype, mask_kind="random"):
    B, S, P, N, D = case
    shape = (B, S, N) if P is None else (B, S, P, N)
    logits = (2 * torch.randn(shape, dtype=dtype, device=device)).requires_grad_()
    values = torch.randn(B, N, D, dtype=dtype, device=device, requires_grad=True)
    mask = None
    if P is not None and mask_kind is not None:
        mask = {"random": (torch.rand(B, S, N, device=device) > 0.5).to(dtype),
                "zeros": torch.zeros(B, S, N, dtype=dtype, device=device),
                "ones": torch.ones(B, S, N, dtype=dtype, device=device)}[mask_kind]
    return logits, values, mask


# stage 1 has no mask; stage 2 runs with a random, an all-zero, an all-one and no mask
CASE_MASKS = [(c, m) for c in CASES for m in (["random"] if c[2] is None else ["random", "zeros", "ones", None])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case, mask_kind", CASE_MASKS)
def test_forward_backward_match_reference(device, dtype, case, mask_kind):
    logits, values, mask = make(case, device, dtype, mask_kind)
    with kernel_ran(device, "slot_aggregate", "_slot_aggregate_backward"):
        u, a = slot_aggregate(logits, values, mask)
        gu, ga = torch.randn_like(u), torch.randn_like(a)
        grads = torch.autograd.grad((u * gu).sum() + (a * ga).sum(), (logits, values))
    ru, ra = slot_aggregate_reference(logits, values, mask)
    assert_close_to_reference(u, ru)
    assert_close_to_reference(a, ra)
    rgrads = torch.autograd.grad((ru * gu).sum() + (ra * ga).sum(), (logits, values))
    for g, r in zip(grads, rgrads):
        assert_close_to_reference(g, r)


@pytest.mark.parametrize("device", DEVICES)
def test_all_zero_mask_gives_zero_updates_not_nan(device):
    logits, values, _ = make((2, 3, 4, 10, 5), device, torch.float32)
    u, a = slot_aggregate(logits, values, torch.zeros(2, 3, 10, device=device))
    assert torch.all(u == 0) and torch.all(a == 0)
    (u.sum() + a.sum()).backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_bool_mask_and_non_contiguous(device):
    logits = torch.randn(2, 4, 3, 12, device=device).transpose(2, 3).contiguous().transpose(2, 3)
    values = torch.randn(2, 6, 12, device=device).transpose(1, 2)
    mask = torch.rand(2, 4, 12, device=device) > 0.5
    with kernel_ran(device, "slot_aggregate"):
        u, a = slot_aggregate(logits, values, mask)
    ru, ra = slot_aggregate_reference(logits, values, mask.float())
    assert_close_to_reference(u, ru)
    assert_close_to_reference(a, ra)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    logits, values, mask = make((0, 3, 2, 5, 4), device, torch.float32)
    u, a = slot_aggregate(logits, values, mask)
    assert u.shape == (0, 3, 2, 4) and a.shape == (0, 3, 2, 5)


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
@pytest.mark.parametrize("stage", [1, 2])
def test_gradcheck_float64(stage):
    case = (2, 3, None if stage == 1 else 2, 5, 3)
    logits, values, mask = make(case, "cpu", torch.float64)
    assert torch.autograd.gradcheck(lambda l, v: slot_aggregate(l, v, mask), (logits, values))


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_opcheck():
    logits, values, mask = make((2, 3, 2, 5, 3), "cpu", torch.float32)
    torch.library.opcheck(torch.ops.smtc_fast.slot_aggregate.default, (logits, values, mask, 1e-8))
    torch.library.opcheck(torch.ops.smtc_fast.slot_aggregate.default, (logits, values, None, 1e-8))


def test_torch_compile_fullgraph():
    logits, values, mask = make((2, 3, 2, 5, 3), "cpu", torch.float32)
    compiled = torch.compile(slot_aggregate, fullgraph=True, backend="eager")
    compiled(logits, values, mask)  # traced here: the graph, not the tracing, must call the kernel below
    with kernel_ran("cpu", "slot_aggregate"):
        u, a = compiled(logits, values, mask)
    ru, ra = slot_aggregate_reference(logits, values, mask)
    assert_close_to_reference(u, ru)
    assert_close_to_reference(a, ra)


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_forced_reference_equals_kernel(monkeypatch):
    logits, values, mask = make((3, 4, 2, 20, 6), "cpu", torch.float32)
    u, a = slot_aggregate(logits, values, mask)
    monkeypatch.setenv("SMTC_FAST_FORCE_REFERENCE", "1")
    ru, ra = slot_aggregate(logits, values, mask)
    assert_close_to_reference(u, ru)
    assert_close_to_reference(a, ra)


@pytest.mark.parametrize("kwargs, match", [
    (dict(logits=torch.randn(2, 3), values=torch.randn(2, 3, 4)), "logits must be 3-D or 4-D"),
    (dict(logits=torch.randn(2, 3, 5), values=torch.randn(2, 6, 4)), "tokens N"),
    (dict(logits=torch.randn(2, 3, 5), values=torch.randn(3, 5, 4)), "batch B"),
    (dict(logits=torch.randn(2, 3, 5), values=torch.randn(2, 5, 4).double()), "dtype of logits"),
    (dict(logits=torch.randn(2, 3, 5), values=torch.randn(2, 5, 4).half()), "dtype of logits"),
    (dict(logits=torch.randn(2, 3, 5).double(), values=torch.randn(2, 5, 4).bfloat16()), "dtype of logits"),
    (dict(logits=torch.randn(2, 3, 5), values=torch.randn(2, 5, 4), mask=torch.ones(2, 3, 5)), "stage 2"),
    (dict(logits=torch.randn(2, 3, 2, 5), values=torch.randn(2, 5, 4), mask=torch.ones(2, 4, 5)), "mask must have shape"),
    (dict(logits=torch.randn(2, 3, 2, 5), values=torch.randn(2, 5, 4), eps=-1.0), "eps"),
    (dict(logits=torch.randn(2, 3, 5), values=torch.randn(2, 5, 4, device="meta")), "same device"),
])
def test_bad_input(kwargs, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        slot_aggregate(**kwargs)


@pytest.mark.parametrize("op", ["slot_aggregate", "_slot_aggregate_backward"])
def test_cpp_rejects_bf16_values_with_float64_logits(op):
    """The C++ boundary (torch.ops directly) repeats the dtype rule: bf16 values come with float32 logits only."""
    require_kernel("cpu")
    logits, values = torch.randn(2, 3, 2, 5, dtype=torch.float64), torch.randn(2, 5, 4).bfloat16()
    args = (logits, values, None, 1e-8)
    if op == "_slot_aggregate_backward":
        args = (torch.randn(2, 3, 2, 4, dtype=torch.float64), None, logits, values, None, torch.rand_like(logits), 1e-8)
    with pytest.raises(RuntimeError, match="bfloat16 with float32 logits"):
        getattr(torch.ops.smtc_fast, op)(*args)


# bf16 values with float32 logits: the values of a bf16 forward (the slot attention's v under --amp). The CPU kernel
# reads the bf16 directly and widens each one exactly, so its results must be the float32 kernel's on
# values.float() bit for bit, and the values' gradient that float32 gradient rounded to bf16 (what autograd gives
# bf16 values that were cast up). D = 48 and 33 have tails past the 16-float vectors; D = 384 is SMTC's; D = 100 and
# 81 mix the 64-column blocks that widen bf16 in even/odd column pairs with 16-column blocks and a tail, under 6
# and 5 rows (a 4-row block and a shorter one).
BF16_VALUE_CASES = [(4, 16, None, 256, 384), (4, 16, 4, 256, 384), (2, 5, 3, 7 * 9, 33), (3, 7, None, 7 * 9, 48),
                    (2, 3, 5, 19, 13), (2, 6, None, 40, 100), (2, 3, 5, 50, 81)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BF16_VALUE_CASES)
def test_bf16_values_are_computed_on_their_float32_values(device, case):
    require_kernel(device)
    logits, values, mask = make(case, device, torch.float32)
    vb = values.detach().bfloat16().requires_grad_()
    vf = vb.detach().float().requires_grad_()
    lf = logits.detach().clone().requires_grad_()
    with kernel_ran(device, "slot_aggregate", "_slot_aggregate_backward"):
        u, a = slot_aggregate(logits, vb, mask)
        gu, ga = torch.randn_like(u), torch.randn_like(a)
        grads = torch.autograd.grad((u * gu).sum() + (a * ga).sum(), (logits, vb))
    assert u.dtype == a.dtype == grads[0].dtype == torch.float32 and grads[1].dtype == torch.bfloat16
    uf, af = slot_aggregate(lf, vf, mask)
    want = torch.autograd.grad((uf * gu).sum() + (af * ga).sum(), (lf, vf))
    torch.testing.assert_close(u, uf, rtol=0, atol=0)
    torch.testing.assert_close(a, af, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], want[1].bfloat16(), rtol=0, atol=0)
    ru, ra = slot_aggregate_reference(logits, vb, mask)  # the reference widens them too
    assert_close_to_reference(u, ru)
    assert_close_to_reference(a, ra)


def test_bf16_values_under_cpu_autocast_reach_the_kernel_as_bf16(monkeypatch):
    """Under CPU autocast, `slot_values` keeps bf16 values for the CPU kernel, which computes on them in float32
    (the float32 reference on the same values); for the reference (SMTC_FAST_FORCE_REFERENCE) it casts them up."""
    require_kernel("cpu")
    from smtc_fast.ops.slot_aggregate import slot_values

    logits, values, mask = make((2, 4, 3, 40, 32), "cpu", torch.float32)
    lb, vb = logits.detach().bfloat16(), values.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert slot_values(vb).dtype == torch.bfloat16
        with kernel_ran("cpu", "slot_aggregate"):
            u, _ = slot_aggregate(lb, slot_values(vb), mask)
        monkeypatch.setenv("SMTC_FAST_FORCE_REFERENCE", "1")
        assert slot_values(vb).dtype == torch.float32
    assert u.dtype == torch.float32
    assert_close_to_reference(u, slot_aggregate_reference(lb.float(), vb.float(), mask)[0])
    assert slot_values(vb).dtype == torch.bfloat16  # outside autocast: the caller's dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [(4, 16, None, 256, 48), (4, 16, 4, 256, 48), (2, 5, 3, 7 * 9, 33)])
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16])
def test_residual_is_added_in_the_same_pass(device, case, values_dtype):
    """residual + attn @ values in one call equals the residual added afterwards, bit for bit (the same float
    addition), and the residual's gradient is the updates' gradient. SMTC's slot update s + attn.v uses it."""
    require_kernel(device)
    logits, values, mask = make(case, device, torch.float32)
    values = values.detach().to(values_dtype).requires_grad_()
    B, S, P, N, D = case
    residual = torch.randn((B, S, D) if P is None else (B, S, P, D), device=device, requires_grad=True)
    with kernel_ran(device, "slot_aggregate", "_slot_aggregate_backward"):
        u, a = slot_aggregate(logits, values, mask, residual=residual)
        gu = torch.randn_like(u)
        grads = torch.autograd.grad((u * gu).sum(), (logits, values, residual))
    u0, a0 = slot_aggregate(logits, values, mask)
    torch.testing.assert_close(u, residual + u0, rtol=0, atol=0)
    torch.testing.assert_close(a, a0, rtol=0, atol=0)
    want = torch.autograd.grad((u0 * gu).sum(), (logits, values))
    torch.testing.assert_close(grads[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[1], want[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[2], gu, rtol=0, atol=0)
    ru, _ = slot_aggregate_reference(logits, values, mask, residual=residual)
    assert_close_to_reference(u, ru)


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_residual_gradcheck_float64():
    logits, values, mask = make((2, 3, 2, 5, 3), "cpu", torch.float64)
    residual = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l, v, r: slot_aggregate(l, v, mask, residual=r), (logits, values, residual))
    torch.library.opcheck(torch.ops.smtc_fast.slot_aggregate.default, (logits, values, mask, 1e-8, residual))


@pytest.mark.parametrize("residual, match", [
    (torch.randn(2, 3, 2, 5), "residual must have the shape of updates"),
    (torch.randn(2, 3, 2, 4).double(), "same dtype"),
    (torch.randint(0, 3, (2, 3, 2, 4)), "floating-point"),
])
def test_bad_residual(residual, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        slot_aggregate(torch.randn(2, 3, 2, 5), torch.randn(2, 5, 4), residual=residual)


def test_cpp_rejects_bad_residual():
    require_kernel("cpu")
    with pytest.raises(RuntimeError, match="residual must have the shape of updates"):
        torch.ops.smtc_fast.slot_aggregate(torch.randn(2, 3, 2, 5), torch.randn(2, 5, 4), None, 1e-8,
                                           torch.randn(2, 3, 2, 5))


@pytest.mark.parametrize("device", CUDA_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision_within_policy(device, dtype):
    """half/bf16 forward and backward (float accumulation inside): each result's error against float64 at most
    twice the reference's own error in that dtype."""
    logits, values, mask = make((2, 16, 4, 256, 64), device, torch.float32)
    exact = [t.detach().double().requires_grad_() for t in (logits, values)]
    eu, ea = slot_aggregate_reference(exact[0], exact[1], mask.double())
    low = [t.detach().to(dtype).requires_grad_() for t in (logits, values)]
    ref_low = [t.detach().to(dtype).requires_grad_() for t in (logits, values)]
    u, a = slot_aggregate(low[0], low[1], mask.to(dtype))
    ru, ra = slot_aggregate_reference(ref_low[0], ref_low[1], mask.to(dtype))
    assert_within_reference_error(u, ru, eu)
    assert_within_reference_error(a, ra, ea)
    gu = torch.randn(u.shape, dtype=torch.float64)
    grads = torch.autograd.grad((u * gu.to(dtype)).sum(), low)
    rgrads = torch.autograd.grad((ru * gu.to(dtype)).sum(), ref_low)
    egrads = torch.autograd.grad((eu * gu).sum(), exact)
    for g, r, e in zip(grads, rgrads, egrads):
        assert_within_reference_error(g, r, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.1, 0.45, 0.9])  # sparse to dense semantic masks
@pytest.mark.parametrize("P", [4, 3, 6])  # blocks of four slots and the remainder
def test_sparse_and_dense_mask_contractions(device, dtype, density, P):
    logits, values, _ = make((3, 5, P, 40, 37), device, dtype)
    mask = (torch.rand(3, 5, 40, device=device) < density).to(dtype)
    with kernel_ran(device, "slot_aggregate", "_slot_aggregate_backward"):
        u, a = slot_aggregate(logits, values, mask)
        gu, ga = torch.randn_like(u), torch.randn_like(a)
        grads = torch.autograd.grad((u * gu).sum() + (a * ga).sum(), (logits, values))
    ru, ra = slot_aggregate_reference(logits, values, mask)
    assert_close_to_reference(u, ru)
    assert_close_to_reference(a, ra)
    rgrads = torch.autograd.grad((ru * gu).sum() + (ra * ga).sum(), (logits, values))
    for g, r in zip(grads, rgrads):
        assert_close_to_reference(g, r)


def _mask_pattern(kind, B, S, N, device, dtype):
    """Semantic masks that exercise the packed token lists: empty, full, a single token, sparse and dense groups."""
    g = torch.Generator().manual_seed(1)
    if kind == "zeros":
        return torch.zeros(B, S, N, dtype=dtype, device=device)
    if kind == "ones":
        return torch.ones(B, S, N, dtype=dtype, device=device)
    if kind == "one_token":  # a different single token per group
        mask = torch.zeros(B, S, N, dtype=dtype)
        mask.view(B * S, N)[torch.arange(B * S), torch.randint(N, (B * S,), generator=g)] = 1
        return mask.to(device)
    if kind == "mixed":  # empty, full and sparse groups side by side in one call
        mask = (torch.rand(B, S, N, generator=g) < 0.3).to(dtype)
        mask[:, 0] = 0
        mask[:, -1] = 1
        return mask.to(device)
    if kind == "soft":  # non-negative weights (the first release's soft semantic mask), zeros included
        return (torch.rand(B, S, N, generator=g) * (torch.rand(B, S, N, generator=g) < 0.5)).to(dtype).to(device)
    density = float(kind)
    return (torch.rand(B, S, N, generator=g) < density).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["zeros", "ones", "one_token", "0.1", "0.9", "mixed", "soft"])
@pytest.mark.parametrize("shape", [(2, 3, 1, 7 * 9, 33), (2, 3, 4, 64, 100), (1, 4, 5, 40, 16), (1, 2, 4, 256, 384)])
def test_packed_token_lists_match_reference(device, dtype, kind, shape):
    """The kernels contract only over each group's masked tokens: every mask pattern, P in blocks of four and
    remainders, D in full vectors and tails, with and without a gradient reaching attn directly.

    Gradients in float32 are judged against float64 with the low-precision policy (at most twice the reference's
    own float32 error): a single-token group has attn = a / (a + eps) ~ 1, so its renormalisation backward
    (gw - <gw, attn>) / z cancels and both the kernel and the reference keep only float32 rounding of gw there.
    """
    B, S, P, N, D = shape
    logits, values, _ = make((B, S, P, N, D), device, dtype)
    mask = _mask_pattern(kind, B, S, N, device, dtype)
    with kernel_ran(device, "slot_aggregate"):
        u, a = slot_aggregate(logits, values, mask)
    ru, ra = slot_aggregate_reference(logits, values, mask)
    assert_close_to_reference(u, ru)
    assert_close_to_reference(a, ra)
    exact = [t.detach().double().requires_grad_() for t in (logits, values)]
    eu, ea = slot_aggregate_reference(exact[0], exact[1], mask.double())
    gu = torch.randn_like(u)
    for with_attn_grad in (False, True):  # SMTC uses only the updates: grad_attn is then None in the backward
        ga = torch.randn_like(a) if with_attn_grad else torch.zeros_like(a)
        loss = (u * gu).sum() + ((a * ga).sum() if with_attn_grad else 0)
        with kernel_ran(device, "_slot_aggregate_backward"):
            grads = torch.autograd.grad(loss, (logits, values), retain_graph=True)
        rgrads = torch.autograd.grad((ru * gu).sum() + (ra * ga).sum(), (logits, values), retain_graph=True)
        egrads = torch.autograd.grad((eu * gu.double()).sum() + (ea * ga.double()).sum(), exact, retain_graph=True)
        for g, r, e in zip(grads, rgrads, egrads):
            if dtype == torch.float64:
                assert_close_to_reference(g, r)
            else:
                assert_within_reference_error(g, r, e)


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_backward_op_grad_attn_none_equals_zeros():
    logits, values, _ = make((2, 3, 4, 30, 20), "cpu", torch.float32)
    mask = (torch.rand(2, 3, 30) < 0.4).float()
    u, a = torch.ops.smtc_fast.slot_aggregate(logits.detach(), values.detach(), mask, 1e-8)
    gu = torch.randn_like(u)
    args = (logits.detach(), values.detach(), mask, a, 1e-8)
    none = torch.ops.smtc_fast._slot_aggregate_backward(gu, None, *args)
    zeros = torch.ops.smtc_fast._slot_aggregate_backward(gu, torch.zeros_like(a), *args)
    for x, y in zip(none, zeros):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="grad_attn must have the shape"):
        torch.ops.smtc_fast._slot_aggregate_backward(gu, torch.zeros(2, 3, 4, 29), *args)


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_only_updates_used_gives_no_materialised_attn_grad():
    """SMTC backpropagates through the updates only; the op then skips the attn-gradient term entirely."""
    logits, values, _ = make((2, 3, 4, 30, 20), "cpu", torch.float32)
    mask = (torch.rand(2, 3, 30) < 0.4).float()
    u, _ = slot_aggregate(logits, values, mask)
    u.sum().backward()
    ref_logits = logits.detach().requires_grad_()
    ref_values = values.detach().requires_grad_()
    slot_aggregate_reference(ref_logits, ref_values, mask)[0].sum().backward()
    assert_close_to_reference(logits.grad, ref_logits.grad)
    assert_close_to_reference(values.grad, ref_values.grad)
