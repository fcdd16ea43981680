"""smtc_fast.ops.propagate_labels: kernel vs reference vs the evaluator's dense step (propagate_dense) vs a brute
force copy of the official masked top-k; the tie rule; edge cases; bad input; fake kernel / opcheck."""
import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import smtc_fast
from smtc_fast.evaluate import io as eio
from smtc_fast.evaluate import propagation as P
from smtc_fast.ops import propagate_labels, propagate_labels_reference
from smtc_fast.testing import assert_close_to_reference, kernel_ran

from conftest import DEVICES, EmuDevice

HAS_KERNEL = smtc_fast.build_info()["cpu_kernels"]
EMU_OP = torch.ops.smtc_fast_cuda_emu.propagate_labels if smtc_fast.build_info()["cuda_emu"] else None
DATA = os.path.join(os.path.dirname(__file__), "data", "davis2016")
FRAMES = sorted(glob.glob(os.path.join(DATA, "JPEGImages/480p/blackswan/*.jpg")))


def device_cases(cases, emu_small):
    """DEVICES x cases, the emulated devices' cases for which emu_small(*case) is False marked slow: the CPU
    execution tier switches fibers at every barrier and shuffle of the CUDA kernel's 256 threads (~3 ms per tile
    and batch of 64 keys), so a 30 x 53 grid takes ~17 s there."""
    out = []
    for d in DEVICES:
        dev = d.values[0] if hasattr(d, "values") else d
        marks, did = (list(d.marks), d.id) if hasattr(d, "values") else ([], d)
        for c in cases:
            slow = [pytest.mark.slow] if isinstance(dev, EmuDevice) and not emu_small(*c) else []
            out.append(pytest.param(dev, *c, marks=marks + slow, id=f"{did}-" + "-".join(map(str, c))))
    return out



def make_inputs(grid, n_ctx, d, n_lab, device="cpu", dtype=torch.float32, n0=None, soft=True):
    h, w = grid
    N = h * w
    n0 = N if n0 is None else n0
    query = F.normalize(torch.randn(N, d, dtype=dtype), dim=1)
    first = F.normalize(torch.randn(n0, d, dtype=dtype), dim=1)
    ctx = F.normalize(torch.randn(n_ctx, N, d, dtype=dtype), dim=2)
    first_labels = F.one_hot(torch.randint(n_lab, (n0,)), n_lab).to(dtype)
    ctx_labels = torch.rand(n_ctx, N, n_lab, dtype=dtype) if soft else F.one_hot(
        torch.randint(n_lab, (n_ctx, N)), n_lab).to(dtype)
    return [t.to(device) for t in (query, first, first_labels, ctx, ctx_labels)]


def brute_force(query, first, first_labels, ctx, ctx_labels, grid, topk, radius, temperature):
    """The official form, in float64: the full (n+1)N x N affinity, a -1e10 additive radius mask, one top-k."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).double()
    mask = torch.where(torch.cdist(pos, pos) < radius, 0.0, -1e10).double()  # (N, N)
    keys = torch.cat([first[None], ctx]).double() if first.shape[0] == query.shape[0] else None
    A = [query.double() @ first.double().T] + [query.double() @ c.double().T + mask for c in ctx]
    A = torch.cat(A, 1)  # (N, N0 + n N)
    labels = torch.cat([first_labels, ctx_labels.reshape(-1, ctx_labels.shape[-1])]).double()
    v, i = A.topk(min(topk, A.shape[1]), dim=1)
    del keys
    return torch.einsum("nk,nkl->nl", torch.softmax(v / temperature, 1), labels[i])


def boundary_near_ties(query, first, first_labels, ctx, ctx_labels, grid, topk, radius, temperature):
    """Queries whose top-k boundary is a near tie: a candidate within a float32 dot product's rounding bound
    (D u for unit vectors, u = 2^-24) of the k-th best logit (float64), not equal to it, and more than k candidates
    above (k-th - bound). Which of them enters the top-k is then decided by rounding, i.e. by the kernel's summation
    order against the BLAS in the reference, and both answers are right. Such a swap moves the soft labels by far
    more than the float tolerance (the swapped candidates carry other labels), but by at most
    2 x (candidates within the bound of the k-th logit) x (the k-th softmax weight).
    Returns (skip (N,) bool, bound (N,) float64). Exact ties are not near ties: the tie rule decides those."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).double()
    inside = torch.cdist(pos, pos) < radius  # (N, N)
    q = query.cpu().double()
    A = [q @ first.cpu().double().T] + [(q @ c.double().T).masked_fill(~inside, float("-inf")) for c in ctx.cpu()]
    A = torch.cat(A, 1)  # (N, N0 + n N)
    k = min(topk, A.shape[1])
    if k == A.shape[1]:
        return torch.zeros(A.shape[0], dtype=torch.bool), torch.zeros(A.shape[0], dtype=torch.float64)
    tol = query.shape[1] * 2.0 ** -24
    v = A.topk(k, dim=1).values  # (N, k)
    lo = v[:, k - 1:]  # the k-th best logit
    near = (A - lo).abs() < tol
    contested = (A > lo - tol).sum(1) > k  # rounding could let more than k candidates in
    skip = contested & (near.sum(1) > (A == lo).sum(1))  # ... and not only by exact ties
    n_near = near.sum(1)
    w_k = torch.softmax(v / temperature, 1)[:, k - 1]
    return skip, 2 * n_near * w_k


