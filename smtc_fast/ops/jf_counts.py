"""DAVIS semi-supervised J and F counts of the object pairs (k, k): the scorer's kernel (issue 16 part 3).

    pred       (T, H, W)  uint8 / int32 / int64  predicted label maps (one dtype for both)
    gt         (T, H, W)  same dtype             ground-truth label maps
    n_objects  int >= 0   objects are ids 1..n_objects; every other value (0, void 255, higher ids) is background
    radius     int >= 0   boundary tolerance in pixels (metrics.boundary_radius: ceil(0.008 * diagonal), 8 at 480p)
    -> counts  (T, n_objects, 6) int64: inter, union, fg_match, gt_match, n_fg, n_gt per frame and object

J = inter / union and F from the match counts as the official evaluator (metrics.j_from_counts / f_from_counts;
design/evaluation_protocols.md §1.2-§1.3): boundaries are the official seg2bmap of (label == k), fg_match counts
prediction boundary pixels within the disk of radius r (dx^2 + dy^2 <= r^2, skimage's disk under cv2.dilate) of a
GT boundary pixel, gt_match the converse. Exact integers, so J and F equal the official code's to the last bit.

The reference is the numpy scorer `smtc_fast.evaluate.metrics.diagonal_counts_labels` frame by frame with its
sorted-key counter pair_counts (per-object bounding boxes, seg2bmap, a search per boundary pixel and disk row; a
different algorithm from the kernel's), itself tested against the official-style full dilations of
metrics_reference.py. The CPU kernel (csrc/jf_counts/) works on bit-packed rows: 64 pixels per integer operation
for the boundaries, the disk dilation (one-pixel shift steps) and the popcounts; on the DAVIS fixtures it takes
0.1-0.2 ms per object and 480p frame on one thread, 7-10x the numpy path.
CPU only (an evaluator: the label maps come from PNG decoding on the CPU); no autograd (integer counts).
"""
import numpy as np
import torch

from smtc_fast import _extension
from smtc_fast.ops._common import _KERNELS, NAMESPACES, check_same, check_tensor

LABEL_DTYPES = (torch.uint8, torch.int32, torch.int64)


def _check(pred, gt, n_objects, radius):
    check_tensor("pred", pred, 3, floating=False)
    check_tensor("gt", gt, 3, floating=False)
    check_same("pred", pred, "gt", gt)
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"pred (T, H, W) and gt (T, H, W) must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(gt.shape)}")
    if pred.dtype not in LABEL_DTYPES:
        raise ValueError(f"pred and gt must be uint8, int32 or int64 label maps, got {pred.dtype}")
    if int(n_objects) < 0:
        raise ValueError(f"n_objects must be >= 0, got {n_objects}")
    if not 0 <= int(radius) <= 1 << 20:
        raise ValueError(f"radius must be in [0, 2^20] pixels, got {radius}")


def has_kernel():
    """True when the compiled CPU kernel serves jf_counts (extension built, SMTC_FAST_FORCE_REFERENCE unset). The
    CUDA execution tier has no twin of it: the scorer is CPU code, so emulated_cuda() changes nothing here."""
    return _KERNELS["cpu"] and not _extension.force_reference()


def jf_counts_reference(pred, gt, n_objects, radius):
    """The numpy scorer frame by frame (metrics.diagonal_counts_labels with pair_counts), as a (T, n_objects, 6)
    int64 tensor."""
    from smtc_fast.evaluate import metrics  # the evaluator's numpy code is the specification

    _check(pred, gt, n_objects, radius)
    p = pred.detach().cpu().numpy()
    g = gt.detach().cpu().numpy()
    n = int(n_objects)
    out = np.zeros((p.shape[0], n, 6), dtype=np.int64)
    for t in range(p.shape[0]):
        c = metrics.diagonal_counts_labels(p[t], g[t], n, int(radius), pair=metrics.pair_counts)
        out[t] = np.stack([c[k] for k in ("inter", "union", "fg_match", "gt_match", "n_fg", "n_gt")], axis=1)
    return torch.from_numpy(out).to(pred.device)


def jf_counts(pred, gt, n_objects, radius):
    """(T, n_objects, 6) int64 counts of the pairs (k, k); see the module docstring. The kernel runs on CPU tensors
    of LABEL_DTYPES over torch's intra-op threads (frames in parallel); anything else uses the reference."""
    _check(pred, gt, n_objects, radius)
    if has_kernel() and pred.device.type == "cpu":
        return torch.ops.smtc_fast.jf_counts(pred, gt, int(n_objects), int(radius))
    return jf_counts_reference(pred, gt, n_objects, radius)


def _register(ns):
    @torch.library.register_fake(f"{ns}::jf_counts")
    def _jf_counts_fake(pred, gt, n_objects, radius):
        _check(pred, gt, n_objects, radius)
        return pred.new_empty((pred.shape[0], n_objects, 6), dtype=torch.int64)


if "smtc_fast" in NAMESPACES:  # CPU only: the CUDA execution tier's namespace has no jf_counts
    _register("smtc_fast")
