"""JHMDB (pose, PCK) and VIP (parts, mIoU) propagation plumbing on tiny synthetic datasets in the official layouts."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from smtc_fast.evaluate import io as eio
from smtc_fast.evaluate import metrics as M
from smtc_fast.evaluate import propagation as P

DATA = os.path.join(os.path.dirname(__file__), "data", "davis2016")


class PositionalFeatures:
    """A feature that depends on the cell only (the same for every frame): each cell's best key is itself."""

    def __init__(self, stride=8, dim=64, seed=0):
        self.stride, self.dim, self.seed = stride, dim, seed

    def __call__(self, images):
        b, _, h, w = images.shape
        gh, gw = -(-h // self.stride), -(-w // self.stride)
        g = torch.Generator().manual_seed(self.seed)
        f = torch.randn(self.dim, gh, gw, generator=g)
        return f[None].expand(b, -1, -1, -1)


def test_jhmdb_static_video_pck_is_perfect(tmp_path):
    root = tmp_path / "JHMDB"
    clip = root / "Rename_Images" / "wave" / "clip1"
    clip.mkdir(parents=True)
    frame = Image.open(os.path.join(DATA, "JPEGImages/480p/blackswan/00000.jpg")).resize((320, 240))
    T = 5
    for i in range(T):
        frame.save(clip / f"{i + 1:05d}.png")
    rng = np.random.default_rng(0)
    joints = np.stack([rng.uniform(60, 260, 15), rng.uniform(40, 200, 15)])  # (2, 15), 0-based pixels
    pos_img = np.repeat(joints[:, :, None], T, axis=2) + 1  # 1-based, static
    (root / "joint_annotations" / "wave" / "clip1").mkdir(parents=True)
    savemat(root / "joint_annotations" / "wave" / "clip1" / "joint_positions.mat", {"pos_img": pos_img})
    crw = P.PRESETS["crw"]
    preset = P.Preset(**{**crw.__dict__, "n_context": 7})  # CRW's JHMDB setting (videowalk issue #10)
    s = P.evaluate_jhmdb_propagation(str(root), str(tmp_path / "out"), PositionalFeatures(), preset, crop_size=320,
                                     progress=False)
    # the labels are copied frame to frame, so every joint is decoded where frame 0's heat map puts it:
    # within a grid cell (8 px at 320 px, x 320/320 and y 240/320) of the truth, far below 0.1 x the body size
    assert s["global"]["PCK@0.1"] == 100.0 and s["global"]["PCK@0.2"] == 100.0
    saved = np.load(tmp_path / "out" / "poses" / "wave__clip1.npy")
    assert saved.shape == (2, 15, T)
    assert np.abs(saved[:, :, 1:] - joints[:, :, None]).max() < 8.0


def test_vip_miou_equals_confusion_of_written_pngs(tmp_path):
    root = tmp_path / "VIP_Fine"
    (root / "lists").mkdir(parents=True)
    (root / "lists" / "val_videos.txt").write_text("videoA\n")
    (root / "Images" / "videos" / "videoA").mkdir(parents=True)
    (root / "Category_ids" / "videoA").mkdir(parents=True)
    for i in range(4):
        name = f"{i:06d}"
        rgb = Image.open(os.path.join(DATA, "JPEGImages/480p/blackswan", f"{i:05d}.jpg")).resize((427, 240))
        rgb.save(root / "Images" / "videos" / "videoA" / f"{name}.jpg")
        fg = np.array(Image.open(os.path.join(DATA, "Annotations/480p/blackswan", f"{i:05d}.png"))
                      .resize((427, 240), Image.NEAREST)) > 0
        ids = np.zeros(fg.shape, np.uint8)
        ids[fg] = 13  # 'face', say; the upper half of the swan becomes 'hat'
        rows = np.nonzero(fg.any(1))[0]
        ids[: (rows[0] + rows[-1]) // 2][fg[: (rows[0] + rows[-1]) // 2]] = 1
        ids[-3:, :] = 255  # ignored by the protocol
        Image.fromarray(ids, mode="L").save(root / "Category_ids" / "videoA" / f"{name}.png")
    out = tmp_path / "out"
    s = P.evaluate_vip_propagation(str(root), str(out), P.ColorFeatures(8), P.PRESETS["smtc-stride16"],
                                   crop_size=560, progress=False)
    hist = np.zeros((20, 20), np.int64)
    for i in range(4):
        gt = np.array(Image.open(root / "Category_ids" / "videoA" / f"{i:06d}.png"))
        pred = eio.read_label(str(out / "videoA" / f"{i:06d}.png"))
        assert pred.shape == gt.shape and set(np.unique(pred)) <= {0, 1, 13}
        hist += M.confusion_matrix(gt, pred)
    assert s["global"]["mIoU"] == pytest.approx(M.miou_from_confusion(hist)[0])
    assert 0.3 < s["global"]["mIoU"] <= 1.0
    assert os.path.isfile(out / "overlays" / "videoA.jpg")
