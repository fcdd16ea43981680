"""Backbones: a timm ViT returning the last block's attention keys (spec §1.1), and a stride-8 ResNet-50.

The ViT may be of any timm family (DINO, DeiT / AugReg, DINOv2 with or without registers, DINOv3 with RoPE), see
the family table below; weights load from the projects' own files with `load_backbone_weights`.
Both return, for images (N, 3, H, W):
    keys    (N, h*w, D)  the features the SMTC head works on (ViT: last block's attention keys)
    tokens  (N, h*w, D)  or None; the ViT's last-block output tokens *without* the final norm (label propagation)
    (h, w)               the token grid
"""
import math
import os

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed


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


# ---------------------------------------------------------------------------------------------------------------
# timm ViT families: what differs between them, and how each is handled here.
#
#   "dino"     timm VisionTransformer, position table with a CLS entry; prefix tokens CLS (+ DeiT's distillation
#              token). DINO, DeiT, AugReg, DINOv2 without registers. Resize: DINO's bicubic scale-factor call
#              (interpolate_pos_embed), which is also DINOv2's own (interpolate_offset=0.1, antialias off:
#              sx = (w0 + 0.1) / M). DeiT and AugReg have no resize of their own at inference; they keep the DINO
#              rule, as this package always did.
#   "noembed"  timm VisionTransformer with no_embed_class: the table covers the patch grid only; prefix tokens CLS +
#              registers carry no position. DINOv2 with registers, DeiT-3. Resize: the official DINOv2 hub builds
#              its `_reg` models with interpolate_antialias=True, interpolate_offset=0.0, i.e.
#              interpolate(size=(h, w), mode='bicubic', antialias=True), which is timm's resample_abs_pos_embed
#              (timm folds the file's CLS position into cls_token when converting).
#   "eva"      timm Eva: RoPE on the patch tokens (prefix tokens CLS + registers are not rotated). DINOv3. Positions:
#              the model's own _pos_embed, RoPE on the (h, w) grid with coordinates normalised to [-1, 1] per axis,
#              so every grid is native. The official model in train mode also rescales the coordinates by a random
#              factor (hub: pos_embed_rope_rescale_coords=2); timm's model does not, nor do we: the student trains on
#              the positions it sees at inference.
#
# Keys (spec §1.1, last_block_keys): the key third of qkv(norm1(x)) of the last block, prefix tokens dropped. With
# its bias for "dino" / "noembed"; DINOv3 masks its key bias to zero. For RoPE models, before the rotation.

def vit_family(vit):
    """'dino', 'noembed' or 'eva' (the table above), from the module's structure, not its name."""
    from timm.models.eva import Eva

    if isinstance(vit, Eva):
        return "eva"
    if getattr(vit, "pos_embed", None) is not None and getattr(vit, "no_embed_class", False):
        return "noembed"
    return "dino"


def create_vit(name="vit_small_patch16_224", drop_path_rate=0.1, patch_size=None, depth=None, img_size=None):
    """A timm ViT (default ViT-S/16, the DINO architecture) of any family above: DINO / DeiT / AugReg / DINOv2
    (`vit_small_patch14_dinov2`, `..._reg4_dinov2`) / DINOv3 (`vit_small_patch16_dinov3[_qkvb]`), any size.
    For the DINO family the parameter names are the DINO file's (spec §6), so it sits directly at `SMTC.encoder`
    and official checkpoints load without renaming; other families load through `load_backbone_weights`."""
    from timm.models.eva import Eva

    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate)
    for key, value in (("patch_size", patch_size), ("depth", depth), ("img_size", img_size)):
        if value is not None:
            kwargs[key] = value
    if name == "resnet50":
        raise ValueError("'resnet50' is not a ViT: SMTC(SMTCConfig(backbone='resnet50')) builds ResNetBackbone")
    arch = name.split(".")[0]  # a pretrained tag ('vit_small_patch16_224.augreg_in21k') names the same module
    if not timm.is_model(arch):
        raise ValueError(f"backbone {name!r} is not a timm model name (see timm.list_models('*dinov2*'), "
                         f"timm.list_models('*dinov3*'))")
    if timm.models.model_entrypoint(arch).__module__.endswith(".eva"):
        kwargs["dynamic_img_size"] = True  # Eva computes its RoPE (and resizes any table) per input grid
    vit = timm.create_model(name, **kwargs)
    if not hasattr(vit, "blocks") or not hasattr(vit.blocks[-1], "attn") or not hasattr(vit, "patch_embed"):
        raise ValueError(f"backbone {name!r} is not a timm VisionTransformer with attention blocks")
    if not isinstance(vit, Eva) and getattr(vit, "pos_embed", None) is None:
        raise ValueError(f"backbone {name!r}: a VisionTransformer without a position table is not supported "
                         f"(RoPE models are supported through timm's Eva class, e.g. *_dinov3)")
    vit.stride = vit.patch_embed.proj.stride[0]
    vit.family = vit_family(vit)
    return vit


