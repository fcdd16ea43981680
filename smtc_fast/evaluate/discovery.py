"""`smtc eval-discovery`: unsupervised object discovery from an SMTC model's candidates (spec §4.2, protocol §3).

multi   DAVIS-2017 unsupervised J&F. Per frame, the candidates are the instance masks (s, p) whose slot similarity
        cos(semantic_s, instance_{s,p}) >= 0.5 (eval_multi.py; `--candidates valid` uses the training validity filter
        instead). Each is nearest-upsampled to the annotation size, min-max normalised and binarised at > 0.3.
        Both matchings are reported:
          per-frame (SMTC repository, what produced the published 44.8): each frame's candidates in (s, p) order are
            that frame's proposals, Hungarian per frame, at most 300;
          official (davis2017-evaluation): one Hungarian per sequence needs proposals with an identity across frames.
            The only identity the model carries is the slot pair (s, p); we keep the 20 pairs that are candidates in
            the most frames (ties: lower s, then p) and list them in the JSON.
single  DAVIS-2016 / SegTrack-v2 / FBMS-59 frame mean IoU, pooled over every annotated frame of the dataset (motion
        grouping's frame_mean_iou). Candidates binarised at 0.5 after min-max normalisation; SMTC's utility keeps a
        candidate when its IoU with the GT beats its IoU with the background (an oracle selection) and merges the kept
        ones. We report that number and the oracle-free one (all candidates merged).

Deterministic: the instance-slot noise comes from a torch.Generator seeded with --seed, per window. Normalisation:
the ImageNet statistics the model was trained with, unless --normalization kinetics (what eval_multi.py used).
"""
import os
import sys
import time
from collections import Counter

import numpy as np
from tqdm import tqdm

from smtc_fast._lazy import lazy, resolve_device
from smtc_fast.evaluate import io as eio
from smtc_fast.evaluate import metrics

torch = lazy("torch")  # imported when a function runs: `smtc eval-discovery --help` stays fast (smtc_fast/_lazy.py)
F = lazy("torch.nn.functional")

NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # SMTC training (spec §3)
    "kinetics": ((0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)),  # eval_multi.py (spec §4.2)
}
# DAVIS-2016 val, as hard-coded in SMTC's config.py (protocol §5)
DAVIS2016_VAL = ["blackswan", "bmx-trees", "breakdance", "camel", "car-roundabout", "car-shadow", "cows",
                 "dance-twirl", "dog", "drift-chicane", "drift-straight", "goat", "horsejump-high", "kite-surf",
                 "libby", "motocross-jump", "paragliding-launch", "parkour", "scooter-black", "soapbox"]


# ---------------------------------------------------------------------------------------------------------------
# candidates

TAIL_WINDOWS = ("official", "last")


def windows(T, n, tail="official"):
    """Frame indices of each window the model sees for a video of T frames, windows of n frames.

    Full windows [0..n-1], [n..2n-1], ... When T is not a multiple of n, the b = T mod n remaining frames make a
    last window, padded to n frames:
      "official" (eval_multi.py, spec §4.2): the b remaining frames followed by the video's last n - b frames, e.g.
                 T=6, n=4 -> [0, 1, 2, 3], [4, 5, 4, 5]; T=7 -> [4, 5, 6, 6]; T=5 -> [4, 2, 3, 4]. The window's
                 first frame therefore takes frame T-1 (or itself) as its cyclic correlation reference.
      "last"     ours: the last n frames in order, [2, 3, 4, 5] for T=6, so every frame's reference is the frame
                 before it (the two differ in the candidates of the tail window's first frame).
    A video shorter than one window (T < n) gets one window: "official" = its T frames followed by its last n - T
    frames ([0, 1, 0, 1] for T=2, n=4); when n - T > T the official slice returns only T of them, a shorter window
    (T=1, n=4: [0, 0]), and we repeat them cyclically to keep n frames ([0, 0, 0, 0]); "last" = its frames with
    the last one repeated ([0, 1, 1, 1]).
    """
    if T < 1 or n < 1:
        raise ValueError(f"windows needs T >= 1 frames and n >= 1 frames per window, got T={T}, n={n}")
    if tail not in TAIL_WINDOWS:
        raise ValueError(f"tail must be one of {TAIL_WINDOWS}, got {tail!r}")
    out = [list(range(s, s + n)) for s in range(0, T - n + 1, n)]
    b = T - n * len(out)  # frames not in a full window
    if b:
        if tail == "official":
            out.append(list(range(T - b, T)) + [(max(T - (n - b), 0) + i) % T for i in range(n - b)])
        else:
            out.append([min(max(T - n, 0) + i, T - 1) for i in range(n)])
    return out

