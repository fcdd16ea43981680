"""DAVIS J&F, PCK and mIoU against the pinned official values and against the official-style reference.

Pinned values: design/evaluation_protocols.md §1.9, computed by running the unmodified davis2017-evaluation on the
fixtures copied to python_tests/data (see its README for attribution).
"""
import glob
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from smtc_fast.evaluate import metrics as M
from smtc_fast.evaluate import metrics_reference as R

DATA = os.path.join(os.path.dirname(__file__), "data")


def _labels(folder):
    files = sorted(glob.glob(os.path.join(DATA, folder, "*.png")))
    assert files, folder
    return np.stack([np.array(Image.open(f)) for f in files])


# ---------------------------------------------------------------------------------------------------------------
# pinned official values on real data

def test_pinned_semisupervised_osvos_vs_davis16():
    per_object = {}
    for seq in ("blackswan", "car-shadow"):
        gt = (_labels(f"davis2016/Annotations/480p/{seq}") > 0).astype(np.uint8)
        pred = (_labels(f"davis2017_predictions/osvos_semi/{seq}") > 0).astype(np.uint8)
        J, F = M.evaluate_sequence(gt[1:-1], pred[1:-1], "semi-supervised", n_objects=1)
        per_object[f"{seq}_1"] = (J[0], F[0])
    g, rows = M.summarize(per_object)
    pinned = {"J&F-Mean": 0.940731, "J-Mean": 0.935711, "J-Recall": 1.0, "J-Decay": 0.055844,
              "F-Mean": 0.945752, "F-Recall": 1.0, "F-Decay": 0.084666}
    for key, want in pinned.items():
        assert abs(g[key] - want) <= 1e-6, (key, g[key], want)
    # per-object values are pinned to 5 decimals: within half a unit of the last digit
    for name, j, f in (("blackswan_1", 0.94302, 0.97410), ("car-shadow_1", 0.92840, 0.91741)):
        assert abs(rows[name]["J-Mean"] - j) <= 5e-6
        assert abs(rows[name]["F-Mean"] - f) <= 5e-6


def test_pinned_unsupervised_rvos_official_matching():
    per_object = {}
    for seq in ("judo", "dogs-jump"):
        gt = _labels(f"davis2017_predictions/osvos_semi/{seq}")
        pred = _labels(f"davis2017_predictions/rvos_unsup/{seq}")
        J, F = M.evaluate_sequence(gt, pred, "unsupervised", "official")
        assert J.shape == (int(gt[0].max()), gt.shape[0])
        for k in range(J.shape[0]):
            per_object[f"{seq}_{k + 1}"] = (J[k], F[k])
    g, _ = M.summarize(per_object)
    pinned = {"J&F-Mean": 0.37214, "J-Mean": 0.31157, "J-Recall": 0.30553, "J-Decay": 0.07563,
              "F-Mean": 0.43271, "F-Recall": 0.52121, "F-Decay": 0.12368}
    for key, want in pinned.items():  # pinned to 5 decimals
        assert abs(g[key] - want) <= 5e-6, (key, g[key], want)


