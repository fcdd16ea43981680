"""Training augmentation on batched clip tensors (on the GPU when there is one).

Photometric (official, spec §3.2; kornia VideoSequential with same_on_frame=True there): per clip, one draw of
    RandomGrayscale p=0.2 -> ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 -> GaussianBlur(k = int(0.1*H)//2*2+1) p=0.5
    -> Normalize(ImageNet mean/std)
applied identically to the clip's T frames, with torchvision.transforms.v2.functional on the (T, 3, H, W) tensor.
Bug fixed (spec §5.2): the blur sigma is drawn per clip from U(0.1, 2.0), not once per run.
Optional (paper): a random resized crop + horizontal flip, the same box for all frames of a clip.

Every clip's parameters come from its own torch.Generator seeded by the caller, so an augmentation is a function
of (seed, step, clip) and not of the process: DDP and single-process runs draw the same parameters.
"""
import torch
import torchvision.transforms.v2.functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _u(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def photometric(clip, g, normalize=True):
    """clip (T, 3, H, W) float in [0, 1]; g a torch.Generator -> augmented (and normalised) clip."""
    H = clip.shape[-2]
    if torch.rand((), generator=g).item() < 0.2:
        clip = TF.rgb_to_grayscale(clip, num_output_channels=3)
    if torch.rand((), generator=g).item() < 0.8:
        order = torch.randperm(4, generator=g).tolist()  # torchvision ColorJitter: random order per draw
        factors = [_u(g, 0.6, 1.4), _u(g, 0.6, 1.4), _u(g, 0.6, 1.4), _u(g, -0.1, 0.1)]
        for k in order:
            if k == 0:
                clip = TF.adjust_brightness(clip, factors[0])
            elif k == 1:
                clip = TF.adjust_contrast(clip, factors[1])
            elif k == 2:
                clip = TF.adjust_saturation(clip, factors[2])
            else:
                clip = TF.adjust_hue(clip, factors[3])
    if torch.rand((), generator=g).item() < 0.5:
        k = int(0.1 * H) // 2 * 2 + 1
        sigma = _u(g, 0.1, 2.0)
        clip = TF.gaussian_blur(clip, kernel_size=[k, k], sigma=[sigma, sigma])
    if normalize:
        clip = TF.normalize(clip, IMAGENET_MEAN, IMAGENET_STD)
    return clip


def crop_flip(clip, g, scale=(0.4, 1.0)):
    """Random resized crop (area fraction in `scale`, aspect kept) + horizontal flip p=0.5, same for all frames."""
    T, C, H, W = clip.shape
    frac = _u(g, *scale)
    ch, cw = max(1, int(round(H * frac ** 0.5))), max(1, int(round(W * frac ** 0.5)))
    top = int(torch.randint(0, H - ch + 1, (), generator=g))
    left = int(torch.randint(0, W - cw + 1, (), generator=g))
    clip = TF.resized_crop(clip, top, left, ch, cw, [H, W], antialias=True)
    if torch.rand((), generator=g).item() < 0.5:
        clip = TF.horizontal_flip(clip)
    return clip


def augment_clips(clips, seeds, photometric_aug=True, crop_and_flip=False):
    """clips (B, T, 3, H, W) float in [0, 1]; seeds: B ints -> (B, T, 3, H, W) normalised.

    Without photometric_aug the clips are only normalised (evaluation, and the equivalence tests)."""
    if clips.dim() != 5:
        raise ValueError(f"clips must be (B, T, 3, H, W), got shape {tuple(clips.shape)}")
    if len(seeds) != clips.shape[0]:
        raise ValueError(f"need one seed per clip: {clips.shape[0]} clips, {len(seeds)} seeds")
    out = []
    for clip, seed in zip(clips, seeds):
        g = torch.Generator().manual_seed(int(seed))
        if crop_and_flip:
            clip = crop_flip(clip, g)
        if photometric_aug:
            clip = photometric(clip, g)
        else:
            clip = TF.normalize(clip, IMAGENET_MEAN, IMAGENET_STD)
        out.append(clip)
    return torch.stack(out)
