"""`smtc visualize`: render a checkpoint's semantic and instance slots on any clip, and the picture helpers the demo
shares (colour maps, overlays, side-by-side panels, animated GIFs).

    smtc visualize --checkpoint smtc.pth --clip path/to/frames_or_video --out runs/vis

For every frame the model decomposes (windows of --num-frames frames, as the discovery evaluation does, spec §4.2),
each pixel is coloured by its most likely semantic slot (argmax over S of softmax_S, upsampled bilinearly from the
token grid) and by its most likely instance slot (argmax over the S*P masks softmax_P * softmax_S). Slots whose
similarity cos(semantic_s, instance_{s,p}) passes the discovery threshold are the candidates eval-discovery
scores; the third panel shows them (merged) over the frame.
"""
import colorsys
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from smtc_fast._lazy import lazy, resolve_device
from smtc_fast.evaluate import io as eio

torch = lazy("torch")  # imported when a function runs: `smtc visualize --help` stays fast (smtc_fast/_lazy.py)
F = lazy("torch.nn.functional")


# ---------------------------------------------------------------------------------------------------------------
# colours and panels

def distinct_colours(n, seed_hue=0.08):
    """n well-separated RGB colours (golden-ratio hues, alternating lightness), uint8 (n, 3)."""
    out = []
    for i in range(n):
        h = (seed_hue + i * 0.618033988749895) % 1.0
        light = 0.55 if i % 2 == 0 else 0.42
        out.append(colorsys.hls_to_rgb(h, light, 0.85))
    return (np.array(out).reshape(n, 3) * 255).round().astype(np.uint8)


def colour_labels(rgb, labels, colours, alpha=0.55, skip_zero=False):
    """Blend colours[labels] over the frame; with skip_zero, label 0 (background) is left uncoloured."""
    out = rgb.astype(np.float32).copy()
    sel = labels > 0 if skip_zero else np.ones(labels.shape, bool)
    out[sel] = (1 - alpha) * out[sel] + alpha * colours[labels[sel]].astype(np.float32)
    return out.clip(0, 255).astype(np.uint8)


def panel_row(images, titles=None, height=None, min_height=160):
    """Concatenate (H, W, 3) uint8 images left to right (resized to a common height, at least min_height so tiny
    synthetic frames stay legible) with a title on each."""
    height = max(height or images[0].shape[0], min_height)
    tiles = []
    for i, im in enumerate(images):
        pil = Image.fromarray(im)
        if pil.height != height:
            pil = pil.resize((max(1, round(pil.width * height / pil.height)), height), Image.BILINEAR)
        if titles:
            draw = ImageDraw.Draw(pil)
            draw.rectangle((0, 0, 7 * len(titles[i]) + 8, 16), fill=(0, 0, 0))
            draw.text((4, 2), titles[i], fill=(255, 255, 255))
        tiles.append(np.asarray(pil))
    return np.concatenate(tiles, axis=1)


def save_gif(path, frames, fps=8, max_width=960):
    """Write an animated GIF (looping) of a list of (H, W, 3) uint8 frames; wider frames are scaled down."""
    if not frames:
        raise ValueError(f"save_gif {path}: no frames")
    ims = [Image.fromarray(f) for f in frames]
    if ims[0].width > max_width:
        size = (max_width, round(ims[0].height * max_width / ims[0].width))
        ims = [im.resize(size, Image.BILINEAR) for im in ims]
    ims = [im.convert("P", palette=Image.ADAPTIVE, colors=255) for im in ims]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=max(20, round(1000 / fps)), loop=0,
                optimize=False)
    return path


