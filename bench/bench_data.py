"""Clip-loader throughput per worker core on real frames: ours vs an official-like cv2 loader, side by side.

    python bench/bench_data.py --json bench_out/bench_data.json
    python bench/bench_data.py --root /path/to/DAVIS --clips 48 --rounds 5

Loaders (one thread each, as a DataLoader worker runs; the same (seed, index) clip sampling, spec §3.1):
  ours           smtc_fast FrameFolderClips(uint8=True): JPEG draft (DCT-scaled) decode, uint8 bilinear resize,
                 uint8 (T, 3, H, W) out -- what `smtc train` ships from its workers
  ours-full      the same with draft=False (full-size decode)
  float32        FrameFolderClips() as before issue 15: full decode, float32 resize, float32 out
  cv2-official   like the official readRGB: cv2.imread, BGR->RGB, /255 (float64), cv2.resize INTER_LINEAR, float32 out
                 (skipped, with a message, when opencv is not installed: `pip install opencv-python-headless`)
Frames: the DAVIS frames under --root (854x480), and 1280x720 copies made from them (bicubic upscale, JPEG quality
90) standing in for YouTube-VOS. Each loader decodes the same clips; rounds alternate the loaders and the medians
are reported. The budget table turns frames/s per core into worker processes per GPU step: one step of the official
recipe eats batch x T = 32 x 4 = 128 frames.
"""
import argparse
import glob
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from smtc_fast.data.clips import FrameFolderClips, clip_indices  # noqa: E402

try:
    import cv2
except ImportError:
    cv2 = None


class CV2OfficialClips(FrameFolderClips):
    """The official loader's per-frame work (spec §3.1 readRGB) with our sampling: float32 (T, 3, H, W) in [0, 1]."""

    def __getitem__(self, idx):
        rng = random.Random(self.seed * 1_000_003 + int(idx))
        files = self.videos[rng.randrange(len(self.videos))]
        ids = clip_indices(len(files), self.num_frames, self.gap, rng)
        H, W = self.size
        frames = []
        for i in ids:
            rgb = cv2.imread(files[i])[:, :, ::-1] / 255.0  # float64, as the official code
            frames.append(cv2.resize(rgb, (W, H), interpolation=cv2.INTER_LINEAR).astype(np.float32))
        return {"frames": torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous(), "index": int(idx)}


def make_hd_copy(src_root, dst, size=(1280, 720), quality=90):
    """JPEGImages/<video>/*.jpg of src_root upscaled to `size` (W, H) under dst."""
    from PIL import Image

    base = os.path.join(src_root, "JPEGImages")
    base = os.path.join(base, "480p") if os.path.isdir(os.path.join(base, "480p")) else base
    for video in sorted(os.listdir(base)):
        files = sorted(glob.glob(os.path.join(base, video, "*.jpg")))
        if not files:
            continue
        os.makedirs(os.path.join(dst, "JPEGImages", video), exist_ok=True)
        for f in files:
            Image.open(f).convert("RGB").resize(size, Image.BICUBIC).save(
                os.path.join(dst, "JPEGImages", video, os.path.basename(f)), quality=quality)
    return dst


def frame_size(root):
    from PIL import Image

    f = sorted(glob.glob(os.path.join(root, "JPEGImages", "**", "*.jpg"), recursive=True))[0]
    with Image.open(f) as im:
        return im.size


def time_loader(ds, indices):
    t0 = time.perf_counter()
    nbytes = 0
    for i in indices:
        x = ds[i]["frames"]
        nbytes = x.numel() * x.element_size()
    return time.perf_counter() - t0, nbytes