class SMTCCandidates:
    """Mask producer from an SMTC model: rgb (T, H, W, 3) uint8 -> per frame (masks (n, h, w) float, keys [(s, p)]).

    Frames go through the model in non-overlapping windows of `num_frames` (the correlation pairs frames inside a
    window, cyclically); see `windows` for the last window of a video whose length is not a multiple of
    `num_frames` (`tail_window`: "official" = eval_multi.py's, "last" = ours). Every frame is yielded once, from
    the first window that holds it. Input resized (bilinear) to `resolution`.
    """

    def __init__(self, model, num_frames=4, iters=5, resolution=(480, 800), normalization="imagenet", seed=0,
                 candidates="similarity", sim_thresh=0.5, device="cpu", tail_window="official"):
        if candidates not in ("similarity", "valid"):
            raise ValueError(f"candidates must be 'similarity' or 'valid', got {candidates!r}")
        if tail_window not in TAIL_WINDOWS:
            raise ValueError(f"tail_window must be one of {TAIL_WINDOWS}, got {tail_window!r}")
        self.model = model.eval().to(device)
        if iters is not None:
            self.model.slot_attention.iters = int(iters)  # eval_multi.sh runs 5 iterations (training: 3)
        self.num_frames, self.resolution, self.seed = num_frames, tuple(resolution), seed
        self.mean, self.std = NORMALIZATION[normalization]
        self.candidates, self.sim_thresh, self.device = candidates, sim_thresh, device
        self.tail_window = tail_window

    def _prepare(self, rgb):
        """(n, H, W, 3) uint8 -> (n, 3, h, w) resized (bilinear) and normalised."""
        x = torch.as_tensor(rgb).permute(0, 3, 1, 2).float().div(255.0)
        x = F.interpolate(x, size=self.resolution, mode="bilinear", align_corners=False)
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]

    def frames(self, rgb):
        """Yield (t, semantic_mask (S, h, w), instance_mask (S, P, h, w), similarity (S, P), valid (S, P)) for
        every frame t of rgb (T, H, W, 3) uint8, in order, each frame once (CPU tensors)."""
        done = set()
        cfg = self.model.config
        n = self.num_frames
        for w, idx in enumerate(windows(rgb.shape[0], n, self.tail_window)):
            g = torch.Generator().manual_seed(self.seed * 100003 + w)
            noise = torch.randn(n, cfg.num_slots, cfg.num_instances, self.model.encoder.embed_dim, generator=g)
            with torch.no_grad():  # only around the model: the caller's code between yields keeps its grad mode
                x = self._prepare(rgb[idx])  # one window at a time: a long FBMS video never sits in memory as floats
                pred = self.model.predict(x[None].to(self.device), instance_noise=noise.to(self.device))
            for i, t in enumerate(idx):
                if t in done:
                    continue
                done.add(t)
                yield (t, pred.semantic_mask[0, i].float().cpu(), pred.instance_mask[0, i].float().cpu(),
                       pred.similarity[0, i].cpu(), pred.valid[0, i].cpu())

    def __call__(self, rgb):
        out = [None] * rgb.shape[0]
        for t, _, inst, sim, valid in self.frames(rgb):
            keep = sim >= self.sim_thresh if self.candidates == "similarity" else valid  # (S, P)
            s_idx, p_idx = torch.nonzero(keep, as_tuple=True)
            out[t] = (inst[s_idx, p_idx], list(zip(s_idx.tolist(), p_idx.tolist())))  # (n, h, w) soft
        return out