def upsample_argmax(masks, size):
    """(K, h, w) soft masks -> (H, W) int64 argmax after bilinear upsampling to size."""
    m = F.interpolate(masks[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    return m.argmax(0).numpy()


# ---------------------------------------------------------------------------------------------------------------
# clips

def read_clip(path, max_frames=None, max_height=None):
    """A clip from a folder of frames or a video file -> (rgb (T, H, W, 3) uint8, frame names).

    max_height scales larger frames down (keeping the aspect ratio) so a 1080p video stays cheap on a CPU."""
    from smtc_fast.data.clips import VIDEO_EXTENSIONS, _decode

    if os.path.isdir(path):
        files = eio.list_frames(path)
        if max_frames:
            files = files[:max_frames]
        frames = [eio.read_rgb(f) for f in files]
        names = [os.path.splitext(os.path.basename(f))[0] for f in files]
    elif os.path.isfile(path) and path.lower().endswith(VIDEO_EXTENSIONS):
        frames = _decode(path, None if not max_frames else set(range(max_frames)))
        names = [f"{i:05d}" for i in range(len(frames))]
    elif os.path.exists(path):
        raise eio.DataError(f"{path}: not a folder of frames nor a video file ({', '.join(VIDEO_EXTENSIONS)})")
    else:
        raise eio.DataError(f"{path}: no such file or folder")
    if not frames:
        raise eio.DataError(f"{path}: no frames found")
    shape = frames[0].shape
    for f, n in zip(frames, names):
        if f.shape != shape:
            raise eio.DataError(f"{path}: frame {n} is {f.shape[1]}x{f.shape[0]} but the first is "
                                f"{shape[1]}x{shape[0]}")
    rgb = np.stack(frames)
    if max_height and rgb.shape[1] > max_height:
        h, w = max_height, round(rgb.shape[2] * max_height / rgb.shape[1])
        rgb = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in rgb])
    return rgb, names


# ---------------------------------------------------------------------------------------------------------------
# slots

def slot_maps(producer, rgb, thresh=0.3):
    """Run an SMTCCandidates producer over a clip -> per frame dict with
        semantic (H, W)        argmax semantic slot
        instance (H, W)        argmax instance slot, index s*P + p
        candidates (n, H, W)   bool: the discovery candidates (similarity filter; min-max, > thresh, as eval-discovery)
        objects (H, W)         1 + the candidate with the largest soft mask where a candidate covers the pixel, else 0
        keys [(s, p)]          the candidates' slots"""
    from smtc_fast.evaluate.discovery import binarize

    size = rgb.shape[1:3]
    out = [None] * rgb.shape[0]
    for t, sem, inst, sim, valid in producer.frames(rgb):
        keep = sim >= producer.sim_thresh if producer.candidates == "similarity" else valid
        s_idx, p_idx = torch.nonzero(keep, as_tuple=True)
        cand = inst[s_idx, p_idx]
        binar = binarize(cand, size, thresh)
        objects = np.zeros(size, np.int64)
        if binar.shape[0]:
            soft = torch.nn.functional.interpolate(cand[None], size=tuple(size), mode="bilinear",
                                                   align_corners=False)[0].numpy()
            soft = np.where(binar, soft, -np.inf)
            objects = np.where(binar.any(0), soft.argmax(0) + 1, 0)
        out[t] = {"semantic": upsample_argmax(sem, size),
                  "instance": upsample_argmax(inst.flatten(0, 1), size),
                  "candidates": binar, "objects": objects,
                  "keys": list(zip(s_idx.tolist(), p_idx.tolist()))}
    return out


def slot_panels(rgb, maps, num_slots, num_instances):
    """Per frame: [frame | semantic slots | instance slots | discovered objects] as one (H, 4W, 3) image."""
    sem_col = distinct_colours(num_slots)
    inst_col = distinct_colours(num_slots * num_instances, seed_hue=0.33)
    obj_col = np.concatenate([np.zeros((1, 3), np.uint8), distinct_colours(num_slots * num_instances, 0.6)])
    rows = []
    for im, m in zip(rgb, maps):
        rows.append(panel_row([im, colour_labels(im, m["semantic"], sem_col),
                               colour_labels(im, m["instance"], inst_col),
                               colour_labels(im, m["objects"], obj_col, skip_zero=True)],
                              ["frame", "semantic slots", "instance slots", "discovered objects"]))
    return rows