def check_same_prediction(got, want, skip=None, bound=None):
    """Soft labels within the float32 tolerance and the same argmax (where the reference's top two labels are not
    a float-noise tie), on every query but the `skip` ones; those (boundary near ties, see boundary_near_ties) only
    within their `bound`."""
    if skip is not None:
        skip = skip.cpu()
        assert ((got.cpu()[skip] - want[skip]).abs().max(1).values.double() <= bound[skip] + 1e-5).all()
        got, want = got[~skip.to(got.device)], want[~skip]
    assert_close_to_reference(got, want.to(got.dtype), rtol=1e-4, atol=1e-5)
    # argmax identical wherever the reference's top two labels are not a float-noise tie
    top2 = want.topk(2, dim=1).values if want.shape[1] > 1 else None
    ok = torch.ones(want.shape[0], dtype=torch.bool) if top2 is None else (top2[:, 0] - top2[:, 1]) > 1e-4
    assert torch.equal(got.argmax(1)[ok.to(got.device)].cpu(), want.argmax(1)[ok].cpu())


def test_reference_equals_brute_force_float64():
    args = make_inputs((5, 7), 3, 6, 4, dtype=torch.float64)
    for topk, radius in [(5, 2.0), (10, 1.5), (3, 0.0), (200, 3.0)]:
        want = brute_force(*args, (5, 7), topk, radius, 0.1)
        got = propagate_labels_reference(*args, (5, 7), topk, radius, 0.1)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("topk,radius,chunk", [(7, 3.0, 32), (12, 2.5, 1000), (4, 1.0, 17)])
