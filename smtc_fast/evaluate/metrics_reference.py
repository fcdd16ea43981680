"""Straightforward DAVIS J and F, written the way the official davis2017-evaluation computes them.

Per (object, proposal) loops, a full dilation of both masks for every pair and frame, nothing shared. It is the test
oracle for the vectorised `metrics.py` and the baseline of bench/bench_eval.py. It needs neither OpenCV nor
scikit-image: the disk dilation is scipy.ndimage.binary_dilation with the disk structuring element, which equals
cv2.dilate with that kernel on binary input (protocol §1.3). Written from design/evaluation_protocols.md §1.
"""
import math

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment


def _disk(r):
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return (x * x + y * y) <= r * r


def dilate(b, disk):
    """Binary dilation; bench/bench_eval.py swaps in cv2.dilate (the official call) when OpenCV is installed."""
    return ndimage.binary_dilation(b, structure=disk)


def _seg2bmap(seg):
    seg = seg.astype(bool)
    h, w = seg.shape
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def eval_iou(annotation, segmentation, void=None):
    """(T, H, W) or (H, W) -> per-frame J."""
    annotation = annotation.astype(bool)
    segmentation = segmentation.astype(bool)
    void = np.zeros_like(segmentation) if void is None else void.astype(bool)
    inters = np.sum((segmentation & annotation) & ~void, axis=(-2, -1))
    union = np.sum((segmentation | annotation) & ~void, axis=(-2, -1))
    j = inters / np.where(union == 0, 1, union)
    return np.where(union == 0, 1.0, j)


def f_measure(fg, gt, void=None, bound_th=0.008):
    """One frame (H, W) -> F."""
    fg = fg.astype(bool)
    gt = gt.astype(bool)
    void = np.zeros_like(fg) if void is None else void.astype(bool)
    bound_pix = bound_th if bound_th >= 1 else int(math.ceil(bound_th * np.linalg.norm(fg.shape)))
    fg_b = _seg2bmap(fg & ~void)
    gt_b = _seg2bmap(gt & ~void)
    disk = _disk(bound_pix)
    fg_dil = dilate(fg_b, disk)
    gt_dil = dilate(gt_b, disk)
    gt_match = gt_b & fg_dil
    fg_match = fg_b & gt_dil
    n_fg = fg_b.sum()
    n_gt = gt_b.sum()
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = fg_match.sum() / float(n_fg)
        recall = gt_match.sum() / float(n_gt)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def eval_boundary(annotation, segmentation, void=None, bound_th=0.008):
    """(T, H, W) -> per-frame F."""
    return np.array([f_measure(segmentation[t], annotation[t], None if void is None else void[t], bound_th)
                     for t in range(annotation.shape[0])])


def evaluate_semisupervised(gt, pred):
    """gt (G, T, H, W), pred (P<=G, T, H, W) -> J, F (G, T)."""
    if pred.shape[0] < gt.shape[0]:
        pred = np.concatenate([pred, np.zeros((gt.shape[0] - pred.shape[0],) + pred.shape[1:], bool)])
    J = np.zeros(gt.shape[:2])
    F = np.zeros(gt.shape[:2])
    for ii in range(gt.shape[0]):
        J[ii] = eval_iou(gt[ii], pred[ii])
        F[ii] = eval_boundary(gt[ii], pred[ii])
    return J, F


def evaluate_unsupervised(gt, pred, void=None, matching="official"):
    """gt (G, T, H, W), pred (P, T, H, W), void (T, H, W) -> matched J, F (G, T)."""
    if pred.shape[0] < gt.shape[0]:
        pred = np.concatenate([pred, np.zeros((gt.shape[0] - pred.shape[0],) + pred.shape[1:], bool)])
    J = np.zeros((pred.shape[0], gt.shape[0], gt.shape[1]))
    F = np.zeros_like(J)
    for ii in range(gt.shape[0]):
        for jj in range(pred.shape[0]):
            J[jj, ii] = eval_iou(gt[ii], pred[jj], void)
            F[jj, ii] = eval_boundary(gt[ii], pred[jj], void)
    if matching == "official":
        cost = (np.mean(J, axis=2) + np.mean(F, axis=2)) / 2
        rows, cols = linear_sum_assignment(-cost)
        return J[rows, cols, :], F[rows, cols, :]
    Jm = np.zeros((gt.shape[0], gt.shape[1]))
    Fm = np.zeros_like(Jm)
    for t in range(gt.shape[1]):
        rows, cols = linear_sum_assignment(-(J[:, :, t] + F[:, :, t]))
        Jm[:, t] = J[rows, cols, t]
        Fm[:, t] = F[rows, cols, t]
    return Jm, Fm
