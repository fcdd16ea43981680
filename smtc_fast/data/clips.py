"""Real-video clip datasets: frame folders (YouTube-VOS / DAVIS `JPEGImages/<video>/*.jpg`) and video files.

Sampling follows the official loader (spec §3.1): a video chosen uniformly at random, T frames `gap` apart around a
uniform centre `c` in [gap*T//2, len - gap*T//2 - 1] (frames c + gap*(i - T//2)), the gap reduced by one when the
video is too short; then a plain bilinear resize to the training size (no aspect ratio kept, like cv2.resize).
Unlike the official loader, item `idx` is a pure function of (seed, idx), so runs are reproducible and a DDP run
sees exactly the clips a single process would.
Items: {"frames": (T, 3, H, W) float32 in [0, 1], "index": int}, or uint8 in [0, 255] with `uint8=True` (what the
trainer asks for: a quarter of the bytes through the worker queues; it converts on the device).

Speed (issue 15, bench/bench_data.py). With `draft=True` (default) a JPEG at least twice the training size in both
sides is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (DCT scaling, PIL `Image.draft`; the largest factor that keeps
both sides >= the training size), then resized as above: a 1280x720 YouTube-VOS frame for a 256^2 clip decodes at
640x360, a quarter of the pixels; a 854x480 DAVIS frame is decoded in full (480 < 2 x 256). The geometry is the
same (a DCT-scaled pixel is the mean of its k x k block, centred where the half-pixel convention puts it); the
pixels differ from the official full decode + INTER_LINEAR only in that the k x k averaging removes some of the
aliasing of a 5:1 bilinear point sampling. `draft=False` decodes in full, as the official loader does.
"""
import glob
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")