def strip(panels, picks=3):
    """A still: `picks` evenly spaced panel rows stacked vertically (the README / report figure)."""
    idx = np.linspace(0, len(panels) - 1, min(picks, len(panels))).round().astype(int)
    return np.concatenate([panels[i] for i in idx], axis=0)


# ---------------------------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True,
                        help="an SMTC checkpoint: the released model_*.pth or a `smtc train` last.pt")
    parser.add_argument("--clip", required=True, help="a folder of frames (jpg/png) or a video file")
    parser.add_argument("--out", default="runs/visualize", help="output folder (GIF + PNG per clip)")
    parser.add_argument("--num-frames", type=int, default=4, help="frames per window (eval_multi.sh: 4)")
    parser.add_argument("--iters", type=int, default=5, help="slot-attention iterations (eval_multi.sh: 5; "
                                                              "training: 3)")
    parser.add_argument("--resolution", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="model input size (unset: the frame size rounded down to the patch stride; the "
                             "official discovery evaluation uses 480 800)")
    parser.add_argument("--max-frames", type=int, default=60, help="render only the first N frames")
    parser.add_argument("--max-height", type=int, default=480, help="scale taller frames down to this height")
    parser.add_argument("--normalization", default="imagenet", choices=["imagenet", "kinetics"],
                        help="input statistics: imagenet (training, spec §3) or kinetics (eval_multi.py)")
    parser.add_argument("--threshold", type=float, default=0.3, help="candidate binarisation after min-max "
                                                                     "(SMTC results.py: 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the instance-slot noise")
    parser.add_argument("--fps", type=float, default=8, help="GIF frame rate")
    parser.add_argument("--device", default="auto", type=resolve_device,
                        help="device: auto = cuda when available, else cpu")


def visualize_clip(model, rgb, out_dir, name, num_frames=4, iters=5, resolution=None, normalization="imagenet",
                   threshold=0.3, seed=0, fps=8, device="cpu"):
    """Render one clip -> (gif path, png path, per-frame slot maps)."""
    from smtc_fast.evaluate.discovery import SMTCCandidates

    stride = model.encoder.stride
    if resolution is None:
        resolution = (max(stride, rgb.shape[1] // stride * stride), max(stride, rgb.shape[2] // stride * stride))
    producer = SMTCCandidates(model, num_frames, iters, resolution, normalization, seed, device=device)
    maps = slot_maps(producer, rgb, threshold)
    panels = slot_panels(rgb, maps, model.config.num_slots, model.config.num_instances)
    gif = save_gif(os.path.join(out_dir, f"{name}_slots.gif"), panels, fps)
    png = os.path.join(out_dir, f"{name}_slots.png")
    Image.fromarray(strip(panels)).save(png)
    return gif, png, maps


def run(args):
    from smtc_fast.models import load_checkpoint

    if not os.path.isfile(args.checkpoint):
        print(f"smtc visualize: error: --checkpoint {args.checkpoint}: no such file", file=sys.stderr)
        return 2
    try:
        rgb, _ = read_clip(args.clip, args.max_frames, args.max_height)
    except eio.DataError as e:
        print(f"smtc visualize: error: --clip {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    model, kind = load_checkpoint(args.checkpoint)
    print(f"loaded {kind} checkpoint {args.checkpoint}; {rgb.shape[0]} frames of {rgb.shape[2]}x{rgb.shape[1]}")
    name = os.path.splitext(os.path.basename(os.path.normpath(args.clip)))[0]
    gif, png, maps = visualize_clip(model.to(args.device), rgb, args.out, name, args.num_frames, args.iters,
                                    args.resolution, args.normalization, args.threshold, args.seed, args.fps,
                                    args.device)
    n = np.mean([m["candidates"].shape[0] for m in maps])
    print(f"{n:.1f} candidate objects per frame on average")
    print(f"wrote {gif}\nwrote {png}")
    return 0
