"""`smtc eval-prop`: label propagation, the CRW protocol that SMTC uses (design/evaluation_protocols.md §2).

    feats_t = L2norm(features of frame t) on the label grid (h, w)                     (N = h*w, D)
    keys    = frame 0 (no radius limit) + the n_context previous frames (radius-limited)
    pred_t  = sum over the top-k keys of softmax(cos / temperature) * their soft labels      (N, C)
    pred_t is fed back as the label of frame t for later frames; frame 0 gets the given annotation.

Per video: frames -> features (any callable) -> downsampled one-hot labels (bilinear point sampling, as cv2's
INTER_LINEAR) -> `propagate_video` -> bilinear up-sampling, argmax -> indexed PNGs in the DAVIS layout -> the
dataset's official metric (DAVIS J&F semi-supervised, JHMDB PCK, VIP mIoU).

Memory. The official loader front-pads the video with n_context copies of frame 0 and gathers, for every target,
its 21 key frames in host memory (videowalk issue #4). Here features are computed in batches while the video is
walked, and only frame 0 plus the last n_context frames are kept: (n_context + 1 + batch) x N x D floats whatever
the video length. The affinity is computed in chunks of queries with a running top-k over key frames, so no
(N, 21 N) matrix ever exists. The dense step lives in `propagate_dense`, which the fused kernel
`smtc_fast.ops.propagate_labels` will replace one for one.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from smtc_fast._lazy import lazy, no_grad, resolve_device
from smtc_fast.evaluate import io as eio
from smtc_fast.evaluate import metrics

torch = lazy("torch")  # imported when a function runs: `smtc eval-prop --help` stays fast (smtc_fast/_lazy.py)
F = lazy("torch.nn.functional")
precision = lazy("smtc_fast.precision")

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # CRW vos.py / SMTC eval_prop (§2.1)
IMAGENET_STD = (0.229, 0.224, 0.225)
MASK_VALUE = -1e10  # the official MaskedAttention fill for keys outside the radius (§2.3)


@dataclass(frozen=True)
class Preset:
    """Propagation settings (§2.5). map_scale = label-grid stride; grid = floor or ceil of H / map_scale."""
    topk: int
    n_context: int
    radius: float
    temperature: float
    map_scale: int
    grid_round: str  # "floor" (SMTC vos.py) or "ceil" (CRW vos.py)
    image_multiple: int  # SMTC resizes the image to a multiple of the patch size before the ViT (§2.2)
    source: str


PRESETS = {
    # SMTC eval_prop.sh (main line): stride-16 tokens on the floor(H/16) x floor(W/16) grid
    "smtc-stride16": Preset(7, 20, 7, 0.2, 16, "floor", 16, "SMTC eval_prop.sh: --topk 7 --videoLen 20 --radius 7 "
                                                           "--temperature 0.2, mapScale 320//20"),
    # SMTC eval_prop.sh (commented alternative): tokens interpolated to the stride-8 grid
    "smtc-stride8": Preset(28, 20, 35, 0.2, 8, "floor", 16, "SMTC eval_prop.sh (commented): --topk 28 --radius 35, "
                                                           "mapScale 320//40"),
    # Patch-14 backbones (DINOv2): the stride-16 protocol scaled to the 14-pixel grid. The label grid follows the
    # tokens (floor(H/14)) and the radius keeps its reach in pixels: 7 cells x 16 px = 112 px = 8 cells x 14 px
    # (35 x 8 = 280 px = 40 x 7 for the stride-7 line). top-k, context and temperature are the stride-16 values.
    # Ours, not an official setting: there is no published SMTC result on a patch-14 backbone.
    "smtc-patch14": Preset(7, 20, 8, 0.2, 14, "floor", 14, "smtc-stride16 scaled to patch 14: --topk 7 "
                                                         "--videoLen 20 --radius 8 (= 112 px) --temperature 0.2, "
                                                         "label grid floor(H/14)"),
    "smtc-patch14-stride7": Preset(28, 20, 40, 0.2, 7, "floor", 14, "smtc-stride8 scaled to patch 14: --topk 28 "
                                                                   "--radius 40 (= 280 px), label grid "
                                                                   "floor(H/7)"),
    # CRW README (DAVIS): ResNet-18 res3 features at stride 8
    "crw": Preset(10, 20, 12, 0.05, 8, "ceil", 1, "CRW README: --topk 10 --videoLen 20 --radius 12 "
                                                  "--temperature 0.05"),
}
# CRW crop sizes per dataset (§2.5): -1 = native size; > 0 = squashed to a square
CROP_SIZE = {"davis": -1, "jhmdb": 320, "vip": 560}


# ---------------------------------------------------------------------------------------------------------------
# the dense propagation step (to be replaced by smtc_fast.ops.propagate_labels)

def grid_positions(grid, device=None):
    """(N, 2) float (y, x) positions of an (h, w) grid, row-major (the flattening of the features)."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).float()