def clip_indices(num_available, num_frames, gap, rng):
    """Official frame choice (spec §3.1) -> list of T frame indices into a video of `num_available` frames."""
    half = gap * num_frames // 2
    lo, hi = half, num_available - half - 1
    if hi < lo and gap > 1:  # the official loader reduces the gap by one, once
        gap -= 1
        half = gap * num_frames // 2
        lo, hi = half, num_available - half - 1
    if hi < lo:  # still too short: clamp (the official loader would fail here)
        centre = num_available // 2
    else:
        centre = rng.randint(lo, hi)
    return [min(max(centre + gap * (i - num_frames // 2), 0), num_available - 1) for i in range(num_frames)]


def resize_frames(frames, size):
    """uint8 (T, H, W, 3) numpy or tensor -> float32 (T, 3, size[0], size[1]) in [0, 1], bilinear, no antialias."""
    x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.contiguous()


def resize_frames_uint8(frames, size):
    """uint8 (T, H, W, 3) numpy -> uint8 (T, 3, size[0], size[1]): the same bilinear, no-antialias resize as
    resize_frames (cv2 INTER_LINEAR's sampling), computed by PyTorch's uint8 kernel in fixed point (as cv2's uint8
    path): within one grey level of resize_frames * 255 (at 256^2 from 640x360: 0.3 on average, a +0.13 bias), and
    about 16x faster than the float32 resize, which would cost more than the JPEG decode."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # a channels-last view, no copy
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x.contiguous()


def read_frame(path, size=None, draft=True):
    """An image file -> uint8 (H', W', 3) RGB. With `draft` and a JPEG at least twice `size` = (H, W) in both sides,
    libjpeg decodes it at 1/2, 1/4 or 1/8 scale (the largest that keeps both sides >= size; see the module
    docstring); otherwise, and for other formats, at full size."""
    with Image.open(path) as im:
        if draft and size is not None and im.format == "JPEG":
            im.draft("RGB", (int(size[1]), int(size[0])))  # PIL sizes are (W, H)
        return np.asarray(im.convert("RGB"))


class FrameFolderClips(torch.utils.data.Dataset):
    """Clips from `root/JPEGImages/<video>/*.jpg` (or `root/<video>/*.jpg`); YouTube-VOS and DAVIS layouts."""

    def __init__(self, root, num_frames=4, gap=4, size=(256, 256), seed=0, length=10000, uint8=False, draft=True):
        base = os.path.join(root, "JPEGImages")
        base = base if os.path.isdir(base) else root
        if os.path.isdir(os.path.join(base, "480p")):  # DAVIS
            base = os.path.join(base, "480p")
        self.videos = []
        for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            files = sorted(glob.glob(os.path.join(base, name, "*.jpg")) + glob.glob(os.path.join(base, name, "*.png")))
            if files:
                self.videos.append(files)
        if not self.videos:
            raise ValueError(f"no video folders with .jpg frames under {base!r} (expected JPEGImages/<video>/*.jpg)")
        self.num_frames, self.gap, self.size, self.seed, self.length = num_frames, gap, tuple(size), seed, length
        self.uint8, self.draft = uint8, draft

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        rng = random.Random(self.seed * 1_000_003 + int(idx))
        files = self.videos[rng.randrange(len(self.videos))]
        ids = clip_indices(len(files), self.num_frames, self.gap, rng)
        frames = np.stack([read_frame(files[i], self.size, self.draft) for i in ids])
        resize = resize_frames_uint8 if self.uint8 else resize_frames
        return {"frames": resize(frames, self.size), "index": int(idx)}


def _decode(path, wanted=None):
    """Decode a video with PyAV -> list of uint8 (H, W, 3) frames (only up to max(wanted) when given)."""
    import av

    out = []
    stop = None if wanted is None else max(wanted)
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if wanted is None or i in wanted:
                out.append(frame.to_ndarray(format="rgb24"))
            if stop is not None and i >= stop:
                break
    return out


class VideoFileClips(torch.utils.data.Dataset):
    """Clips from video files (mp4/avi/webm/...; decoded with PyAV). `root` is a file or a folder of files."""

    def __init__(self, root, num_frames=4, gap=4, size=(256, 256), seed=0, length=10000, uint8=False):
        if os.path.isfile(root):
            self.files = [root]
        else:
            self.files = sorted(f for f in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                                if f.lower().endswith(VIDEO_EXTENSIONS))
        if not self.files:
            raise ValueError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) at {root!r}")
        self.num_frames, self.gap, self.size, self.seed, self.length = num_frames, gap, tuple(size), seed, length
        self.uint8 = uint8
        self._counts = {}

    def __len__(self):
        return self.length

    def num_frames_of(self, path):
        if path not in self._counts:  # containers' frame counts are unreliable: count by decoding once
            import av

            with av.open(path) as container:
                self._counts[path] = sum(1 for _ in container.demux(video=0) if _.size > 0)
        return self._counts[path]

    def __getitem__(self, idx):
        rng = random.Random(self.seed * 1_000_003 + int(idx))
        path = self.files[rng.randrange(len(self.files))]
        ids = clip_indices(self.num_frames_of(path), self.num_frames, self.gap, rng)
        decoded = _decode(path, set(ids))
        by_index = dict(zip(sorted(set(ids)), decoded))
        if len(by_index) < len(set(ids)):  # fewer decodable frames than packets: reuse the last one
            last = decoded[-1]
            by_index = {i: by_index.get(i, last) for i in ids}
        resize = resize_frames_uint8 if self.uint8 else resize_frames
        return {"frames": resize(np.stack([by_index[i] for i in ids]), self.size), "index": int(idx)}


class MixedClips(torch.utils.data.Dataset):
    """Interleave clip datasets: item idx is item idx // k of source idx % k (k sources), so every batch mixes
    them evenly and item idx stays a pure function of (seed, idx). Items keep only "frames" and "index".
    When some sources ship uint8 and others float (synthetic clips are float), uint8 frames become float in [0, 1]
    so that a batch has one dtype."""

    def __init__(self, sources, length=10000):
        if not sources:
            raise ValueError("MixedClips needs at least one source")
        self.sources, self.length = list(sources), length
        self.uint8 = all(getattr(s, "uint8", False) for s in self.sources)

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        k = len(self.sources)
        item = self.sources[int(idx) % k][int(idx) // k]
        frames = item["frames"]
        if frames.dtype == torch.uint8 and not self.uint8:
            frames = frames.float() / 255.0
        return {"frames": frames, "index": int(idx)}


def open_clips(source, num_frames=4, gap=4, size=(256, 256), seed=0, uint8=False, draft=True, **synthetic_kwargs):
    """A clip dataset from a source string: 'synthetic', a video file / folder of videos, or a frame-folder root;
    several sources separated by commas ('synthetic,path/to/JPEGImages') are interleaved clip by clip (MixedClips).
    `uint8`: real-video clips ship uint8 frames (synthetic clips stay float); `draft`: JPEG DCT-scaled decoding
    (FrameFolderClips).

    Synthetic clips ignore `gap` (their frames are consecutive; the motion per frame is set by make_clip's
    max_speed), so the default `--gap 4` of the trainer does not quadruple the synthetic motion."""
    from smtc_fast.data.synthetic import SyntheticClips

    if "," in source:
        return MixedClips([open_clips(s.strip(), num_frames, gap, size, seed, uint8, draft, **synthetic_kwargs)
                           for s in source.split(",") if s.strip()])
    if source == "synthetic":
        return SyntheticClips(num_frames=num_frames, size=size, seed=seed, **synthetic_kwargs)
    if os.path.isfile(source) and source.lower().endswith(VIDEO_EXTENSIONS):
        return VideoFileClips(source, num_frames, gap, size, seed, uint8=uint8)
    if os.path.isdir(source):
        has_videos = any(f.lower().endswith(VIDEO_EXTENSIONS) for f in os.listdir(source))
        if has_videos:
            return VideoFileClips(source, num_frames, gap, size, seed, uint8=uint8)
        return FrameFolderClips(source, num_frames, gap, size, seed, uint8=uint8, draft=draft)
    raise ValueError(f"data source {source!r} is neither 'synthetic', a video file nor a directory "
                     f"(missing path?)")