def binarize(masks, size, thresh):
    """(n, h, w) soft -> (n, H, W) bool: nearest up-sampling, min-max per mask, > thresh (SMTC results.py)."""
    if masks.shape[0] == 0:
        return np.zeros((0, *size), bool)
    m = F.interpolate(masks[None].float(), size=tuple(size), mode="nearest")[0]
    lo = m.flatten(1).min(1).values[:, None, None]
    hi = m.flatten(1).max(1).values[:, None, None]
    m = (m - lo) / (hi - lo).clamp_min(1e-12)
    return (m > thresh).numpy()


# ---------------------------------------------------------------------------------------------------------------
# multiple objects: DAVIS-2017 unsupervised

def official_proposals(keys_per_frame, cap=metrics.MAX_PROPOSALS_OFFICIAL):
    """The `cap` slot pairs (s, p) that are candidates in the most frames (ties: smaller (s, p) first)."""
    counts = Counter(k for keys in keys_per_frame for k in keys)
    return sorted(counts, key=lambda k: (-counts[k], k))[:cap]


def evaluate_multi(davis_root, producer, out_dir, subset="val", sequences=None, thresh=0.3, resolution="480p",
                   progress=True, overlays=True):
    from smtc_fast.evaluate.davis import annotation_dir, sequence_list

    ann_root = annotation_dir(davis_root, "unsupervised", resolution)
    seqs = sequences or sequence_list(davis_root, "unsupervised", subset)
    per_object = {"per-frame": {}, "official": {}}
    kept = {}
    for seq in tqdm(seqs, desc="videos", disable=not progress):
        gt_paths = eio.list_frames(os.path.join(ann_root, seq), exts=(".png",))
        frames = eio.list_frames(os.path.join(davis_root, "JPEGImages", resolution, seq), exts=(".jpg", ".jpeg"))
        if len(frames) != len(gt_paths):
            raise eio.DataError(f"{seq}: {len(frames)} frames but {len(gt_paths)} annotations")
        gt = eio.read_label_stack(gt_paths)
        rgb = np.stack([_read_sized(p, gt.shape[1:]) for p in frames])
        cands = producer(rgb)
        void = gt == 255
        gt_clean = np.where(void, 0, gt)
        n_gt = int(gt_clean[0].max())
        ids_g = np.arange(1, n_gt + 1)[:, None, None]
        size = gt.shape[1:]
        binar = [binarize(m, size, thresh) for m, _ in cands]  # per frame (n_t, H, W)
        n_max = max(1, max(b.shape[0] for b in binar))
        if n_max > metrics.MAX_PROPOSALS_SMTC:
            raise metrics.TooManyObjectsError(f"{seq}: {n_max} candidates in a frame, more than 300")
        # SMTC protocol: frame t's proposals are its own candidates
        J, Fm = metrics.pairwise_jf_frames(((binar[t], gt_clean[t][None] == ids_g, void[t]) for t in range(len(gt))),
                                           max(n_max, n_gt), n_gt)
        Jm, Fmm = metrics.match_proposals(J, Fm, "per-frame")
        for k in range(n_gt):
            per_object["per-frame"][f"{seq}_{k + 1}"] = (Jm[k], Fmm[k])
        # official protocol: proposals = the 20 most frequent slot pairs, one matching per sequence
        props = official_proposals([keys for _, keys in cands])
        kept[seq] = [list(k) for k in props]

        def official_frames():
            for t, (m, keys) in enumerate(cands):
                pos = {k: i for i, k in enumerate(keys)}
                sel = np.zeros((len(props), *size), bool)
                for j, k in enumerate(props):
                    if k in pos:
                        sel[j] = binar[t][pos[k]]
                yield sel, gt_clean[t][None] == ids_g, void[t]

        J, Fm = metrics.pairwise_jf_frames(official_frames(), max(len(props), n_gt), n_gt)
        Jm, Fmm = metrics.match_proposals(J, Fm, "official")
        for k in range(n_gt):
            per_object["official"][f"{seq}_{k + 1}"] = (Jm[k], Fmm[k])
        labels = _write_label_pngs(out_dir, seq, gt_paths, cands, binar)
        if overlays:
            t = len(frames) // 2
            eio.save_overlay(os.path.join(out_dir, "overlays", f"{seq}.jpg"), rgb[t], labels[t], gt[t])
    summary = {"protocol": "DAVIS-2017 unsupervised J&F from SMTC candidates", "threshold": thresh}
    for name in ("per-frame", "official"):
        g, rows = metrics.summarize(per_object[name])
        summary[name] = {"global": g, "per_object": rows}
    summary["global"] = {f"{k} ({name})": v for name in ("official", "per-frame")
                         for k, v in summary[name]["global"].items() if k in ("J&F-Mean", "J-Mean", "F-Mean")}
    summary["official_proposals_kept"] = kept
    return summary