def _prefix_tokens(vit, N):
    """CLS, then the distillation token (DeiT-distilled) or the registers, in timm's order: [(N, 1 or R, D), ...]."""
    out = []
    for name in ("cls_token", "dist_token", "reg_token"):
        t = getattr(vit, name, None)
        if t is not None:
            out.append(t.expand(N, -1, -1))
    return out


def _embed(vit, images, h, w):
    """Patch tokens with their prefix tokens and positions -> x (N, prefix + h*w, D), rope (or None)."""
    N = images.shape[0]
    family = getattr(vit, "family", None) or vit_family(vit)
    if family == "eva":
        if not getattr(vit, "dynamic_img_size", False):
            raise ValueError("an Eva (RoPE) backbone must be built with dynamic_img_size=True (create_vit does)")
        x = vit.patch_embed(images)  # (N, h, w, D): dynamic_img_size keeps the grid for _pos_embed
        x, rope = vit._pos_embed(x)  # prefix tokens, the table (if any) resized by timm, RoPE for this (h, w)
        return vit.norm_pre(x), rope
    x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (N, h*w, D)
    x = vit.patch_embed.norm(x)
    if family == "noembed":  # the table covers the patch grid only; prefix tokens carry no position
        x = x + resample_abs_pos_embed(vit.pos_embed, new_size=(h, w), old_size=vit.patch_embed.grid_size,
                                       num_prefix_tokens=0)
        x = torch.cat(_prefix_tokens(vit, N) + [x], dim=1)
    else:
        x = torch.cat(_prefix_tokens(vit, N) + [x], dim=1)
        x = x + interpolate_pos_embed(vit.pos_embed, h, w, vit.num_prefix_tokens)
    x = vit.pos_drop(x)
    return vit.norm_pre(x), None


def _run_block(vit, i, blk, x, rope):
    if rope is None:
        return blk(x)
    if getattr(vit, "rope_mixed", False):  # per-depth RoPE (timm 'mixed' mode)
        return blk(x, rope=rope[i])
    return blk(x, rope=rope)


def last_block_keys(vit, x, prefix=0):
    """The last block's attention keys of the tokens after the first `prefix`, x (N, L, D) -> (N, L - prefix, A),
    A = heads * head_dim.

    channel = head * head_dim + d, as the attention splits them. The key bias is part of the key (DINO, DINOv2);
    DINOv3 masks its key bias to zero (official `bias_mask`, timm's fixed-zero `k_bias`), so its keys have none.
    For RoPE models the keys are taken **before** the rotation: rotated keys give k_i . k_j = k_i^T R(p_j - p_i) k_j,
    so the cross-frame correlation C (spec §1.2) would change with the displacement between the two tokens, and the
    slot attention's dot product slot . R(p) k with the token's absolute position p: a slot could not stand for the
    same thing at two places. Before the rotation the key is the token's content; position reaches it only through
    the earlier blocks, as with a learned table in DINO.
    Only the key rows of the fused qkv projection are applied, to the kept tokens only (the norm and the projection
    act per token): the same keys as the key third of qkv(norm1(x)) sliced, a third of that GEMM, and written
    contiguous, where the slice was a strided view that the head copied twice (SMTC.head, L_sem).
    """
    last = vit.blocks[-1]
    attn = last.attn
    post_norm = "PostNorm" in type(last).__name__ or "ResPost" in type(last).__name__
    x = x[:, prefix:]
    y = x if post_norm else last.norm1(x)  # post-norm blocks feed x itself to the attention
    if getattr(attn, "qkv", None) is not None:
        A = attn.qkv.out_features // 3  # qkv channel = which*A + head*head_dim + d: the keys are rows A..2A
        if getattr(attn, "q_bias", None) is not None:  # Eva with separate q/v biases and a fixed-zero k bias
            bias = attn.k_bias
        else:
            bias = None if attn.qkv.bias is None else attn.qkv.bias[A:2 * A]
        keys = F.linear(y, attn.qkv.weight[A:2 * A], bias)
    else:
        keys = attn.k_proj(y)
    if not isinstance(attn.k_norm, nn.Identity):  # qk-norm models: the key the attention uses is normed per head
        N, L, A = keys.shape
        keys = attn.k_norm(keys.reshape(N, L, attn.num_heads, -1)).reshape(N, L, A)
    return keys


def vit_forward(vit, images, return_tokens=False):
    """Keys of the last block (spec §1.1) for images (N, 3, H, W) -> keys (N, h*w, A), tokens or None, (h, w).

    Only the last block's keys feed SMTC: channel = head*head_dim + d, prefix tokens (CLS, registers) dropped. In
    training we stop after computing them, so the last block's attn.proj / norm2 / mlp and the final norm cost
    nothing (they get no gradient in the official code either); `return_tokens=True` runs the last block to the
    end, without the final `vit.norm`, for label propagation (spec §4.1). Any H, W divisible by the patch size.
    """
    N, _, H, W = images.shape
    stride = vit.stride
    if H % stride or W % stride:
        raise ValueError(f"images must have H and W divisible by the patch size {stride}, got {(H, W)}")
    h, w = H // stride, W // stride
    x, rope = _embed(vit, images, h, w)
    for i, blk in enumerate(vit.blocks[:-1]):
        x = _run_block(vit, i, blk, x, rope)
    P = vit.num_prefix_tokens
    keys = last_block_keys(vit, x, prefix=P)  # heads concatenated, prefix tokens dropped
    tokens = _run_block(vit, len(vit.blocks) - 1, vit.blocks[-1], x, rope)[:, P:] if return_tokens else None
    return keys, tokens, (h, w)


