"""smtc_fast.ops.jf_counts, the compiled semi-supervised DAVIS scorer (csrc/jf_counts/), against the numpy scorer
(its reference, metrics.diagonal_counts_labels) and against an independent brute force written like the official
evaluator (metrics_reference: seg2bmap of each mask and a full scipy disk dilation of each boundary)."""
import glob
import os

import numpy as np
import pytest
import torch

from smtc_fast.evaluate import metrics as M
from smtc_fast.evaluate import metrics_reference as R
from smtc_fast.ops import jf_counts, jf_counts_reference
from smtc_fast.testing import require_kernel

DATA = os.path.join(os.path.dirname(__file__), "data")
PRED = os.path.join(DATA, "davis2017_predictions")
needs_kernel = pytest.mark.usefixtures("jf_counts_kernel")


@pytest.fixture
def jf_counts_kernel():
    """Skip where the extension was not built; fail where the build record says it was but the op is missing."""
    require_kernel("cpu", ("jf_counts",))


def _official_counts(pred, gt, n, r):
    """(T, n, 6) counts the official way: per object and frame, seg2bmap of both masks, both dilated by disk(r)."""
    disk = R._disk(r)
    out = np.zeros((pred.shape[0], n, 6), dtype=np.int64)
    for t in range(pred.shape[0]):
        for k in range(1, n + 1):
            p, g = pred[t] == k, gt[t] == k
            pb, gb = R._seg2bmap(p), R._seg2bmap(g)
            out[t, k - 1] = (np.count_nonzero(p & g), np.count_nonzero(p | g),
                             np.count_nonzero(pb & R.dilate(gb, disk)), np.count_nonzero(gb & R.dilate(pb, disk)),
                             np.count_nonzero(pb), np.count_nonzero(gb))
    return out


