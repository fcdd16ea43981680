"""Backbones: a timm ViT returning the last block's attention keys (spec §1.1), and a stride-8 ResNet-50.

Both return, for images (N, 3, H, W):
    keys    (N, h*w, D)  the features the SMTC head works on (ViT: last block's attention keys)
    tokens  (N, h*w, D)  or None; the ViT's last-block output tokens *without* the final norm (label propagation)
    (h, w)               the token grid
"""
import math

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F


def interpolate_pos_embed(pos_embed, h, w, num_prefix_tokens=1):
    """DINO's positional-embedding resize (spec §1.1), with the same call so results match to the bit.

    pos_embed (1, prefix + g*g, D) for a pretrained g x g grid -> (1, prefix + h*w, D).
    The resize is `interpolate(scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode='bicubic')`: PyTorch then samples
    with that scale factor, not with h/g, so it differs from `interpolate(size=(h, w))` (by up to 0.6 at 256^2).
    As in DINO, a square input on the pretrained grid returns the table unchanged.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, dim = grid.shape[1], grid.shape[2]
    g = int(math.sqrt(n))
    if g * g != n:
        raise ValueError(f"pos_embed must hold a square grid after {num_prefix_tokens} prefix token(s), got {n} entries")
    if h == g and w == g:
        return pos_embed
    grid = grid.reshape(1, g, g, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")
    if grid.shape[-2:] != (h, w):  # the +0.1 exists to make floor(g * scale) land on h, w
        raise RuntimeError(f"pos-embed interpolation gave grid {tuple(grid.shape[-2:])}, expected {(h, w)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([prefix, grid], dim=1)


def create_vit(name="vit_small_patch16_224", drop_path_rate=0.1, patch_size=None, depth=None, img_size=None):
    """A timm VisionTransformer (default ViT-S/16, the DINO architecture). Its parameter names are the DINO file's
    (spec §6), so it sits directly at `SMTC.encoder` and official checkpoints load without renaming."""
    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
    for key, value in (("patch_size", patch_size), ("depth", depth), ("img_size", img_size)):
        if value is not None:
            kwargs[key] = value
    vit = timm.create_model(name, **kwargs)
    if not hasattr(vit, "blocks") or not hasattr(vit.blocks[-1], "attn") or not hasattr(vit, "pos_embed"):
        raise ValueError(f"backbone {name!r} is not a timm VisionTransformer with attention blocks")
    vit.stride = vit.patch_embed.proj.stride[0]
    return vit


def vit_forward(vit, images, return_tokens=False):
    """Keys of the last block (spec §1.1) for images (N, 3, H, W) -> keys (N, h*w, D), tokens or None, (h, w).

    Only the last block's keys feed SMTC: channel = head*head_dim + d, CLS dropped. In training we stop after
    computing them, so the last block's attn.proj / norm2 / mlp and the final norm cost nothing (they get no
    gradient in the official code either); `return_tokens=True` runs the last block to the end, without the final
    `vit.norm`, for label propagation (spec §4.1).
    """
    N, _, H, W = images.shape
    stride = vit.stride
    if H % stride or W % stride:
        raise ValueError(f"images must have H and W divisible by the patch size {stride}, got {(H, W)}")
    h, w = H // stride, W // stride
    x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (N, h*w, D)
    x = torch.cat([vit.cls_token.expand(N, -1, -1), x], dim=1)
    x = x + interpolate_pos_embed(vit.pos_embed, h, w, vit.num_prefix_tokens)
    x = vit.pos_drop(x)
    for blk in vit.blocks[:-1]:
        x = blk(x)
    last = vit.blocks[-1]
    D = vit.embed_dim
    qkv = last.attn.qkv(last.norm1(x))  # (N, 1+h*w, 3*D), channel = which*D + head*head_dim + d
    keys = qkv[:, vit.num_prefix_tokens:, D:2 * D]  # heads concatenated, CLS dropped
    tokens = last(x)[:, vit.num_prefix_tokens:] if return_tokens else None
    return keys, tokens, (h, w)


class ResNetBackbone(nn.Module):
    """ResNet-50 with dilated layer3 and layer4 (output stride 8; the paper's Table 4 ResNet variant).

    A 1x1 conv (`key_proj`, 2048 -> key_dim) gives the keys the SMTC head works on; `tokens` are the L2-normalisable
    2048-d layer4 features, used for label propagation. MoCo weights load with `load_moco`.
    """

    def __init__(self, key_dim=384):
        super().__init__()
        import torchvision

        net = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        self.body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                  net.layer4)
        self.key_proj = nn.Conv2d(2048, key_dim, kernel_size=1)
        self.embed_dim = key_dim
        self.stride = 8

    def forward(self, images, return_tokens=False):
        N, _, H, W = images.shape
        if H % self.stride or W % self.stride:
            raise ValueError(f"images must have H and W divisible by {self.stride}, got {(H, W)}")
        f = self.body(images)  # (N, 2048, H/8, W/8)
        h, w = f.shape[-2:]
        keys = self.key_proj(f).flatten(2).transpose(1, 2)
        tokens = f.flatten(2).transpose(1, 2) if return_tokens else None
        return keys, tokens, (h, w)

    def load_moco(self, path):
        """Load a MoCo (v1/v2/v3) ResNet-50 checkpoint: keys `module.encoder_q.*` or `module.base_encoder.*`."""
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
        out = {}
        names = ["conv1", "bn1", None, None, "layer1", "layer2", "layer3", "layer4"]
        for k, v in sd.items():
            for prefix in ("module.encoder_q.", "module.base_encoder.", "encoder_q.", "module.", ""):
                if k.startswith(prefix):
                    k = k[len(prefix):]
                    break
            head = k.split(".")[0]
            if head in names:
                out[f"{names.index(head)}.{k[len(head) + 1:]}"] = v
        missing, unexpected = self.body.load_state_dict(out, strict=False)
        if missing:
            raise RuntimeError(f"MoCo checkpoint {path} lacks ResNet-50 weights: {missing[:8]}... ({len(missing)} missing)")
        return self