def propagate_dense(query, first_feats, first_labels, ctx_feats, ctx_labels, grid, topk, radius, temperature,
                    chunk=1024):
    """One target frame of label propagation (§2.3), chunked over queries with a running top-k over key frames.

    query (N, D), first_feats (N, D): L2-normalised features of the target and of frame 0.
    first_labels (N, C): frame 0's labels; ctx_feats (n, N, D), ctx_labels (n, N, C): the short-term memory.
    grid (h, w) with h*w = N. Frame 0 keys are unrestricted; a short-term key counts only when its grid distance to
    the query is < radius (strict, Euclidean). logits = cos / temperature; the top-k over all (n+1)*N keys are
    softmax-weighted. Returns (N, C) soft labels, float32.

    Key order and ties: the official code takes top-k over [frame 0, ctx...] concatenated; a running top-k keeps
    the same values. Equal values come from identical frame copies with identical labels (the front padding), so
    which copy wins a tie does not change the result.
    """
    n_q, d = query.shape
    n_ctx = ctx_feats.shape[0]
    if first_feats.shape != (n_q, d) or ctx_feats.shape[1:] != (n_q, d):
        raise ValueError(f"propagate_dense: query {tuple(query.shape)}, first_feats {tuple(first_feats.shape)} and "
                         f"ctx_feats {tuple(ctx_feats.shape)} must be (N, D), (N, D), (n, N, D)")
    if grid[0] * grid[1] != n_q:
        raise ValueError(f"propagate_dense: grid {grid} has {grid[0] * grid[1]} cells but N = {n_q}")
    n_lab = first_labels.shape[1]
    k = min(topk, (n_ctx + 1) * n_q)
    h, w = grid
    # the keys a query may see in a short-term frame: disk offsets with dy^2 + dx^2 < radius^2 (strict)
    r_int = int(math.ceil(radius))
    dy, dx = torch.meshgrid(torch.arange(-r_int, r_int + 1), torch.arange(-r_int, r_int + 1), indexing="ij")
    inside = (dy * dy + dx * dx).float() < float(radius) ** 2
    dy, dx = dy[inside].to(query.device), dx[inside].to(query.device)  # (K_r,)
    out = torch.empty(n_q, n_lab, dtype=query.dtype, device=query.device)
    all_labels = torch.cat([first_labels[None], ctx_labels], 0).reshape(-1, n_lab).to(query.dtype)  # ((n+1)N, C)
    for s in range(0, n_q, chunk):
        q = query[s:s + chunk]  # (c, D)
        # top-k of a union = top-k of the per-frame top-k's: keep (c, k) and merge each key frame's own top-k
        best_v, best_i = (q @ first_feats.T).topk(min(k, n_q), dim=1)  # frame 0: no radius limit
        if n_ctx and dy.numel():
            qy = torch.arange(s, s + q.shape[0], device=q.device) // w
            qx = torch.arange(s, s + q.shape[0], device=q.device) % w
            ky = qy[:, None] + dy[None]  # (c, K_r)
            kx = qx[:, None] + dx[None]
            valid = (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
            # only the rows within the radius of this chunk's rows can be keys: multiply against that band only
            lo = max(0, int(qy[0]) - r_int) * w
            hi = min(h, int(qy[-1]) + r_int + 1) * w
            nbr = torch.where(valid, ky * w + kx, torch.full_like(ky, lo))  # (c, K_r) flat key index
            # key frames in groups so that the (g, c, band) logits stay ~4 M floats (16 MB)
            group = max(1, min(n_ctx, 4_000_000 // max(1, q.shape[0] * (hi - lo))))
            for j0 in range(0, n_ctx, group):
                g = min(group, n_ctx - j0)
                v = torch.matmul(q, ctx_feats[j0:j0 + g, lo:hi].transpose(1, 2))  # (g, c, band)
                v = v.gather(2, (nbr - lo).expand(g, -1, -1))  # (g, c, K_r)
                v = v.masked_fill(~valid, MASK_VALUE)  # off-image offsets: never chosen (frame 0 has N >= k keys)
                v = v.permute(1, 0, 2).reshape(q.shape[0], -1)  # (c, g * K_r)
                v, i = v.topk(min(k, v.shape[1]), dim=1)
                frame = i // nbr.shape[1] + j0 + 1  # 1..n: position among the key frames (0 = frame 0)
                key = nbr.gather(1, i % nbr.shape[1]) + frame * n_q
                best_v, sel = torch.cat([best_v, v], 1).topk(k, dim=1)  # merge (c, 2k) -> (c, k)
                best_i = torch.cat([best_i, key], 1).gather(1, sel)
        weights = torch.softmax(best_v / temperature, dim=1)  # (c, k)
        out[s:s + chunk] = torch.einsum("ck,ckl->cl", weights, all_labels[best_i])
    return out


def propagate_video(feature_frames, first_labels, grid, topk, n_context, radius, temperature, chunk=1024,
                    step=None):
    """Propagate frame 0's labels through a video.

    feature_frames: iterable of (N, D) L2-normalised features, frame 0 first (consumed lazily).
    first_labels (N, C) float: frame 0's downsampled labels. Yields (t, (N, C) soft labels), t = 0 first.
    Context of target t (§2.3): original frames max(0, t - n_context + j), j = 0..n_context-1, i.e. the official
    padded indices t..t+n_context-1 with the front padding made of frame-0 copies (GT labels); frame 0 itself
    is the long-term memory. step: the dense step to call (default propagate_dense; the fused op plugs in here).
    """
    step = step or propagate_dense
    feats = {}
    labels = {}
    for t, f in enumerate(feature_frames):
        feats[t] = f
        if t == 0:
            labels[0] = first_labels.to(f.dtype)
            yield 0, labels[0]
        else:
            ctx = [max(0, t - n_context + j) for j in range(n_context)]
            ctx_f = torch.stack([feats[i] for i in ctx])  # (n, N, D): the only copy, built per target
            ctx_l = torch.stack([labels[i] for i in ctx])
            labels[t] = step(f, feats[0], labels[0], ctx_f, ctx_l, grid, topk, radius, temperature, chunk=chunk)
            yield t, labels[t]
        # forget what no later target will use: keep frame 0 and the last n_context frames
        for old in [i for i in feats if i != 0 and i <= t - n_context]:
            del feats[old], labels[old]


# ---------------------------------------------------------------------------------------------------------------
# resizing as the protocol does it

def resize_bilinear(x, size):
    """(C, H, W) float -> (C, h, w): cv2.resize INTER_LINEAR on float32 = point sampling at half-pixel centres
    (align_corners=False, no anti-aliasing). Down by exactly 2 it equals area averaging, which is what cv2
    switches to there anyway. Checked against cv2 5.0 on DAVIS sizes (854x480 <-> 107x60, 53x30, 106x60): equal
    to 5e-5, the float32 rounding of the source coordinate (~850 px)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]


def label_grid(height, width, preset):
    rnd = math.floor if preset.grid_round == "floor" else math.ceil
    return rnd(height / preset.map_scale), rnd(width / preset.map_scale)


def onehot(labels, ids):
    """(H, W) ids -> (C, H, W) float32 one-hot over `ids` (the ids of frame 0, sorted: the official lblset)."""
    lab = torch.as_tensor(np.asarray(labels).astype(np.int64))
    return (lab[None] == torch.as_tensor(np.asarray(ids, dtype=np.int64))[:, None, None]).float()


def decode(pred, grid, size, ids):
    """(N, C) soft labels -> (H, W) ids: bilinear up-sampling to `size`, argmax, lblset (§2.4)."""
    c = pred.shape[1]
    up = resize_bilinear(pred.T.reshape(c, *grid), size)  # (C, H, W)
    return np.asarray(ids)[up.argmax(0).cpu().numpy()]


# ---------------------------------------------------------------------------------------------------------------
# features

def normalize_images(rgb, device="cpu"):
    """(B, H, W, 3) uint8 (or float in [0, 255]) -> (B, 3, H, W) float ImageNet-normalised (§2.1)."""
    x = torch.as_tensor(rgb, device=device).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    return (x - mean) / std


class ColorFeatures:
    """A fixed, weight-free feature: the ImageNet-normalised colour averaged over stride x stride cells, plus a
    constant channel (so dark cells keep a direction). For tests, demos and as a floor for real features."""

    def __init__(self, stride=8):
        self.stride = stride

    def __call__(self, images):  # (B, 3, H, W) normalised -> (B, 4, H/s, W/s)
        x = F.avg_pool2d(images, self.stride, self.stride, ceil_mode=True)
        return torch.cat([x, torch.ones_like(x[:, :1])], 1)


class ViTTokens:
    """Un-normed last-block patch tokens of a ViT (the SMTC evaluation's features, spec §4.1).

    `model` is an SMTC model (its encoder is used, like the official eval_prop) or a bare timm ViT (a DINO
    backbone). Images are resized (bilinear) to a multiple of the patch size first, as the official code does.
    `amp`: run the ViT under bf16 autocast where the device computes bf16 natively (smtc_fast.precision; `smtc
    eval-prop --amp`, its default). The tokens come back float32 either way; feature_stream L2-normalises them in
    float32. Off here, so the Python API is float32 unless asked.
    """

    def __init__(self, model, batch_size=16, amp=False):
        from smtc_fast.models import vit_forward  # noqa: F401  (import check: the model package must be there)

        self.model = model.eval()
        self.batch_size = batch_size
        self.amp = amp

    @no_grad
    def __call__(self, images):  # (B, 3, H, W) -> (B, D, h, w)
        from smtc_fast.models import vit_forward

        enc = getattr(self.model, "encoder", self.model)
        s = enc.stride if hasattr(enc, "stride") else enc.patch_embed.proj.stride[0]
        h, w = images.shape[-2:]
        if h % s or w % s:
            images = F.interpolate(images, size=(h // s * s, w // s * s), mode="bilinear", align_corners=False)
        outs = []
        for i in range(0, images.shape[0], self.batch_size):
            with precision.autocast(images.device, self.amp):
                _, tok, (gh, gw) = vit_forward(enc, images[i:i + self.batch_size], return_tokens=True)
            outs.append(tok.float().transpose(1, 2).reshape(tok.shape[0], -1, gh, gw))
        return torch.cat(outs)


def feature_stream(frame_paths, feature_fn, grid, crop_size=-1, batch_size=16, device="cpu", shape=None):
    """Yield L2-normalised (N, D) features per frame, computed in batches; only one batch is held at a time.

    Features are resized to the label grid with bilinear interpolation (the official trilinear on a 5-D tensor
    with an unchanged time axis), which is an identity when the grids agree.
    """
    for s in range(0, len(frame_paths), batch_size):
        rgb = []
        for p in frame_paths[s:s + batch_size]:
            im = eio.read_rgb(p)
            if shape is not None and im.shape[:2] != tuple(shape):
                raise eio.DataError(f"{p} is {im.shape[1]}x{im.shape[0]} but frame 0 is {shape[1]}x{shape[0]}")
            rgb.append(_crop_resize(im, crop_size))
        x = normalize_images(np.stack(rgb), device)
        f = feature_fn(x)
        if f.dim() != 4:
            raise ValueError(f"the feature function must return (B, D, h, w), got {tuple(f.shape)}")
        if tuple(f.shape[-2:]) != tuple(grid):
            f = F.interpolate(f.float(), size=tuple(grid), mode="bilinear", align_corners=False)
        f = F.normalize(f.float(), dim=1)  # over channels (§2.2)
        for b in range(f.shape[0]):
            yield f[b].flatten(1).T.contiguous()  # (N, D)


def _crop_resize(rgb, crop_size):
    """CRW's cropSize: > 0 squashes the frame to crop_size x crop_size (ratio hard-coded to 1, §2.1), with cv2's
    INTER_LINEAR on the float image (no anti-aliasing, unlike PIL's bilinear when shrinking)."""
    if crop_size is None or crop_size <= 0:
        return rgb
    x = torch.as_tensor(rgb).permute(2, 0, 1).float()
    return resize_bilinear(x, (crop_size, crop_size)).permute(1, 2, 0).numpy()  # float in [0, 255]


# ---------------------------------------------------------------------------------------------------------------
# one video with label maps (DAVIS and VIP)

def propagate_label_video(frame_paths, first_label, feature_fn, preset, crop_size=-1, batch_size=16, chunk=1024,
                          device="cpu", first_label_path="frame 0 annotation", step=None, progress=None):
    """Propagate an (H, W) id map of frame 0 through the frames. Yields (t, (H, W) predicted ids), t = 0 first.

    Labels are processed at the (possibly cropped) image size: the one-hot map of the ids present in frame 0 is
    point-sampled to the grid; predictions are up-sampled back to that size; a crop is undone with NEAREST.
    """
    first_rgb = eio.read_rgb(frame_paths[0])
    h0, w0 = first_rgb.shape[:2]
    if first_label.shape != (h0, w0):
        raise eio.DataError(f"{first_label_path} is {first_label.shape[1]}x{first_label.shape[0]} but the frame "
                            f"{frame_paths[0]} is {w0}x{h0}")
    ids = np.unique(first_label)
    if ids.size < 2:
        raise eio.DataError(f"{first_label_path} has a single label ({ids.tolist()}): nothing to propagate")
    lab = first_label
    if crop_size and crop_size > 0:
        from PIL import Image

        # CRW resizes the colour label bilinearly by accident (§2.1), blending ids; we use NEAREST on the ids
        lab = np.array(Image.fromarray(first_label.astype(np.uint8)).resize((crop_size, crop_size), Image.NEAREST))
    ph, pw = lab.shape
    preset_grid = label_grid(ph, pw, preset)
    first = onehot(lab, ids)  # (C, ph, pw)
    first = resize_bilinear(first, preset_grid).flatten(1).T.contiguous().to(device)  # (N, C)
    feats = feature_stream(frame_paths, feature_fn, preset_grid, crop_size, batch_size, device, shape=(h0, w0))
    for t, pred in propagate_video(feats, first, preset_grid, preset.topk, preset.n_context, preset.radius,
                                   preset.temperature, chunk, step):
        # frame 0 too goes down and up again, as the official dump_predictions writes it
        out = decode(pred, preset_grid, (ph, pw), ids)
        if (ph, pw) != (h0, w0):
            from PIL import Image

            out = np.array(Image.fromarray(out.astype(np.uint8)).resize((w0, h0), Image.NEAREST))
        yield t, out


# ---------------------------------------------------------------------------------------------------------------
# datasets (layouts of §5)

def davis_videos(root, subset="val", resolution="480p", sequences=None):
    """[(name, frame paths, annotation paths)] for DAVIS-2017 semi-supervised."""
    from smtc_fast.evaluate.davis import sequence_list

    names = sequences or sequence_list(root, "semi-supervised", subset)
    out = []
    for name in names:
        frames = eio.list_frames(os.path.join(root, "JPEGImages", resolution, name), exts=(".jpg", ".jpeg"))
        anns = eio.list_frames(os.path.join(root, "Annotations", resolution, name), exts=(".png",))
        out.append((name, frames, anns))
    return out


def vip_videos(root, subset="val", sequences=None):
    """[(name, frame paths, GT paths)] for VIP: Images/videos/<vid>/*.jpg, Category_ids/<vid>/*.png,
    lists/<subset>_videos.txt (§5)."""
    if sequences is None:
        lst = os.path.join(root, "lists", f"{subset}_videos.txt")
        if not os.path.isfile(lst):
            raise eio.DataError(f"VIP video list not found: {lst}")
        with open(lst) as f:
            sequences = [line.strip() for line in f if line.strip()]
    out = []
    for name in sequences:
        frames = eio.list_frames(os.path.join(root, "Images", "videos", name), exts=(".jpg",))
        gts = [os.path.join(root, "Category_ids", name, os.path.splitext(os.path.basename(p))[0] + ".png")
               for p in frames]
        out.append((name, frames, gts))
    return out


def jhmdb_videos(root, filelist=None):
    """[(name, frame paths, joint_positions.mat)] for JHMDB: Rename_Images/<action>/<clip>/%05d.png and
    joint_annotations/<action>/<clip>/joint_positions.mat, or the CRW/UVC filelist '<img_dir> <mat>' (§2.6)."""
    out = []
    if filelist:
        with open(filelist) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 2:
                    continue
                img_dir, mat = (p if os.path.isabs(p) else os.path.join(root, p) for p in parts[:2])
                if os.path.isdir(mat):
                    mat = os.path.join(mat, "joint_positions.mat")
                out.append((os.path.relpath(img_dir, root), eio.list_frames(img_dir, exts=(".png",)), mat))
        return out
    base = os.path.join(root, "Rename_Images")
    if not os.path.isdir(base):
        raise eio.DataError(f"JHMDB frames not found: {base} (or pass --filelist)")
    for action in sorted(os.listdir(base)):
        for clip in sorted(os.listdir(os.path.join(base, action))):
            mat = os.path.join(root, "joint_annotations", action, clip, "joint_positions.mat")
            out.append((f"{action}/{clip}", eio.list_frames(os.path.join(base, action, clip), exts=(".png",)), mat))
    return out


def draw_gaussian(grid, x, y, sigma=0.5):
    """A peak-1 Gaussian heat map at (x, y) in grid units, written the way CRW's draw_labelmap_np does (§2.6):
    a (6 sigma + 1)-wide window whose top-left corner is int(pt - 3 sigma) (truncation toward zero) and whose
    peak sits at that corner + floor(size / 2); nothing is drawn when the window misses the grid."""
    h, w = grid
    img = np.zeros((h, w))
    ul = (int(x - 3 * sigma), int(y - 3 * sigma))
    br = (int(x + 3 * sigma + 1), int(y + 3 * sigma + 1))
    if ul[0] >= w or ul[1] >= h or br[0] < 0 or br[1] < 0:
        return img
    size = 6 * sigma + 1
    g1 = np.arange(0, size, 1, float)
    c = size // 2
    g = np.exp(-((g1[None, :] - c) ** 2 + (g1[:, None] - c) ** 2) / (2 * sigma ** 2))
    gx = max(0, -ul[0]), min(br[0], w) - ul[0]
    gy = max(0, -ul[1]), min(br[1], h) - ul[1]
    ix = max(0, ul[0]), min(br[0], w)
    iy = max(0, ul[1]), min(br[1], h)
    img[iy[0]:iy[1], ix[0]:ix[1]] = g[gy[0]:gy[1], gx[0]:gx[1]]
    return img


def pose_labels(coords, grid):
    """(2, J) joint coordinates in grid units -> (N, 1 + J) labels: background first = (sum of joints == 0)."""
    maps = np.stack([draw_gaussian(grid, coords[0, j], coords[1, j]) for j in range(coords.shape[1])], -1)
    bg = (maps.sum(-1) == 0)[..., None].astype(np.float64)
    return torch.as_tensor(np.concatenate([bg, maps], -1).reshape(-1, 1 + coords.shape[1]), dtype=torch.float32)


def decode_pose(pred, grid, topk=3):
    """(N, 1 + J) soft labels -> (2, J) joint coordinates in grid units (CRW process_pose, §2.6): drop the background,
    top-3 cells per joint, their normalised weights average x = id % w and y = id // w; an empty channel -> -1."""
    p = pred[:, 1:]
    k = min(p.shape[0], topk)
    vals, idx = p.topk(k, dim=0)  # (k, J)
    vals = vals / vals.sum(0, keepdim=True)
    xx = (idx % grid[1]).float()
    yy = (idx // grid[1]).float()
    coord = torch.stack([(xx * vals).sum(0), (yy * vals).sum(0)])  # (2, J)
    coord[:, p.sum(0) == 0] = -1
    return coord.cpu().numpy()


def load_jhmdb_joints(path):
    """joint_positions.mat -> (2, J, T) 0-based pixel coordinates (pos_img is 1-based, §2.6)."""
    if not os.path.isfile(path):
        raise eio.DataError(f"missing JHMDB joint annotation: {path}")
    from scipy.io import loadmat

    try:
        return loadmat(path)["pos_img"].astype(np.float64) - 1
    except Exception as e:  # scipy raises a zoo of types for bad .mat files
        raise eio.DataError(f"unreadable JHMDB joint annotation {path}: {e}") from e


def propagate_pose_video(frame_paths, joints, feature_fn, preset, crop_size=320, batch_size=16, chunk=1024,
                         device="cpu", step=None):
    """JHMDB: propagate frame 0's joints (2, J, T GT, only frame 0 used). Returns (2, J, T) predicted pixel coords."""
    first = eio.read_rgb(frame_paths[0])
    h0, w0 = first.shape[:2]
    ph, pw = (crop_size, crop_size) if crop_size and crop_size > 0 else (h0, w0)
    grid = label_grid(ph, pw, preset)
    # coordinates -> grid units, through the squash to the crop size (CRW jhmdb.py)
    c0 = joints[:, :, 0].copy()
    c0[0] = c0[0] * pw / w0 / preset.map_scale
    c0[1] = c0[1] * ph / h0 / preset.map_scale
    first_labels = pose_labels(c0, grid).to(device)
    feats = feature_stream(frame_paths, feature_fn, grid, crop_size, batch_size, device, shape=(h0, w0))
    out = np.zeros((2, joints.shape[1], len(frame_paths)))
    for t, pred in propagate_video(feats, first_labels, grid, preset.topk, preset.n_context, preset.radius,
                                   preset.temperature, chunk, step):
        coord = decode_pose(pred, grid)
        # back to pixels: eval_pck.py multiplies by W / feat_res (feat_res = CRW's 40-cell grid); we use our grid
        vis = coord[0] >= 0
        coord[0] = np.where(vis, coord[0] / grid[1] * w0, -1)
        coord[1] = np.where(vis, coord[1] / grid[0] * h0, -1)
        out[:, :, t] = coord
    return out


# ---------------------------------------------------------------------------------------------------------------
# feature functions from the command line

def _preset_note(preset, stride):
    """The stride-16 presets on patch-14 tokens (or the reverse) still run, through a resize of the features to the
    label grid; say which preset matches."""
    if stride == 14 and not preset.startswith("smtc-patch14"):
        print(f"note: patch-14 backbone with preset {preset}; the patch-14 protocol is --preset smtc-patch14",
              file=sys.stderr)
    elif stride == 16 and preset.startswith("smtc-patch14"):
        print(f"note: preset {preset} is for patch-14 backbones; this one has patch 16 (--preset smtc-stride16)",
              file=sys.stderr)


def build_feature_fn(args):
    """--features color | smtc (an SMTC / DINO checkpoint) | timm (a timm ViT name, random or --checkpoint)."""
    if args.features == "color":
        return ColorFeatures(stride=8)
    if args.features == "smtc":
        if not args.checkpoint:
            raise SystemExit("smtc eval-prop: --features smtc needs --checkpoint (an SMTC, smtc_fast or DINO file)")
        from smtc_fast.models import load_checkpoint

        model, kind = load_checkpoint(args.checkpoint)
        print(f"loaded {kind} checkpoint {args.checkpoint}: using its encoder's last-block tokens (spec §4.1)")
        _preset_note(args.preset, model.encoder.stride)
        return ViTTokens(model.to(args.device), batch_size=args.batch_size, amp=args.amp)
    if args.features == "timm":
        from smtc_fast.models import create_vit, load_backbone_weights

        vit = create_vit(args.backbone, drop_path_rate=0.0)
        if args.checkpoint:  # DINO, timm, or the official DINOv2 / DINOv3 .pth; strict (models/backbone.py)
            load_backbone_weights(vit, args.checkpoint)
        else:
            print("warning: --features timm without --checkpoint uses random weights", file=sys.stderr)
        _preset_note(args.preset, vit.stride)
        return ViTTokens(vit.to(args.device), batch_size=args.batch_size, amp=args.amp)
    raise SystemExit(f"unknown --features {args.features!r}")


def resolve_step(kernel):
    """The dense propagation step: ours ("dense") or the fused operator smtc_fast.ops.propagate_labels ("fused"),
    which takes the same arguments (without `chunk`) and returns the same result."""
    if kernel == "dense":
        return propagate_dense
    if kernel == "fused":
        try:
            from smtc_fast.ops import propagate_labels
        except ImportError as e:
            raise SystemExit(f"--kernel fused: smtc_fast.ops.propagate_labels is not available ({e})")

        def fused(query, first_feats, first_labels, ctx_feats, ctx_labels, grid, topk, radius, temperature,
                  chunk=None):
            return propagate_labels(query, first_feats, first_labels, ctx_feats, ctx_labels, grid, topk, radius,
                                    temperature)

        return fused
    raise SystemExit(f"unknown --kernel {kernel!r}")


def resolve_preset(args):
    p = PRESETS[args.preset]
    over = {k: getattr(args, k) for k in ("topk", "n_context", "radius", "temperature")
            if getattr(args, k, None) is not None}
    return Preset(**{**asdict(p), **over})


# ---------------------------------------------------------------------------------------------------------------
# whole evaluations

def evaluate_davis_propagation(root, out_dir, feature_fn, preset, subset="val", sequences=None, batch_size=16,
                               chunk=1024, device="cpu", step=None, progress=True, overlays=True):
    """Propagate every DAVIS-2017 val video, write out/<seq>/%05d.png and score them (semi-supervised J&F)."""
    from smtc_fast.evaluate.davis import evaluate_davis

    videos = davis_videos(root, subset, sequences=sequences)
    for name, frames, anns in tqdm(videos, desc="videos", disable=not progress):
        first = eio.read_label(anns[0])
        if first.max() == 0:
            raise eio.DataError(f"{anns[0]}: the first annotation is empty (no object to propagate)")
        if len(anns) != len(frames):
            raise eio.DataError(f"{name}: {len(frames)} frames but {len(anns)} annotations "
                                f"(DAVIS annotates every frame)")
        preds = []
        for t, lab in propagate_label_video(frames, first, feature_fn, preset, -1, batch_size, chunk, device,
                                            first_label_path=anns[0], step=step):
            eio.write_indexed_png(os.path.join(out_dir, name, os.path.basename(anns[t])), lab)
            preds.append(lab)
        if overlays:
            t = len(preds) // 2
            eio.save_overlay(os.path.join(out_dir, "overlays", f"{name}.jpg"), eio.read_rgb(frames[t]), preds[t],
                             eio.read_label(anns[t]))
    return evaluate_davis(root, out_dir, "semi-supervised", subset=subset,
                          sequences=[v[0] for v in videos], progress=False)


def evaluate_vip_propagation(root, out_dir, feature_fn, preset, subset="val", sequences=None, crop_size=560,
                             batch_size=16, chunk=1024, device="cpu", step=None, progress=True, overlays=True):
    """VIP part propagation: one confusion matrix over every frame of every video, mIoU over 20 classes (§2.7)."""
    hist = np.zeros((20, 20), np.int64)
    per_video = {}
    for name, frames, gts in tqdm(vip_videos(root, subset, sequences), desc="videos", disable=not progress):
        first = eio.read_label(gts[0])
        vh = np.zeros((20, 20), np.int64)
        mid = len(frames) // 2
        for t, lab in propagate_label_video(frames, first, feature_fn, preset, crop_size, batch_size, chunk,
                                            device, first_label_path=gts[0], step=step):
            eio.write_indexed_png(os.path.join(out_dir, name, os.path.basename(gts[t])), lab)
            gt = eio.read_label(gts[t])
            if gt.shape != lab.shape:
                raise eio.DataError(f"{gts[t]} is {gt.shape[1]}x{gt.shape[0]}, frame is {lab.shape[1]}x{lab.shape[0]}")
            vh += metrics.confusion_matrix(gt, lab, 20)
            if overlays and t == mid:
                eio.save_overlay(os.path.join(out_dir, "overlays", f"{name}.jpg"), eio.read_rgb(frames[t]), lab, gt)
        hist += vh
        per_video[name] = {"mIoU": metrics.miou_from_confusion(vh)[0]}
    miou, iou = metrics.miou_from_confusion(hist)
    return {"protocol": "VIP mIoU (20 classes, one confusion matrix over all frames)", "global": {"mIoU": miou},
            "per_class_iou": iou.tolist(), "per_video": per_video}


def evaluate_jhmdb_propagation(root, out_dir, feature_fn, preset, filelist=None, crop_size=320, batch_size=16,
                               chunk=1024, device="cpu", step=None, progress=True, max_videos=None):
    """JHMDB pose propagation -> PCK@0.1..0.5 (mean over joints of per-joint PCK, §2.6)."""
    videos = jhmdb_videos(root, filelist)[:max_videos]
    preds, gts, per_video = [], [], {}
    for name, frames, mat in tqdm(videos, desc="videos", disable=not progress):
        joints = load_jhmdb_joints(mat)
        n = min(joints.shape[2], len(frames))
        p = propagate_pose_video(frames[:n], joints[:, :, :n], feature_fn, preset, crop_size, batch_size, chunk,
                                 device, step)
        np.save(os.path.join(_mkdir(os.path.join(out_dir, "poses")), name.replace("/", "__") + ".npy"), p)
        preds.append(p)
        gts.append(joints[:, :, :n])
        per_video[name] = metrics.pck([p], [joints[:, :, :n]], (0.1, 0.2))
    pck = metrics.pck(preds, gts)
    return {"protocol": "JHMDB PCK (mean over joints of per-joint PCK, frame 0 skipped)",
            "global": {f"PCK@{a}": v for a, v in pck.items()}, "per_video": per_video}


def _mkdir(p):
    os.makedirs(p, exist_ok=True)
    return p


# ---------------------------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser):
    parser.add_argument("--dataset", default="davis", choices=["davis", "jhmdb", "vip"],
                        help="DAVIS-2017 val (J&F), JHMDB split 1 (PCK), VIP val (mIoU)")
    parser.add_argument("--root", required=True, help="dataset root in the layout of evaluation_protocols.md §5")
    parser.add_argument("--out", default="runs/eval_prop", help="output folder (PNGs, JSON, CSV, overlays)")
    parser.add_argument("--preset", default="smtc-stride16", choices=sorted(PRESETS),
                        help="smtc-stride16 = SMTC eval_prop.sh; smtc-stride8 = its commented stride-8 line; "
                             "crw = the CRW README (§2.5); smtc-patch14 / smtc-patch14-stride7 = those two lines "
                             "for patch-14 backbones (DINOv2): label grid floor(H/14) (floor(H/7)), radius 8 (40) "
                             "cells = the same 112 (280) px, top-k / context / temperature unchanged (ours, not "
                             "an official setting)")
    parser.add_argument("--topk", type=int, default=None, help="override the preset's top-k")
    parser.add_argument("--n-context", type=int, default=None, help="override the preset's context length "
                                                                   "(official --videoLen)")
    parser.add_argument("--radius", type=float, default=None, help="override the preset's radius (grid cells)")
    parser.add_argument("--temperature", type=float, default=None, help="override the preset's temperature")
    parser.add_argument("--features", default="smtc", choices=["smtc", "timm", "color"],
                        help="smtc: the encoder of --checkpoint (SMTC / smtc_fast / DINO file, spec §4.1); "
                             "timm: a timm ViT (--backbone) with --checkpoint weights (DINO, timm, or official "
                             "DINOv2 / DINOv3 .pth); color: a weight-free baseline")
    parser.add_argument("--checkpoint", default=None, help="weights for --features smtc / timm")
    parser.add_argument("--backbone", default="vit_small_patch16_224",
                        help="timm name for --features timm: DINO ViT-S/16 (default), vit_small_patch14_dinov2, "
                             "vit_small_patch14_reg4_dinov2, vit_small_patch16_dinov3_qkvb, ... (any size)")
    parser.add_argument("--set", default="val", help="DAVIS ImageSets/2017/<set>.txt, VIP lists/<set>_videos.txt")
    parser.add_argument("--sequences", nargs="*", default=None, help="only these videos (unset: the whole list)")
    parser.add_argument("--filelist", default=None, help="JHMDB: '<img_dir> <mat>' lines (UVC testlist_split1.txt)")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="square resize before the backbone (unset: per dataset, CRW: davis -1 = native, "
                             "jhmdb 320, vip 560)")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per feature batch (official: 16)")
    parser.add_argument("--chunk", type=int, default=1024, help="queries per affinity chunk (memory only)")
    parser.add_argument("--device", default="auto", type=resolve_device,
                        help="device: auto = cuda when available, else cpu")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="features under bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX: "
                             "smtc_fast.build_info()['cpu_bf16']); elsewhere, and with --no-amp, float32")
    parser.add_argument("--max-videos", type=int, default=None, help="JHMDB: only the first N videos")
    parser.add_argument("--kernel", default="fused", choices=["dense", "fused"],
                        help="propagation step: fused (default) = the smtc_fast.ops.propagate_labels operator "
                             "(its PyTorch reference where the extension is not built); dense = propagate_dense "
                             "(PyTorch, chunked), for comparison")
    parser.add_argument("--dense", action="store_true", help="same as --kernel dense: the dense PyTorch step")
    parser.add_argument("--no-overlays", action="store_true", help="skip the per-video overlay images")


def run(args):
    t0 = time.time()
    preset = resolve_preset(args)
    print(f"smtc eval-prop: dataset {args.dataset}, preset {args.preset} -> {asdict(preset)}")
    if args.features != "color":
        print(f"features: {precision.describe(args.device, args.amp)}")
    feature_fn = build_feature_fn(args)
    kernel = "dense" if args.dense else args.kernel
    step = resolve_step(kernel)
    crop = CROP_SIZE[args.dataset] if args.crop_size is None else args.crop_size
    os.makedirs(args.out, exist_ok=True)
    try:
        if args.dataset == "davis":
            summary = evaluate_davis_propagation(args.root, args.out, feature_fn, preset, args.set, args.sequences,
                                                 args.batch_size, args.chunk, args.device, step=step,
                                                 overlays=not args.no_overlays)
        elif args.dataset == "vip":
            summary = evaluate_vip_propagation(args.root, args.out, feature_fn, preset, args.set, args.sequences,
                                               crop, args.batch_size, args.chunk, args.device, step=step,
                                               overlays=not args.no_overlays)
        else:
            summary = evaluate_jhmdb_propagation(args.root, args.out, feature_fn, preset, args.filelist, crop,
                                                 args.batch_size, args.chunk, args.device, step=step,
                                                 max_videos=args.max_videos)
    except (eio.DataError, metrics.TooManyObjectsError) as e:
        print(f"smtc eval-prop: error: {e}", file=sys.stderr)
        return 2
    summary.update({"dataset": args.dataset, "preset": args.preset, "settings": asdict(preset),
                    "features": args.features, "checkpoint": args.checkpoint, "crop_size": crop,
                    "kernel": kernel,
                    "precision": "float32" if args.features == "color" else precision.describe(args.device, args.amp),
                    "seconds": time.time() - t0})
    write_summary(summary, args.out, f"eval_prop-{args.dataset}")
    return 0


def write_summary(summary, out_dir, stem):
    """JSON (everything) + CSV (global, and per object / video) + the printed global table."""
    json_path = os.path.join(out_dir, stem + ".json")
    eio.write_json(json_path, summary)
    eio.write_csv(os.path.join(out_dir, stem + "-global.csv"), [summary["global"]])
    per = summary.get("per_object") or summary.get("per_video")
    if per:
        eio.write_csv(os.path.join(out_dir, stem + "-per_" + ("object" if "per_object" in summary else "video")
                                   + ".csv"), [{"name": k, **v} for k, v in per.items()])
    print(eio.format_table([summary["global"]]))
    print(f"wrote {json_path}")