def _blobs(rng, t, h, w, n, void=True, extra_ids=True):
    """(T, H, W) uint8 label maps of a few rectangles and discs per object (some touching the image border, some
    objects absent from some frames), speckle noise, void 255 and ids above n."""
    lab = np.zeros((t, h, w), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(t):
        for k in range(1, n + 1):
            if rng.random() < 0.15:
                continue  # object k absent from this frame
            for _ in range(rng.integers(1, 3)):
                cy, cx = rng.integers(-2, h + 2), rng.integers(-2, w + 2)  # centres may sit off the image
                if rng.random() < 0.5:
                    rad = rng.integers(1, max(2, min(h, w) // 2))
                    lab[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad] = k
                else:
                    lab[i, max(cy - rng.integers(0, h), 0):cy + 1, max(cx - rng.integers(0, w), 0):cx + 1] = k
        noise = rng.random((h, w))
        lab[i][noise < 0.01] = rng.integers(0, n + 1)
        if void:
            lab[i][(noise > 0.995)] = 255
        if extra_ids:
            lab[i][(noise > 0.98) & (noise < 0.985)] = n + 1 + rng.integers(0, 3)
    return lab


@needs_kernel
@pytest.mark.parametrize("h,w,n,r", [(1, 1, 1, 1), (1, 70, 2, 3), (70, 1, 2, 3), (17, 63, 2, 4), (31, 64, 3, 8),
                                     (33, 65, 3, 8), (48, 130, 4, 5), (40, 200, 1, 0), (64, 97, 2, 70),
                                     (29, 128, 0, 8)])
def test_kernel_equals_official_style_and_reference(h, w, n, r):
    rng = np.random.default_rng(h * 1000 + w * 10 + n + r)
    pred = _blobs(rng, 4, h, w, n)
    gt = _blobs(rng, 4, h, w, n)
    got = jf_counts(torch.from_numpy(pred), torch.from_numpy(gt), n, r)
    assert got.dtype == torch.int64 and tuple(got.shape) == (4, n, 6)
    np.testing.assert_array_equal(got.numpy(), _official_counts(pred, gt, n, r))
    np.testing.assert_array_equal(got.numpy(), jf_counts_reference(torch.from_numpy(pred), torch.from_numpy(gt),
                                                                   n, r).numpy())


@needs_kernel
def test_kernel_edge_cases():
    h, w, r = 40, 90, 8
    pred = np.zeros((6, h, w), dtype=np.uint8)
    gt = np.zeros((6, h, w), dtype=np.uint8)
    pred[0], gt[0] = 1, 1  # the whole frame: no boundary anywhere (the official border rule), J = 1
    gt[1] = 1  # prediction empty, GT the whole frame
    pred[2, 0, 0], gt[2, h - 1, w - 1] = 1, 1  # single pixels in opposite corners
    # a lone pixel's boundary is a 2 x 2 block (itself and its W, N, NW neighbours, seg2bmap's lower-index side):
    pred[3, 20, 20], gt[3, 20, 29] = 1, 1  # blocks' nearest columns exactly r apart: two pixels match each way
    pred[4, 20, 20], gt[4, 20, 30] = 1, 1  # r + 1 apart: none
    pred[5, :, w - 1], gt[5, h - 1, :] = 1, 1  # last column / last row only
    for n in (1, 2):  # object 2 is empty everywhere
        got = jf_counts(torch.from_numpy(pred), torch.from_numpy(gt), n, r).numpy()
        np.testing.assert_array_equal(got, _official_counts(pred, gt, n, r))
    got = jf_counts(torch.from_numpy(pred), torch.from_numpy(gt), 1, r).numpy()[:, 0]
    assert got[0].tolist() == [h * w, h * w, 0, 0, 0, 0]
    assert got[3][2:].tolist() == [2, 2, 4, 4] and got[4][2:].tolist() == [0, 0, 4, 4]


@needs_kernel
def test_kernel_label_dtypes_and_empty_shapes():
    rng = np.random.default_rng(0)
    pred = _blobs(rng, 3, 30, 70, 3)
    gt = _blobs(rng, 3, 30, 70, 3)
    want = _official_counts(pred, gt, 3, 5)
    for dt in (torch.uint8, torch.int32, torch.int64):
        p, g = torch.from_numpy(pred).to(dt), torch.from_numpy(gt).to(dt)
        np.testing.assert_array_equal(jf_counts(p, g, 3, 5).numpy(), want)
        # non-contiguous input (a transposed copy transposed back): same counts
        np.testing.assert_array_equal(jf_counts(p.transpose(1, 2).contiguous().transpose(1, 2), g, 3, 5).numpy(),
                                      want)
    # ids beyond the dtype of the maps (n_objects 300 on uint8): the extra objects are empty
    big = jf_counts(torch.from_numpy(pred), torch.from_numpy(gt), 300, 5).numpy()
    np.testing.assert_array_equal(big[:, :3], want)
    assert (big[:, 255:, 1:] == 0).all()  # id 255 (void) does exist as a label: objects 256.. are empty
    assert tuple(jf_counts(torch.zeros(0, 5, 5, dtype=torch.uint8), torch.zeros(0, 5, 5, dtype=torch.uint8), 2,
                           3).shape) == (0, 2, 6)
    assert tuple(jf_counts(torch.zeros(2, 0, 5, dtype=torch.uint8), torch.zeros(2, 0, 5, dtype=torch.uint8), 2,
                           3).shape) == (2, 2, 6)


def test_bad_inputs_name_the_argument():
    a = torch.zeros(2, 5, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match="pred must be 3-D"):
        jf_counts(a[0], a, 1, 3)
    with pytest.raises(ValueError, match="same shape"):
        jf_counts(a, a[:, :4], 1, 3)
    with pytest.raises(ValueError, match="same dtype"):
        jf_counts(a, a.long(), 1, 3)
    with pytest.raises(ValueError, match="uint8, int32 or int64"):
        jf_counts(a.short(), a.short(), 1, 3)
    with pytest.raises(ValueError, match="floating|uint8"):
        jf_counts(a.float(), a.float(), 1, 3)
    with pytest.raises(ValueError, match="n_objects"):
        jf_counts(a, a, -1, 3)
    with pytest.raises(ValueError, match="radius"):
        jf_counts(a, a, 1, -1)


@needs_kernel
def test_raw_op_checks_and_opcheck():
    a = torch.zeros(2, 5, 5, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.smtc_fast.jf_counts(a, a[:, :4], 1, 3)
    with pytest.raises(RuntimeError, match="uint8, int32 or int64"):
        torch.ops.smtc_fast.jf_counts(a.float(), a.float(), 1, 3)
    rng = np.random.default_rng(1)
    p = torch.from_numpy(_blobs(rng, 2, 20, 70, 2))
    g = torch.from_numpy(_blobs(rng, 2, 20, 70, 2))
    torch.library.opcheck(torch.ops.smtc_fast.jf_counts.default, (p, g, 2, 4),
                          test_utils=("test_schema", "test_faketensor"))


@needs_kernel
@pytest.mark.parametrize("seq", ["judo", "dogs-jump"])
def test_kernel_on_real_multi_object_frames(seq):
    from PIL import Image

    files = sorted(glob.glob(os.path.join(PRED, "osvos_semi", seq, "*.png")))[1:-1:4]
    gt = np.stack([np.array(Image.open(f)) for f in files])
    pred = np.stack([np.array(Image.open(os.path.join(PRED, "rvos_unsup", seq, os.path.basename(f))))
                     for f in files])  # ids above the object count stay in: background for the kernel
    n = int(gt.max())
    r = M.boundary_radius(*gt.shape[1:])
    got = jf_counts(torch.from_numpy(pred), torch.from_numpy(gt), n, r).numpy()
    np.testing.assert_array_equal(got, jf_counts_reference(torch.from_numpy(pred), torch.from_numpy(gt), n,
                                                           r).numpy())
    # and the scores through the evaluator: kernel and numpy paths identical to the last bit
    dropped = np.where(pred <= n, pred, 0).astype(np.uint8)
    Jk, Fk = M.evaluate_sequence(gt, dropped, "semi-supervised", n_objects=n, kernel=True)
    Jn, Fn = M.evaluate_sequence(gt, dropped, "semi-supervised", n_objects=n, kernel=False)
    np.testing.assert_array_equal(Jk, Jn)
    np.testing.assert_array_equal(Fk, Fn)


@needs_kernel
def test_kernel_radius_beyond_the_frame():
    """A tolerance wider than the frame (bound_th >= 1 gives the radius in pixels): every boundary pixel matches
    as soon as the other mask has a boundary; the kernel's dilation stops growing once it spans the box."""
    rng = np.random.default_rng(7)
    pred = _blobs(rng, 3, 30, 150, 2)
    gt = _blobs(rng, 3, 30, 150, 2)
    for r in (160, 5000, 1 << 20):  # the frame's diagonal is 153
        got = jf_counts(torch.from_numpy(pred), torch.from_numpy(gt), 2, r).numpy()
        both = (got[..., 4] > 0) & (got[..., 5] > 0)
        np.testing.assert_array_equal(got[..., 2], np.where(both, got[..., 4], 0))
        np.testing.assert_array_equal(got[..., 3], np.where(both, got[..., 5], 0))
    np.testing.assert_array_equal(jf_counts(torch.from_numpy(pred), torch.from_numpy(gt), 2, 100).numpy(),
                                  jf_counts_reference(torch.from_numpy(pred), torch.from_numpy(gt), 2, 100).numpy())