def _write_label_pngs(out_dir, seq, gt_paths, cands, binar):
    """For looking only: each pixel gets the 1-based index of the most confident candidate above the threshold.
    (The scores above use the binary, possibly overlapping, masks, as SMTC's scorer does.)"""
    labels = []
    for t, ((soft, _), b) in enumerate(zip(cands, binar)):
        lab = np.zeros(b.shape[1:], np.uint8)
        if b.shape[0]:
            up = F.interpolate(soft[None].float(), size=b.shape[1:], mode="nearest")[0].numpy()
            score = np.where(b, up, -1)
            best = score.argmax(0)
            lab = np.where(b.any(0), np.minimum(best + 1, 255), 0).astype(np.uint8)
        eio.write_indexed_png(os.path.join(out_dir, seq, os.path.basename(gt_paths[t])), lab)
        labels.append(lab)
    return labels


def _read_sized(path, shape):
    rgb = eio.read_rgb(path)
    if rgb.shape[:2] != tuple(shape):
        raise eio.DataError(f"{path} is {rgb.shape[1]}x{rgb.shape[0]} but its annotation is {shape[1]}x{shape[0]}")
    return rgb


# ---------------------------------------------------------------------------------------------------------------
# single object: DAVIS-2016, SegTrack-v2, FBMS-59

def single_object_videos(root, dataset, sequences=None):
    """[(name, frame paths, {frame index: GT path or [GT paths to merge]})] for the layouts of protocol §5."""
    out = []
    if dataset == "davis2016":
        names = sequences or DAVIS2016_VAL
        for name in names:
            frames = eio.list_frames(os.path.join(root, "JPEGImages", "480p", name), exts=(".jpg",))
            anns = eio.list_frames(os.path.join(root, "Annotations", "480p", name), exts=(".png",))
            out.append((name, frames, {i: p for i, p in enumerate(anns)}))
    elif dataset == "segtrackv2":
        img_root = os.path.join(root, "STv2_img", "JPEGImages")
        gt_root = os.path.join(root, "STv2_gt&pred", "STv2_gt", "GroundTruth")
        if not os.path.isdir(gt_root):
            gt_root = os.path.join(root, "GroundTruth")  # the original layout
        names = sequences or sorted(os.listdir(gt_root))
        for name in names:
            frames = eio.list_frames(os.path.join(img_root if os.path.isdir(img_root) else
                                                  os.path.join(root, "JPEGImages"), name))
            gdir = os.path.join(gt_root, name)
            subs = sorted(d for d in os.listdir(gdir) if os.path.isdir(os.path.join(gdir, d)))
            if subs:  # multi-object: 1/, 2/, ... merged into one foreground
                per_obj = [eio.list_frames(os.path.join(gdir, d), exts=(".png", ".bmp")) for d in subs]
                anns = {i: [objs[i] for objs in per_obj] for i in range(len(per_obj[0]))}
            else:
                anns = {i: p for i, p in enumerate(eio.list_frames(gdir, exts=(".png", ".bmp")))}
            out.append((name, frames, anns))
    elif dataset == "fbms":
        ann_root = os.path.join(root, "FBMS_annotation")
        names = sequences or sorted(os.listdir(ann_root))
        for name in names:
            frames = eio.list_frames(os.path.join(root, "FBMS", name), exts=(".jpg",))
            anns = eio.list_frames(os.path.join(ann_root, name), exts=(".png",))
            stems = [int(os.path.splitext(os.path.basename(p))[0]) for p in anns]
            # sparse annotations: frame index = png number - first png number (SMTC's val_idx)
            out.append((name, frames, {s - stems[0]: p for s, p in zip(stems, anns)}))
    else:
        raise ValueError(f"unknown single-object dataset {dataset!r}")
    return out


