"""Synthetic videos: textured shapes moving over a drifting textured background, with instance masks.

Used by the tests, the demo and the evaluator tests: every clip is a pure function of its seed.

    make_clip(seed, num_frames=4, size=(64, 64), num_objects=2) -> (frames (T, 3, H, W) float32 in [0, 1],
                                                                   masks (T, H, W) int64: 0 background, k object k)
"""
import math

import torch
import torch.nn.functional as F


def _smooth_texture(g, channels, h, w, cells, contrast):
    """Low-frequency random colour field (channels, h, w) in [0, 1] around a random base colour."""
    base = torch.rand(channels, 1, 1, generator=g)
    noise = torch.rand(1, channels, cells, cells, generator=g) - 0.5
    noise = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0]
    return (base + contrast * noise).clamp(0, 1)


def make_clip(seed, num_frames=4, size=(64, 64), num_objects=2, gap=1, min_radius=0.14, max_radius=0.24,
              max_speed=0.05):
    """One synthetic clip; the same seed always gives the same clip (on any machine).

    Objects are discs, squares or diamonds, each with its own colour and stripe texture, moving at constant velocity
    (bouncing off the borders) in depth order (object k is drawn over objects < k). The background texture drifts
    slowly, so the camera "pans". `gap` spaces the sampled frames in time like the real-data loaders do.
    """
    H, W = size
    if num_frames < 1 or num_objects < 0 or H < 8 or W < 8:
        raise ValueError(f"need num_frames >= 1, num_objects >= 0 and size >= 8x8, got {num_frames}, "
                         f"{num_objects}, {size}")
    g = torch.Generator().manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
    steps = (num_frames - 1) * gap + 1
    pad = max(H, W) // 4
    bg = _smooth_texture(g, 3, H + 2 * pad, W + 2 * pad, cells=6, contrast=0.6)
    drift = (torch.rand(2, generator=g) - 0.5) * 2 * max_speed * 0.5 * min(H, W)

    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    objects = []
    for k in range(num_objects):
        r = (min_radius + (max_radius - min_radius) * torch.rand(1, generator=g).item()) * min(H, W)
        pos = torch.stack([r + (H - 2 * r) * torch.rand(1, generator=g)[0], r + (W - 2 * r) * torch.rand(1, generator=g)[0]])
        angle = 2 * math.pi * torch.rand(1, generator=g).item()
        speed = max_speed * min(H, W) * (0.5 + 0.5 * torch.rand(1, generator=g).item())
        vel = torch.tensor([math.sin(angle), math.cos(angle)]) * speed
        colour = torch.rand(3, 1, 1, generator=g)
        stripe_colour = (colour + 0.35 * (torch.rand(3, 1, 1, generator=g) - 0.5)).clamp(0, 1)
        period = 3.0 + 5.0 * torch.rand(1, generator=g).item()
        theta = math.pi * torch.rand(1, generator=g).item()
        shape = int(torch.randint(0, 3, (1,), generator=g))
        objects.append(dict(r=r, pos=pos, vel=vel, colour=colour, stripe=stripe_colour, period=period, theta=theta,
                            shape=shape))

    frames, masks = [], []
    for step in range(steps):
        oy, ox = (pad + drift * step).round().long().tolist()
        oy, ox = min(max(oy, 0), 2 * pad), min(max(ox, 0), 2 * pad)
        img = bg[:, oy:oy + H, ox:ox + W].clone()
        mask = torch.zeros(H, W, dtype=torch.long)
        for k, o in enumerate(objects):
            cy, cx = o["pos"].tolist()
            dy, dx = yy - cy, xx - cx
            if o["shape"] == 0:
                inside = dy ** 2 + dx ** 2 <= o["r"] ** 2
            elif o["shape"] == 1:
                inside = (dy.abs() <= o["r"] * 0.85) & (dx.abs() <= o["r"] * 0.85)
            else:
                inside = dy.abs() + dx.abs() <= o["r"] * 1.2
            # stripes move with the object, so its texture is temporally consistent
            phase = (dy * math.cos(o["theta"]) + dx * math.sin(o["theta"])) / o["period"]
            tex = torch.where((torch.floor(phase) % 2) == 0, o["colour"], o["stripe"])
            img = torch.where(inside, tex, img)
            mask[inside] = k + 1
        if step % gap == 0:
            frames.append(img)
            masks.append(mask)
        for o in objects:  # constant velocity, bounce at the borders
            o["pos"] = o["pos"] + o["vel"]
            for d, limit in ((0, H), (1, W)):
                if o["pos"][d] < o["r"] * 0.5 or o["pos"][d] > limit - o["r"] * 0.5:
                    o["vel"][d] = -o["vel"][d]
                    o["pos"][d] = o["pos"][d].clamp(o["r"] * 0.5, limit - o["r"] * 0.5)
    return torch.stack(frames).float(), torch.stack(masks)


class SyntheticClips(torch.utils.data.Dataset):
    """Map-style dataset of synthetic clips; item `idx` is make_clip(seed * 1_000_003 + idx, ...).

    Any integer index is valid (the trainer's sampler streams indices); `length` is only what len() reports.
    Items are dicts {"frames": (T, 3, H, W) float32 in [0, 1], "masks": (T, H, W) int64, "index": int}.
    """

    def __init__(self, num_frames=4, size=(64, 64), num_objects=2, seed=0, length=10000, gap=1, **clip_kwargs):
        self.num_frames, self.size, self.num_objects, self.seed = num_frames, tuple(size), num_objects, seed
        self.length, self.gap, self.clip_kwargs = length, gap, clip_kwargs

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        frames, masks = make_clip(self.seed * 1_000_003 + int(idx), self.num_frames, self.size, self.num_objects,
                                  gap=self.gap, **self.clip_kwargs)
        return {"frames": frames, "masks": masks, "index": int(idx)}