def environment():
    """bench_train's header (CPU, cores, torch, python, commit, load) plus the decoders' versions."""
    import PIL

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import environment as train_environment

    env = train_environment()
    env.update(pillow=PIL.__version__, opencv=cv2.__version__ if cv2 else None)
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join(ROOT, "python_tests", "data", "davis2016"),
                        help="a JPEGImages/<video>/*.jpg root (DAVIS layout accepted)")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"), help="training size")
    parser.add_argument("--frames", type=int, default=4, help="frames per clip (T)")
    parser.add_argument("--gap", type=int, default=4)
    parser.add_argument("--clips", type=int, default=24, help="clips per loader per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    parser.add_argument("--batch", type=int, default=32, help="clips per GPU step, for the budget table")
    parser.add_argument("--step-ms", type=float, nargs="+", default=[30.0, 60.0, 100.0],
                        help="GPU step times (ms) for the budget table")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    torch.set_num_threads(1)  # a DataLoader worker runs torch with one thread
    if cv2 is not None:
        cv2.setNumThreads(1)
    else:
        print("cv2-official: skipped (opencv is not installed; `pip install opencv-python-headless` adds the column)")
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    try:
        sources = {"davis": args.root, "1280x720": make_hd_copy(args.root, os.path.join(tmp, "hd"))}
        kw = dict(num_frames=args.frames, gap=args.gap, size=tuple(args.size), seed=0)
        loaders = {"ours": lambda r: FrameFolderClips(r, uint8=True, draft=True, **kw),
                   "ours-full": lambda r: FrameFolderClips(r, uint8=True, draft=False, **kw),
                   "float32": lambda r: FrameFolderClips(r, draft=False, **kw)}
        if cv2 is not None:
            loaders["cv2-official"] = lambda r: CV2OfficialClips(r, **kw)
        indices = list(range(args.clips))
        results = {}
        for src_name, root in sources.items():
            datasets = {name: make(root) for name, make in loaders.items()}
            for ds in datasets.values():  # warm the page cache and the decoders
                time_loader(ds, indices[:2])
            runs = {name: [] for name in datasets}
            nbytes = {}
            for _ in range(args.rounds):
                for name, ds in datasets.items():
                    seconds, nbytes[name] = time_loader(ds, indices)
                    runs[name].append(args.clips * args.frames / seconds)
            W, H = frame_size(root)
            results[src_name] = {"source_size": [W, H],
                                 "loaders": {name: {"frames_per_s": statistics.median(r), "all_frames_per_s": r,
                                                    "bytes_per_clip": nbytes[name]} for name, r in runs.items()}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    names = list(loaders)
    print(f"\nframes per second per worker core (one thread), clips of {args.frames} frames -> "
          f"{args.size[0]}x{args.size[1]}, median of {args.rounds} rounds x {args.clips} clips")
    print(f"{'source':<18}" + "".join(f"{n:>14}" for n in names) + "   ours / " + names[-1])
    for src_name, res in results.items():
        W, H = res["source_size"]
        fps = [res["loaders"][n]["frames_per_s"] for n in names]
        print(f"{src_name + f' ({W}x{H})':<18}" + "".join(f"{v:14.1f}" for v in fps) + f"   x{fps[0] / fps[-1]:.2f}")
    print("bytes per clip shipped: " + ", ".join(f"{n} {results['davis']['loaders'][n]['bytes_per_clip'] / 1e6:.2f} MB"
                                                for n in names))

    frames_per_step = args.batch * args.frames
    budget = []
    print(f"\nworkers (one core each) to keep one GPU fed: {args.batch} clips x {args.frames} frames = "
          f"{frames_per_step} frames per step")
    print(f"{'source':<18}{'loader':<14}" + "".join(f"{f'step {s:g} ms':>14}" for s in args.step_ms))
    for src_name, res in results.items():
        for n in names:
            fps = res["loaders"][n]["frames_per_s"]
            need = [math.ceil(frames_per_step / (s / 1e3) / fps) for s in args.step_ms]
            budget.append({"source": src_name, "loader": n, "step_ms": args.step_ms, "workers": need})
            print(f"{src_name:<18}{n:<14}" + "".join(f"{w:14d}" for w in need))

    if args.json:
        out = {"environment": environment(), "config": vars(args), "results": results, "budget": budget}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print("wrote", args.json)


if __name__ == "__main__":
    main()