def _read_foreground(ann):
    paths = ann if isinstance(ann, list) else [ann]
    fg = None
    for p in paths:
        lab = eio.read_label(p)
        m = lab > 0  # cv2.imread(...)/255 then IoU at 0.5: any non-zero annotation pixel is foreground
        fg = m if fg is None else fg | m
    return fg


def single_frame_iou(binar, gt):
    """(IoU with oracle selection, IoU merging every candidate) for one frame (protocol §3)."""
    def iou(a, b):
        u = np.logical_or(a, b).sum()
        return float(np.logical_and(a, b).sum() / (u + 1e-12))

    if binar.shape[0] == 0:
        empty = np.zeros_like(gt)
        return iou(empty, gt), iou(empty, gt)
    keep = [k for k in range(binar.shape[0]) if iou(binar[k], gt) > iou(binar[k], ~gt)]
    oracle = binar[keep].any(0) if keep else np.zeros_like(gt)
    return iou(oracle, gt), iou(binar.any(0), gt)


def evaluate_single(root, dataset, producer, out_dir, sequences=None, thresh=0.5, progress=True, overlays=True):
    frame_ious, frame_ious_all, per_video = [], [], {}
    for name, frames, anns in tqdm(single_object_videos(root, dataset, sequences), desc="videos",
                                   disable=not progress):
        shape = None
        rgb = []
        for p in frames:
            im = eio.read_rgb(p)
            if shape is None:
                shape = im.shape[:2]
            elif im.shape[:2] != shape:
                raise eio.DataError(f"{p} is {im.shape[1]}x{im.shape[0]} but {frames[0]} is {shape[1]}x{shape[0]}")
            rgb.append(im)
        cands = producer(np.stack(rgb))
        vi, va = [], []
        for t, ann in sorted(anns.items()):
            if t >= len(frames):
                raise eio.DataError(f"{ann}: annotation for frame {t} but {name} has {len(frames)} frames")
            gt = _read_foreground(ann)
            if gt.shape != shape:
                raise eio.DataError(f"{ann} is {gt.shape[1]}x{gt.shape[0]} but the frames are {shape[1]}x{shape[0]}")
            b = binarize(cands[t][0], shape, thresh)
            o, a = single_frame_iou(b, gt)
            vi.append(o)
            va.append(a)
            pred = np.zeros(shape, np.uint8)
            if b.shape[0]:
                pred[b.any(0)] = 1
            eio.write_indexed_png(os.path.join(out_dir, name, f"{t:05d}.png"), pred)
            if overlays and t == sorted(anns)[len(anns) // 2]:
                eio.save_overlay(os.path.join(out_dir, "overlays", f"{name}.jpg"), rgb[t], pred, gt.astype(np.uint8))
        frame_ious += vi
        frame_ious_all += va
        per_video[name] = {"IoU (oracle selection)": float(np.mean(vi)), "IoU (all candidates)": float(np.mean(va)),
                           "frames": len(vi)}
    return {"protocol": f"{dataset} single-object frame mean IoU over all annotated frames (threshold {thresh})",
            "global": {"IoU (oracle selection)": float(np.mean(frame_ious)),
                       "IoU (all candidates)": float(np.mean(frame_ious_all)), "frames": len(frame_ious)},
            "per_video": per_video}


# ---------------------------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser):
    parser.add_argument("--dataset", default="davis2017", choices=["davis2017", "davis2016", "segtrackv2", "fbms"],
                        help="davis2017 = multi-object unsupervised J&F; the others = single-object IoU")
    parser.add_argument("--root", required=True, help="dataset root (layouts: evaluation_protocols.md §5)")
    parser.add_argument("--checkpoint", required=True, help="SMTC / smtc_fast checkpoint (smtc_fast.models)")
    parser.add_argument("--out", default="runs/eval_discovery", help="output folder")
    parser.add_argument("--set", default="val", help="DAVIS-2017 subset list (ImageSets/2017/<set>.txt)")
    parser.add_argument("--sequences", nargs="*", default=None, help="only these videos")
    parser.add_argument("--num-frames", type=int, default=4, help="frames per window (eval_multi.sh: 4)")
    parser.add_argument("--iters", type=int, default=5, help="slot-attention iterations (eval_multi.sh: 5)")
    parser.add_argument("--resolution", type=int, nargs=2, default=(480, 800), metavar=("H", "W"),
                        help="model input size (eval_multi.py: 480 800)")
    parser.add_argument("--normalization", default="imagenet", choices=sorted(NORMALIZATION),
                        help="imagenet = what the model was trained with; kinetics = what eval_multi.py used")
    parser.add_argument("--candidates", default="similarity", choices=["similarity", "valid"],
                        help="similarity = cos(semantic, instance) >= 0.5 (eval_multi.py); valid = the training "
                             "validity filter (similarity and area)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="binarisation after min-max (unset: 0.3 multi-object, SMTC results.py; 0.5 single)")
    parser.add_argument("--tail-window", default="official", choices=list(TAIL_WINDOWS),
                        help="last window of a video whose length is not a multiple of --num-frames: official = "
                             "its remaining frames then the video's last frames (eval_multi.py: [4, 5, 4, 5] for 6 "
                             "frames); last = the last --num-frames frames in order ([2, 3, 4, 5])")
    parser.add_argument("--seed", type=int, default=0, help="seed of the instance-slot noise")
    parser.add_argument("--device", default="auto", type=resolve_device,
                        help="device: auto = cuda when available, else cpu")
    parser.add_argument("--no-overlays", action="store_true", help="skip the per-video overlay images")


def run(args):
    from smtc_fast.evaluate.propagation import write_summary
    from smtc_fast.models import load_checkpoint

    t0 = time.time()
    model, kind = load_checkpoint(args.checkpoint)
    print(f"loaded {kind} checkpoint {args.checkpoint}; iters {args.iters}, input {tuple(args.resolution)}, "
          f"{args.normalization} normalisation, seed {args.seed}")
    producer = SMTCCandidates(model, args.num_frames, args.iters, args.resolution, args.normalization, args.seed,
                              args.candidates, device=args.device, tail_window=args.tail_window)
    os.makedirs(args.out, exist_ok=True)
    try:
        if args.dataset == "davis2017":
            thr = 0.3 if args.threshold is None else args.threshold
            summary = evaluate_multi(args.root, producer, args.out, args.set, args.sequences, thr,
                                     overlays=not args.no_overlays)
        else:
            thr = 0.5 if args.threshold is None else args.threshold
            summary = evaluate_single(args.root, args.dataset, producer, args.out, args.sequences, thr,
                                      overlays=not args.no_overlays)
    except (eio.DataError, metrics.TooManyObjectsError) as e:
        print(f"smtc eval-discovery: error: {e}", file=sys.stderr)
        return 2
    summary.update({"dataset": args.dataset, "checkpoint": args.checkpoint, "checkpoint_kind": kind,
                    "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                    "seconds": time.time() - t0})
    if args.dataset == "davis2017":
        summary["per_object"] = {f"{k} ({name})": v for name in ("official", "per-frame")
                                 for k, v in summary[name]["per_object"].items()}
    write_summary(summary, args.out, f"eval_discovery-{args.dataset}")
    return 0