def test_reference_equals_evaluator_dense_step(topk, radius, chunk):
    args = make_inputs((9, 13), 5, 16, 3, dtype=torch.float64)
    want = P.propagate_dense(*args, (9, 13), topk, radius, 0.2, chunk=chunk)
    got = propagate_labels_reference(*args, (9, 13), topk, radius, 0.2, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device,grid,n_ctx,d,n_lab,topk,radius", device_cases([
    ((30, 53), 4, 64, 2, 7, 7.0),      # stride-16 DAVIS grid, SMTC preset
    ((17, 23), 3, 32, 5, 28, 35.0),    # stride-8 preset: radius larger than the grid
    ((7, 11), 2, 24, 1, 10, 2.5),      # K = 1
    ((8, 9), 3, 16, 64, 5, 3.0),       # K = 64
    ((1, 1), 2, 8, 3, 7, 7.0),         # fewer candidates (1 + 2) than k
    ((3, 2), 0, 8, 3, 4, 7.0),         # no context frames
    ((6, 5), 4, 12, 3, 9, 0.0),        # radius 0: no context candidate
    ((6, 5), 4, 12, 3, 9, 0.5),        # radius 0.5: only the query's own cell
    ((5, 6), 3, 40, 3, 7, 2.5),        # width not a multiple of the 4-query group, D = 16 + 16 + 8 (a SIMD tail)
    ((1, 13), 3, 16, 2, 6, 4.0),       # 1 x W grid
    ((11, 1), 3, 16, 2, 6, 4.0),       # H x 1 grid
    ((2, 3), 2, 20, 3, 7, 9.0),        # grid smaller than the radius
    ((3, 9), 2, 384, 4, 7, 7.0),       # D = 384 (the SMTC features), 9 = 4 + 4 + 1 queries per row
], lambda grid, *_: grid[0] * grid[1] <= 12 * 14))
def test_kernel_matches_reference_random(device, grid, n_ctx, d, n_lab, topk, radius):
    args = make_inputs(grid, n_ctx, d, n_lab, device)
    with kernel_ran(device, "propagate_labels"):
        got = propagate_labels(*args, grid, topk, radius, 0.2)
    want = propagate_labels_reference(*[a.cpu() for a in args], grid, topk, radius, 0.2)
    assert got.shape == want.shape and got.dtype == torch.float32
    check_same_prediction(got.cpu(), want)
    bf = brute_force(*[a.cpu() for a in args], grid, topk, radius, 0.2)
    assert_close_to_reference(got.cpu().double(), bf, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_first_frame_of_another_size(device):
    args = make_inputs((6, 8), 3, 16, 4, device, n0=23)
    got = propagate_labels(*args, (6, 8), 6, 2.0, 0.1)
    want = propagate_labels_reference(*[a.cpu() for a in args], (6, 8), 6, 2.0, 0.1)
    check_same_prediction(got.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_lower_candidate_index_wins(device):
    """Exact ties (dyadic features, exact dot products): frame 0 before the context, earlier context frames before
    later ones, lower token index first. Each copy carries a different label, so the rule shows in the result."""
    grid, N, d = (3, 4), 12, 4
    key = torch.tensor([0.5, 0.5, 0.5, 0.5])
    query = key.expand(N, d).contiguous()
    first = torch.zeros(N, d)
    first[[2, 7]] = key  # two frame-0 tokens with the best logit (1.0)
    ctx = torch.zeros(3, N, d)
    ctx[:, :] = key * 0.5  # everything in the context at 0.5
    ctx[1, 5] = key  # one more 1.0 in context frame 1
    first_labels = F.one_hot(torch.arange(N) % 3, 3).float()
    ctx_labels = torch.rand(3, N, 3)
    args = [t.to(device) for t in (query, first, first_labels, ctx, ctx_labels)]
    for topk in (1, 2, 3, 4, 9):
        got = propagate_labels(*args, grid, topk, 1.5, 0.25)
        want = propagate_labels_reference(*[a.cpu() for a in args], grid, topk, 1.5, 0.25)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-7)
    # topk 1: frame-0 token 2 wins over token 7 and over the context copy
    got = propagate_labels(*args, grid, 1, 1.5, 0.25).cpu()
    torch.testing.assert_close(got, first_labels[2].expand(N, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_ties_context_copies_of_frame_zero(device):
    """The early target frames' context is frame-0 copies (evaluation_protocols.md §2.3): every frame-0 logit then
    recurs in each context frame inside the disc. With random (non-dyadic) features those copies must still tie
    exactly, so the tie rule keeps frame 0 first, then context frame 0, ...; each copy has other labels."""
    grid, d = (6, 7), 40
    N = grid[0] * grid[1]
    query = F.normalize(torch.randn(N, d), dim=1)
    first = F.normalize(torch.randn(N, d), dim=1)
    ctx = first.expand(3, N, d).contiguous()
    first_labels = torch.rand(N, 4)
    ctx_labels = torch.rand(3, N, 4)
    args = [t.to(device) for t in (query, first, first_labels, ctx, ctx_labels)]
    for topk in (1, 2, 5, 13):
        got = propagate_labels(*args, grid, topk, 3.0, 0.1).cpu()
        want = propagate_labels_reference(query, first, first_labels, ctx, ctx_labels, grid, topk, 3.0, 0.1)
        assert_close_to_reference(got, want, rtol=1e-5, atol=1e-6)
    got = propagate_labels(*args, grid, 1, 3.0, 0.1).cpu()  # top-1: frame 0's best token, never a copy
    torch.testing.assert_close(got, first_labels[(query @ first.T).argmax(1)])


def _blackswan_feats(n_frames, stride):
    rgb = np.stack([eio.read_rgb(p) for p in FRAMES[:n_frames]])
    f = P.ColorFeatures(stride)(P.normalize_images(rgb))  # (T, 4, h, w), 480x854 is not a multiple of 16
    grid = tuple(f.shape[-2:])
    return F.normalize(f, dim=1).flatten(2).transpose(1, 2).contiguous(), grid


@pytest.mark.parametrize("device,stride,topk,radius", device_cases([(16, 7, 7.0), (8, 28, 35.0)],
                                                                   lambda *_: False))
def test_blackswan_frames_match_reference(device, stride, topk, radius):
    """Real frames, colour features (D = 4): many logits near 1, so a few queries have a k-th / (k+1)-th near tie
    that float rounding decides (boundary_near_ties); everywhere else the prediction is the reference's."""
    feats, grid = _blackswan_feats(6, stride)
    N = feats.shape[1]
    first_labels = torch.rand(N, 3)
    ctx_labels = torch.softmax(torch.randn(4, N, 3), -1)
    args = [feats[5], feats[0], first_labels, feats[1:5], ctx_labels]
    got = propagate_labels(*[a.to(device) for a in args], grid, topk, radius, 0.2).cpu()
    want = propagate_labels_reference(*args, grid, topk, radius, 0.2)
    skip, bound = boundary_near_ties(*args, grid, topk, radius, 0.2)
    # colour features crowd near cos = 1: ~1% of the queries at stride 16, ~10% at stride 8 (top-28 of 77k)
    assert skip.float().mean() < 0.15
    check_same_prediction(got, want, skip, bound)


# --- the CUDA kernel run by the CPU execution tier, bit for bit against the CPU kernel -----------------------------

def _cpu_kernel_uses_fma():
    """Whether propagate_cpu.cpp's block_dots runs its AVX-512 clone, where GCC fuses `a += x * y` into FMAs (its
    avx2 and default clones multiply and add separately). The CUDA kernel sums with FMAs, so bitwise agreement
    holds on such a CPU only; elsewhere the two agree to rounding (the DEVICES tests above)."""
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


needs_emu = pytest.mark.skipif(EMU_OP is None or not HAS_KERNEL, reason="needs the CPU kernels and the CUDA tier")
needs_fma_cpu = pytest.mark.skipif(not _cpu_kernel_uses_fma(), reason="the CPU kernel's pre-AVX-512 clones sum "
                                   "without FMA: not bitwise comparable with the CUDA kernel")
EMU_BITWISE_SCHEDULES = ("forward", "random:11")


def _emu(monkeypatch, schedule, *args):
    monkeypatch.setenv("SMTC_FAST_EMU_SCHEDULE", schedule)
    return EMU_OP(*args)


def _inputs_with_ties(grid, n_ctx, d, n_lab, n0=None):
    """make_inputs with exact ties: context frame 0 a copy of frame 0, and frame-0 tokens 1 and 2 copies of 0."""
    query, first, first_labels, ctx, ctx_labels = make_inputs(grid, n_ctx, d, n_lab, n0=n0)
    first[1:3] = first[0]
    if ctx.shape[0] and first.shape[0] == ctx.shape[1]:
        ctx[0] = first
    return query, first, first_labels, ctx, ctx_labels


@needs_emu
@needs_fma_cpu
@pytest.mark.parametrize("schedule", EMU_BITWISE_SCHEDULES)
@pytest.mark.parametrize("grid,n_ctx,d,n_lab,topk,radius,n0", [
    ((12, 14), 3, 64, 3, 7, 3.0, None),    # the largest default grid; one 16-query tile per row, 2 padded queries
    ((5, 17), 2, 40, 2, 9, 2.5, None),     # two tiles per row (16 + 1 queries), D = 40: a zero-padded tail
    ((4, 33), 2, 19, 2, 5, 1.0, None),     # three tiles per row, D = 19
    ((3, 9), 2, 384, 4, 7, 7.0, None),     # D = 384, the SMTC features
    ((7, 11), 2, 24, 1, 500, 2.5, 400),    # k = 500: top-k lists in the global workspace; k > candidates
    ((6, 5), 4, 12, 3, 9, 0.0, None),      # radius 0: frame 0 only
    ((6, 5), 4, 12, 3, 9, 0.5, None),      # radius 0.5: only the query's own cell
    ((1, 1), 2, 8, 3, 7, 7.0, None),       # fewer candidates than k
    ((3, 2), 0, 8, 3, 4, 7.0, None),       # no context frames
    ((2, 3), 2, 20, 3, 7, 9.0, None),      # grid smaller than the radius
    ((9, 10), 3, 32, 3, 5, 4.0, None),     # many exact ties: see _inputs_with_ties
])
def test_emulated_cuda_kernel_equals_cpu_kernel_bitwise(monkeypatch, schedule, grid, n_ctx, d, n_lab, topk,
                                                         radius, n0):
    args = _inputs_with_ties(grid, n_ctx, d, n_lab, n0)
    want = torch.ops.smtc_fast.propagate_labels(*args, grid, topk, radius, 0.2)
    got = _emu(monkeypatch, schedule, *args, grid, topk, radius, 0.2)
    assert torch.equal(got, want)


@needs_emu
@needs_fma_cpu
@pytest.mark.parametrize("schedule", EMU_BITWISE_SCHEDULES)
@pytest.mark.parametrize("stride,topk,radius", [(16, 7, 7.0), (8, 28, 35.0)])
def test_emulated_cuda_kernel_equals_cpu_kernel_on_blackswan(monkeypatch, schedule, stride, topk, radius):
    """Real frames (colour features, D = 4, logits crowd near 1: many near and exact ties) on a 12 x 14 crop of
    the grid, the presets' top-k and radius."""
    feats, (h, w) = _blackswan_feats(6, stride)
    y0, x0 = h // 3, w // 3
    feats = feats.reshape(6, h, w, -1)[:, y0:y0 + 12, x0:x0 + 14].reshape(6, 12 * 14, -1).contiguous()
    grid, N = (12, 14), 12 * 14
    first_labels = torch.rand(N, 3)
    ctx_labels = torch.softmax(torch.randn(4, N, 3), -1)
    args = [feats[5], feats[0], first_labels, feats[1:5], ctx_labels]
    want = torch.ops.smtc_fast.propagate_labels(*args, grid, topk, radius, 0.2)
    got = _emu(monkeypatch, schedule, *args, grid, topk, radius, 0.2)
    assert torch.equal(got, want)


@needs_emu
def test_emulated_cuda_kernel_deterministic_across_schedules(monkeypatch):
    """No float atomics, fixed-order reductions: the same bits under every thread order (independent of the CPU
    kernel, so this runs on any CPU). Global top-k workspace (k = 400) and the shared-memory one (k = 6)."""
    for grid, n0, topk in [((9, 18), None, 6), ((5, 7), 450, 400)]:
        args = _inputs_with_ties(grid, 3, 24, 3, n0)
        outs = [_emu(monkeypatch, s, *args, grid, topk, 3.0, 0.1) for s in ("forward", "reverse", "random:3")]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_whole_video_matches_reference_and_dense_path():
    """The fused op plugged into propagate_video on real frames. Step by step against the reference on the very
    inputs the reference run saw (so a near tie decided differently at one step cannot leak into the next steps'
    context labels); the fused run on its own agrees with the dense step's argmax almost everywhere (colour
    features, D = 4, have exact ties between cells of equal colour that torch.topk breaks arbitrarily)."""
    feats, grid = _blackswan_feats(8, 16)
    first = F.one_hot(torch.randint(2, (feats.shape[1],)), 2).float()
    checked = []

    def fused(q, f0, l0, cf, cl, grid, topk, radius, temperature, chunk=None):
        return propagate_labels(q, f0, l0, cf, cl, grid, topk, radius, temperature)

    def reference_and_fused(q, f0, l0, cf, cl, grid, topk, radius, temperature, chunk=None):
        want = propagate_labels_reference(q, f0, l0, cf, cl, grid, topk, radius, temperature)
        got = propagate_labels(q, f0, l0, cf, cl, grid, topk, radius, temperature)
        skip, bound = boundary_near_ties(q, f0, l0, cf, cl, grid, topk, radius, temperature)
        assert skip.float().mean() < 0.05
        check_same_prediction(got, want, skip, bound)
        checked.append(1)
        return want

    pre = P.PRESETS["smtc-stride16"]

    def run(step):
        return [p for _, p in P.propagate_video(iter(feats), first, grid, pre.topk, 4, pre.radius, pre.temperature,
                                                step=step)]

    run(reference_and_fused)
    assert len(checked) == feats.shape[0] - 1
    got, dense = run(fused), run(None)
    for g, d in zip(got, dense):
        assert (g.argmax(1) == d.argmax(1)).float().mean() > 0.99


def test_forced_reference_fallback(monkeypatch):
    args = make_inputs((5, 6), 2, 8, 3)
    monkeypatch.setenv("SMTC_FAST_FORCE_REFERENCE", "1")
    got = propagate_labels(*args, (5, 6), 5, 2.0, 0.2)
    torch.testing.assert_close(got, propagate_labels_reference(*args, (5, 6), 5, 2.0, 0.2), rtol=0, atol=0)


def test_float64_uses_reference():
    args = make_inputs((5, 6), 2, 8, 3, dtype=torch.float64)
    got = propagate_labels(*args, (5, 6), 5, 2.0, 0.2)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, brute_force(*args, (5, 6), 5, 2.0, 0.2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_empty(device):
    q, f0, l0, cf, cl = make_inputs((4, 5), 2, 8, 3, device)
    qt = q.T.contiguous().T  # same values, transposed strides
    cft = cf.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous() and not cft.is_contiguous()
    check_same_prediction(propagate_labels(qt, f0, l0, cft, cl, (4, 5), 5, 2.0, 0.2).cpu(),
                          propagate_labels_reference(*[a.cpu() for a in (q, f0, l0, cf, cl)], (4, 5), 5, 2.0, 0.2))
    e = propagate_labels(q[:0], f0, l0, cf[:, :0], cl[:, :0], (0, 5), 5, 2.0, 0.2)
    assert e.shape == (0, 3)


@pytest.mark.parametrize("fn", [propagate_labels, propagate_labels_reference])
def test_bad_inputs(fn):
    q, f0, l0, cf, cl = make_inputs((4, 5), 2, 8, 3)
    with pytest.raises(ValueError, match="grid"):
        fn(q, f0, l0, cf, cl, (5, 5), 5, 2.0, 0.2)
    with pytest.raises(ValueError, match="first_feats"):
        fn(q, f0[:, :4], l0, cf, cl, (4, 5), 5, 2.0, 0.2)
    with pytest.raises(ValueError, match="ctx_labels"):
        fn(q, f0, l0, cf, cl[..., :2], (4, 5), 5, 2.0, 0.2)
    with pytest.raises(ValueError, match="ctx_feats"):
        fn(q, f0, l0, cf[:, :3], cl, (4, 5), 5, 2.0, 0.2)
    with pytest.raises(ValueError, match="topk"):
        fn(q, f0, l0, cf, cl, (4, 5), 0, 2.0, 0.2)
    with pytest.raises(ValueError, match="radius"):
        fn(q, f0, l0, cf, cl, (4, 5), 5, -1.0, 0.2)
    with pytest.raises(ValueError, match="temperature"):
        fn(q, f0, l0, cf, cl, (4, 5), 5, 2.0, 0.0)
    with pytest.raises(ValueError, match="dtype"):
        fn(q, f0.double(), l0, cf, cl, (4, 5), 5, 2.0, 0.2)
    with pytest.raises(ValueError, match="2-D"):
        fn(q[None], f0, l0, cf, cl, (4, 5), 5, 2.0, 0.2)
    with pytest.raises(RuntimeError, match="no autograd"):
        fn(q.requires_grad_(), f0, l0, cf, cl, (4, 5), 5, 2.0, 0.2)


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
def test_op_bad_inputs_direct():
    q, f0, l0, cf, cl = make_inputs((4, 5), 2, 8, 3)
    with pytest.raises(RuntimeError, match="grid"):
        torch.ops.smtc_fast.propagate_labels(q, f0, l0, cf, cl, [5, 5], 5, 2.0, 0.2)
    with pytest.raises(RuntimeError, match="ctx_labels"):
        torch.ops.smtc_fast.propagate_labels(q, f0, l0, cf, cl[..., :2], [4, 5], 5, 2.0, 0.2)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.smtc_fast.propagate_labels(q.double(), f0.double(), l0.double(), cf.double(), cl.double(),
                                             [4, 5], 5, 2.0, 0.2)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.smtc_fast.propagate_labels(q, f0, l0, cf, cl, [4, 5], 5, 2.0, -1.0)


@pytest.mark.skipif(not HAS_KERNEL, reason="extension not built")
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    args = make_inputs((4, 5), 2, 8, 3, device)
    torch.library.opcheck(torch.ops.smtc_fast.propagate_labels, (*args, [4, 5], 5, 2.0, 0.2),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    fn = torch.compile(lambda *a: propagate_labels(*a, (4, 5), 5, 2.0, 0.2), fullgraph=True)
    check_same_prediction(fn(*args).cpu(), propagate_labels_reference(*[a.cpu() for a in args], (4, 5), 5, 2.0, 0.2))