# ---------------------------------------------------------------------------------------------------------------
# backbone weights in the formats their projects publish

def _unwrap(sd):
    """A backbone state dict from the containers the projects use: DINO's full training checkpoint ('teacher',
    'backbone.' prefix, DINOHead 'head.*'), 'model' / 'state_dict' / 'module' wrappers, DDP 'module.' prefixes."""
    for key in ("teacher", "model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not k.startswith("head."):  # classifier / DINO head: SMTC uses the backbone only
            out[k] = v
    return out


def convert_backbone_state_dict(sd, vit):
    """The official DINOv2 / DINOv3 names -> the timm model's, with timm's own converters (checkpoint_filter_fn);
    timm-named files pass through. Geometry must already agree: a converter that would silently resample the
    patch kernel or the position table is stopped here with the setting to change."""
    sd = _unwrap(sd)
    w = sd.get("patch_embed.proj.weight")
    own = vit.patch_embed.proj.weight
    if w is not None and w.dim() == 4 and tuple(w.shape) != tuple(own.shape):
        raise ValueError(f"patch embedding {tuple(w.shape)} in the file, {tuple(own.shape)} in "
                         f"the model: another patch size or width (check the backbone name / patch_size)")
    pe, own_pe = sd.get("pos_embed"), getattr(vit, "pos_embed", None)
    if pe is not None and own_pe is not None:
        n = pe.shape[1] - (1 if "register_tokens" in sd else 0)  # DINOv2-reg files keep the CLS entry in the table
        if n != own_pe.shape[1]:
            g = int(round((n - (own_pe.shape[1] - vit.patch_embed.num_patches)) ** 0.5))
            raise ValueError(f"pos_embed of {n} entries in the file, {own_pe.shape[1]} in the model: set img_size to "
                             f"the pretraining size ({g} x patch {vit.stride} = {g * vit.stride} if square)")
    if vit_family(vit) == "eva":
        from timm.models.eva import checkpoint_filter_fn

        if "storage_tokens" in sd:  # DINOv3: the file's qkv.bias (k part masked) vs a timm model without biases
            for k in [k for k in sd if k.endswith("attn.qkv.bias")]:
                has_bias = getattr(vit.get_submodule(k[:-len(".qkv.bias")]), "q_bias", None) is not None
                if has_bias:
                    continue
                b = sd[k] * sd.get(k + "_mask", torch.ones_like(sd[k]))
                if b.abs().max() > 0:
                    raise ValueError(f"{k} is non-zero but the model has no q/v bias: use the '_qkvb' variant of "
                                     f"the backbone (e.g. vit_small_patch16_dinov3_qkvb)")
                del sd[k]  # all zero: the bias-free model computes the same
        return checkpoint_filter_fn(sd, vit)
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(sd, vit)


def load_backbone_weights(vit, state_dict_or_path, name=None):
    """Load backbone weights into a timm ViT, strictly: a DINO file, a timm state dict, or the official DINOv2 /
    DINOv3 `.pth` (dinov2_vits14_pretrain.pth, dinov2_vits14_reg4_pretrain.pth, dinov3_vits16_pretrain_*.pth).
    Keys the projects publish but never use at inference (DINOv2/v3 `mask_token`, DINOv3 `rope_embed.periods`
    and `qkv.bias_mask`, DINO's `head.*`) are dropped by name; anything else missing or unexpected is an error
    that lists them."""
    sd = state_dict_or_path
    source = name or (sd if isinstance(sd, str) else "state dict")
    if isinstance(sd, str):
        if not os.path.isfile(sd):
            raise FileNotFoundError(f"backbone weights file not found: {sd}")
        sd = torch.load(sd, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{source}: expected a state dict, got {type(sd).__name__}")
    sd = _unwrap(sd)
    periods = sd.get("rope_embed.periods")  # DINOv3 stores its RoPE periods (bf16 by default): check, then drop
    sd = convert_backbone_state_dict(sd, vit)
    own_periods = getattr(getattr(vit, "rope", None), "periods", None)
    if periods is not None and own_periods is not None and (
            periods.shape != own_periods.shape
            or not torch.allclose(periods.float(), own_periods.float(), rtol=1e-2, atol=0)):
        raise ValueError(f"{source}: rope_embed.periods differ from the model's RoPE (another rope base or head dim)")
    own, given = set(vit.state_dict()), set(sd)
    try:
        vit.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(
            f"backbone weights {source} does not fit this {type(vit).__name__} ({getattr(vit, 'family', '?')} "
            f"family; is the backbone name right?):\n"
            f"  missing keys ({len(own - given)}): {sorted(own - given)[:20]}\n"
            f"  unexpected keys ({len(given - own)}): {sorted(given - own)[:20]}\n"
            f"  torch: {str(exc)[:1500]}") from None
    return vit


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