def test_fast_equals_reference_on_real_crops():
    """Every (proposal, object, frame) J and F equals the official-style loops, on crops of real masks."""
    gt_l = _labels("davis2017_predictions/osvos_semi/judo")[::6, 150:330, 300:620]  # odd-ish 180x320 crops
    pr_l = _labels("davis2017_predictions/rvos_unsup/judo")[::6, 150:330, 300:620]
    gt = M.labels_to_onehot(gt_l, 2)
    pred = M.labels_to_onehot(pr_l)
    void = np.zeros(gt_l.shape, bool)
    void[:, :, 100:110] = True  # a void strip through the objects
    J, F = M.pairwise_jf(gt, pred, void)
    for p in range(pred.shape[0]):
        for g in range(gt.shape[0]):
            np.testing.assert_allclose(J[p, g], R.eval_iou(gt[g], pred[p], void), rtol=0, atol=1e-12)
            np.testing.assert_allclose(F[p, g], R.eval_boundary(gt[g], pred[p], void), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# hand-made cases

def _random_blobs(rng, n, t, h, w):
    """n objects as smoothed random fields: ragged boundaries, some touching the image border."""
    out = np.zeros((n, t, h, w), bool)
    for i in range(n):
        field = ndimage.gaussian_filter(rng.standard_normal((t, h, w)), (0, 3, 3))
        out[i] = field > 0.08 + 0.05 * i
    return out


@pytest.mark.parametrize("h,w", [(37, 53), (64, 64), (1, 9), (240, 320)])
def test_pairwise_matches_reference_odd_sizes_and_void(h, w):
    rng = np.random.default_rng(h * 1000 + w)
    gt = _random_blobs(rng, 2, 3, h, w)
    pred = _random_blobs(rng, 4, 3, h, w)
    pred[1, 0] = False  # an empty proposal on frame 0
    gt[0, 1] = False  # an empty object on frame 1
    void = np.zeros((3, h, w), bool)
    void[:, :, w // 3: w // 3 + 3] = True
    for v in (None, void):
        J, F = M.pairwise_jf(gt, pred, v)
        for p in range(4):
            for g in range(2):
                np.testing.assert_allclose(J[p, g], R.eval_iou(gt[g], pred[p], v), atol=1e-12)
                np.testing.assert_allclose(F[p, g], R.eval_boundary(gt[g], pred[p], v), atol=1e-12)


def test_empty_masks_follow_official_rules():
    z = np.zeros((1, 1, 20, 30), bool)
    one = z.copy()
    one[0, 0, 5:10, 5:10] = True
    J, F = M.pairwise_jf(z, z)
    assert J[0, 0, 0] == 1.0 and F[0, 0, 0] == 1.0  # both empty: J = 1 (empty union), P = R = 1
    J, F = M.pairwise_jf(one, z)  # nothing predicted
    assert J[0, 0, 0] == 0.0 and F[0, 0, 0] == 0.0
    J, F = M.pairwise_jf(z, one)  # prediction where there is nothing
    assert J[0, 0, 0] == 0.0 and F[0, 0, 0] == 0.0


def test_void_everywhere_scores_one():
    gt = np.ones((1, 2, 8, 8), bool)
    pred = np.zeros((1, 2, 8, 8), bool)
    J, F = M.pairwise_jf(gt, pred, np.ones((2, 8, 8), bool))
    assert np.all(J == 1.0) and np.all(F == 1.0)


def test_seg2bmap_border_and_disk():
    seg = np.zeros((5, 6), bool)
    seg[1:3, 1:3] = True
    b = M.seg2bmap(seg)
    # a pixel is on the boundary when its E, S or SE neighbour differs: the lower-index side of each edge
    want = np.zeros((5, 6), bool)
    for y, x in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]:
        want[y, x] = True
    np.testing.assert_array_equal(b, want)
    np.testing.assert_array_equal(b, R._seg2bmap(seg))
    full = np.ones((4, 4), bool)
    assert not M.seg2bmap(full).any()  # touching every border: no boundary at all
    assert M.disk_offsets(8)[0].size == 197  # skimage.morphology.disk(8).sum()
    assert M.boundary_radius(480, 854) == 8 and M.boundary_radius(480, 910) == 9
    assert M.boundary_radius(480, 1152) == 10 and M.boundary_radius(240, 320) == 4


def test_dilate_disk_equals_scipy():
    rng = np.random.default_rng(0)
    b = rng.random((3, 40, 57)) < 0.02
    for r in (0, 1, 4, 8):
        want = np.stack([ndimage.binary_dilation(x, structure=R._disk(r)) if r else x for x in b])
        np.testing.assert_array_equal(M.dilate_disk(b, r), want)


def test_boundary_pixels_equal_full_frame_seg2bmap():
    rng = np.random.default_rng(1)
    masks = _random_blobs(rng, 3, 1, 45, 61)[:, 0]
    masks[2] = False
    for m, idx in zip(masks, M.boundary_pixels(masks)):
        np.testing.assert_array_equal(np.sort(idx), np.flatnonzero(M.seg2bmap(m)))


def test_identity_switch_official_vs_per_frame():
    """Two objects whose ids swap halfway: the official matching keeps one assignment for the sequence and is
    penalised; SMTC's per-frame matching forgives it. Both agree with the official-style reference."""
    t, h, w = 8, 30, 40
    gt = np.zeros((2, t, h, w), bool)
    gt[0, :, 5:15, 5:15] = True
    gt[1, :, 15:25, 22:35] = True
    pred = gt.copy()
    pred[0, 5:], pred[1, 5:] = gt[1, 5:], gt[0, 5:]  # the switch (unequal halves so matching is unique)
    Jo, Fo = M.evaluate_unsupervised(gt, pred, matching="official")
    Jp, Fp = M.evaluate_unsupervised(gt, pred, matching="per-frame")
    Jr, Fr = R.evaluate_unsupervised(gt, pred, matching="official")
    np.testing.assert_allclose(Jo, Jr, atol=1e-12)
    np.testing.assert_allclose(Fo, Fr, atol=1e-12)
    Jr, Fr = R.evaluate_unsupervised(gt, pred, matching="per-frame")
    np.testing.assert_allclose(Jp, Jr, atol=1e-12)
    np.testing.assert_allclose(Fp, Fr, atol=1e-12)
    assert np.all(Jp == 1.0) and np.all(Fp == 1.0)
    np.testing.assert_allclose(Jo.mean(), 5 / 8)  # right on the 5 frames before the switch, 0 after
    assert (Jo.mean() + Fo.mean()) / 2 < (Jp.mean() + Fp.mean()) / 2


def test_too_many_ids_is_an_error():
    gt = np.zeros((3, 10, 10), np.uint8)
    gt[:, 2:5, 2:5] = 1
    pred = gt.copy()
    pred[1, 6:8, 6:8] = 2
    with pytest.raises(M.TooManyObjectsError, match="object id 2"):
        M.evaluate_sequence(gt, pred, "semi-supervised")
    pred = np.zeros((3, 10, 10), np.uint8)
    pred[0].flat[:21] = np.arange(1, 22)
    with pytest.raises(M.TooManyObjectsError, match="21 object ids"):
        M.evaluate_sequence(gt, pred, "unsupervised", "official")
    M.evaluate_sequence(gt, pred, "unsupervised", "per-frame")  # 300 allowed there


def test_missing_object_is_zero_padded():
    gt = np.zeros((4, 12, 12), np.uint8)
    gt[:, 1:4, 1:4] = 1
    gt[:2, 6:9, 6:9] = 2  # object 2 disappears after frame 1
    pred = np.where(gt == 1, 1, 0).astype(np.uint8)
    J, F = M.evaluate_sequence(gt, pred, "semi-supervised")
    np.testing.assert_array_equal(J[0], 1.0)
    np.testing.assert_array_equal(J[1], [0, 0, 1, 1])  # missing where present, 1 where both are empty


def test_db_statistics_by_hand():
    v = np.array([1.0, 0.9, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    m, r, d = M.db_statistics(v)
    assert m == pytest.approx(v.mean())
    assert r == pytest.approx(4 / 9)  # strictly > 0.5
    # ids = round(linspace(1, 9, 5)) - 1 = [0, 2, 4, 6, 8]; bins share edges: v[0:3] and v[6:9]
    assert d == pytest.approx(v[0:3].mean() - v[6:9].mean())


def test_unsupervised_void_is_honoured():
    gt = np.zeros((2, 20, 20), np.uint8)
    gt[:, 2:10, 2:10] = 1
    gt[:, :, 15:] = 255  # void strip
    pred = np.zeros_like(gt)
    pred[:, 2:10, 2:10] = 1
    pred[:, :, 15:] = 2  # a proposal entirely inside the void
    J, F = M.evaluate_sequence(gt, pred, "unsupervised")
    np.testing.assert_array_equal(J, 1.0)
    np.testing.assert_array_equal(F, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# JHMDB PCK and VIP mIoU

def test_pck_by_hand():
    # one video, 2 joints, 3 frames; GT box per frame: joints at (0,0) and (30,40) -> diag 50, ref 30
    gt = np.zeros((2, 2, 3))
    gt[:, 1, :] = [[30], [40]]
    pred = gt.copy()
    pred[0, 0, 1] += 2.0  # frame 1, joint 0: dist 2 / 30 = 0.067 -> correct at 0.1
    pred[0, 1, 1] += 5.0  # frame 1, joint 1: 0.167 -> wrong at 0.1, right at 0.2
    pred[:, 0, 2] = -1  # frame 2, joint 0 not predicted: invisible (and the box uses joint 1 only: ref 0)
    pred[0, 1, 2] += 0.0
    out = M.pck([pred], [gt], thresholds=(0.1, 0.2))
    # joint 0: frame 1 only (frame 0 skipped, frame 2 invisible) -> 100; joint 1: frames 1 (0.167), 2 (0/0 = nan)
    # frame 2 has a zero-size box -> nan distance, never <= a: joint 1 = 0/2 at 0.1 and 1/2 at 0.2
    assert out[0.1] == pytest.approx((100 + 0) / 2)
    assert out[0.2] == pytest.approx((100 + 50) / 2)


def test_miou_by_hand():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 3]])
    hist = M.confusion_matrix(gt, pred, n_classes=20)
    assert hist.sum() == 6  # the 255 pixels are ignored
    miou, iou = M.miou_from_confusion(hist)
    assert iou[0] == pytest.approx(1 / 3) and iou[1] == pytest.approx(2 / 3) and iou[2] == pytest.approx(1 / 2)
    assert np.isnan(iou[3]) or iou[3] == 0
    assert miou == pytest.approx(np.nanmean(iou))
    with pytest.raises(ValueError, match="outside"):
        M.confusion_matrix(gt, pred + 20)


@pytest.mark.parametrize("h,w", [(37, 53), (2, 2), (50, 1)])
def test_label_map_path_equals_onehot_path(h, w):
    """The label-map fast path (joint histogram, all boundaries in 3 passes) equals one-hot masks + seg2bmap."""
    rng = np.random.default_rng(h + w)
    smooth = ndimage.gaussian_filter(rng.standard_normal((h, w)), 2) if min(h, w) > 2 else rng.standard_normal((h, w))
    gt = np.digitize(smooth, [-0.5, 0.0, 0.4]).astype(np.uint8)  # ids 0..3, 3 = an object the GT list lacks
    pred = rng.integers(0, 6, (h, w)).astype(np.uint8)
    pred[: h // 2] = gt[: h // 2]
    void = np.zeros((h, w), bool)
    void[:, w // 2:w // 2 + 1] = True
    for v in (None, void):
        a = M.frame_pair_counts_labels(pred, gt, 5, 2, v, radius=3)
        b = M.frame_pair_counts(pred[None] == np.arange(1, 6)[:, None, None], gt[None] == np.arange(1, 3)[:, None, None],
                                v, radius=3)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for k, idx in enumerate(M.label_boundary_pixels(gt, 3)):
        np.testing.assert_array_equal(idx, np.flatnonzero(M.seg2bmap(gt == k + 1)))
