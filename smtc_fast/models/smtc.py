"""The SMTC model (spec §1): backbone keys + correlation with the previous frame -> two-stage slot attention.

    frames (B, T, 3, H, W) --encoder--> keys K_t (B*T, n, D), n = h*w
    C_t = K_{t-1, resized to the training grid} . K_t^T          (B*T, n_train, n)   raw dot products (§1.2)
    X_t = K_t + h_c(C_t)                                         h_c = transport_proj, Conv1d(n_train, D, 1)
    slots = SlotAttention(X_t)                                   semantic (S) and instance (S x P) slots (§1.3)
    proj  = L2norm(mlp_slot(instance slots))                     the L_obj embedding (§1.4)
"""
import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from smtc_fast.models.backbone import ResNetBackbone, create_vit, load_backbone_weights, vit_forward
from smtc_fast.models.config import SMTCConfig  # lives in a torch-free module (`smtc train --help`)
from smtc_fast.models.slot_attention import SlotAttention
from smtc_fast.ops import correlation


@dataclass
class SMTCOutput:
    """Training forward outputs (spec §1.4). n = h*w tokens of the input frames."""
    semantic_logits: torch.Tensor   # (B, T, S, n)     last stage-1 iteration's q.k^T*scale (pre-softmax)
    keys: torch.Tensor              # (B, T, n, D)     backbone keys before fusion
    semantic_slots: torch.Tensor    # (B, T, S, D)
    instance_slots: torch.Tensor    # (B, T, S, P, D)
    proj: torch.Tensor              # (B, T, S, P, D)  L2norm(mlp_slot(instance_slots))
    instance_logits: torch.Tensor   # (B, T, S, P, n)
    grid: Tuple[int, int]           # (h, w)


@dataclass
class SMTCPrediction:
    """Inference outputs (spec §1.4), masks on the token grid (h, w)."""
    semantic_mask: torch.Tensor     # (B, T, S, h, w)     softmax over S
    instance_mask: torch.Tensor     # (B, T, S, P, h, w)  softmax over P times the semantic mask
    similarity: torch.Tensor        # (B, T, S, P)        cos(semantic slot s, instance slot (s, p))
    valid: torch.Tensor             # (B, T, S, P) bool   the L_obj validity filter (spec §2.4)
    grid: Tuple[int, int]


class SMTC(nn.Module):
    def __init__(self, config: Optional[SMTCConfig] = None):
        super().__init__()
        config = config or SMTCConfig()
        self.config = config
        if config.backbone == "resnet50":
            self.encoder = ResNetBackbone(key_dim=384)
        else:
            self.encoder = create_vit(config.backbone, drop_path_rate=config.drop_path_rate,
                                      patch_size=config.patch_size, depth=config.depth, img_size=config.img_size)
        D = self.encoder.embed_dim  # 384 for ViT-S
        stride = self.encoder.stride
        H, W = config.resolution
        if H % stride or W % stride:
            raise ValueError(f"resolution {config.resolution} must be divisible by the backbone stride {stride}")
        self.train_grid = (H // stride, W // stride)
        # h_c (spec §1.2): each target location's correlation vector over the training grid -> D.
        self.transport_proj = nn.Conv1d(self.train_grid[0] * self.train_grid[1], D, kernel_size=1)
        tau = config.tau if config.tau is not None else (0.5 if config.stage2_mask == "prob" else 0.3)
        self.slot_attention = SlotAttention(config.num_slots, config.num_instances, D, config.iters,
                                            stage2_mask=config.stage2_mask, tau=tau, slot_update=config.slot_update,
                                            sigma_grad=config.sigma_grad)
        hidden = config.mlp_slot_hidden or 2 * D
        self.mlp_slot = nn.Sequential(nn.Linear(D, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, D))

    def encode(self, frames, return_tokens=False):
        """frames (B, T, 3, H, W) -> keys (B*T, n, D), tokens or None, (h, w)."""
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"frames must be (B, T, 3, H, W), got shape {tuple(frames.shape)}")
        images = frames.flatten(0, 1)
        if isinstance(self.encoder, ResNetBackbone):
            return self.encoder(images, return_tokens=return_tokens)
        return vit_forward(self.encoder, images, return_tokens=return_tokens)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """nn.Module.load_state_dict, with an error that lists the missing and unexpected keys by name."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as exc:
            own, given = set(self.state_dict()), set(state_dict)
            raise RuntimeError(
                f"state dict does not fit SMTC({self.config}):\n"
                f"  missing keys ({len(own - given)}): {sorted(own - given)[:20]}\n"
                f"  unexpected keys ({len(given - own)}): {sorted(given - own)[:20]}\n"
                f"  torch: {str(exc)[:1500]}") from None

    def fuse(self, keys, B, T, grid):
        """keys (B*T, n, D) -> X (B*T, n, D) = keys + h_c(C) with the previous frame (cyclic, spec §1.2).

        h_c is a Conv1d(n_train, D, 1) over C (n_train, n), i.e. the linear map W (D, n_train) applied to each
        target token's column of C. We compute it on C^T (n, n_train) = keys . ref^T, the same dot products, so
        that h_c is one GEMM whose (B*T*n, D) output is already in the keys' layout: no (B*T, D, n) output to
        transpose, no grouped convolution (half the GEMM's speed here). The bias enters as the GEMM's accumulator
        (addmm) and the keys are added to its output, in the official order (conv with its bias, then + keys), also
        under autocast, where both are sums in the autocast dtype. The values equal the official conv up to float
        rounding."""
        h, w = grid
        keys = keys.contiguous()  # (a no-op for the ViT's keys; a caller's strided keys are copied once here)
        BT, n, D = keys.shape
        ref = keys
        if (h, w) != self.train_grid:  # only the reference is resized, so h_c's in-dim stays n_train
            ref = keys.transpose(1, 2).reshape(BT, D, h, w)
            ref = F.interpolate(ref, size=self.train_grid, mode="bilinear", align_corners=False)
            ref = ref.flatten(2).transpose(1, 2)
        # frame t uses t-1, frame 0 uses T-1: torch.roll's values, written by one cat (roll took 3x as long here)
        ref = ref.reshape(B, T, -1, D)
        ref = torch.cat([ref[:, -1:], ref[:, :-1]], dim=1).flatten(0, 1)
        corr_t = correlation(keys, ref)  # (B*T, n, n_train) = C^T, raw dot products
        weight = self.transport_proj.weight.squeeze(-1)  # (D, n_train)
        # (The keys + bias accumulator this replaced cost 26 ms per forward at the official batch on the CPU under
        # autocast: a float32 sum cast back down; and a broadcast bf16 add is 3x a full one here.)
        h_c = torch.addmm(self.transport_proj.bias, corr_t.reshape(BT * n, -1), weight.t())
        return (h_c + keys.view(BT * n, D)).view(BT, n, D)

    def forward(self, frames, instance_noise=None):
        """Training forward. frames (B, T, 3, H, W); instance_noise (B*T, S, P, D) or None -> SMTCOutput."""
        B, T = frames.shape[:2]
        keys, _, grid = self.encode(frames)
        return self.head(keys, B, T, grid, instance_noise)

    def head(self, keys, B, T, grid, instance_noise=None):
        """Everything after the backbone: keys (B*T, n, D) on grid (h, w) -> SMTCOutput."""
        keys = keys.contiguous()  # once, for h_c, the outputs and L_sem (which would copy them again)
        x = self.fuse(keys, B, T, grid)
        out = self.slot_attention(x, instance_noise=instance_noise)
        return self.head_outputs(keys, out, B, T, grid)

    def head_outputs(self, keys, out, B, T, grid):
        """The slot attention's dict -> SMTCOutput, with the L_obj projection mlp_slot (spec §1.4)."""
        S, P = self.config.num_slots, self.config.num_instances
        inst = out["instance_slots"]
        proj = F.normalize(self.mlp_slot(inst), dim=-1)
        n, D = keys.shape[1], keys.shape[2]
        return SMTCOutput(
            semantic_logits=out["semantic_logits"].reshape(B, T, S, n),
            keys=keys.reshape(B, T, n, D),
            semantic_slots=out["semantic_slots"].reshape(B, T, S, D),
            instance_slots=inst.reshape(B, T, S, P, D),
            proj=proj.reshape(B, T, S, P, D),
            instance_logits=out["instance_logits"].reshape(B, T, S, P, n),
            grid=grid,
        )

    @torch.no_grad()
    def predict(self, frames, instance_noise=None):
        """Inference (spec §1.4) at any input size divisible by the stride -> SMTCPrediction.

        Call model.eval() first (DropPath is active in train mode). The official discovery evaluation builds the
        model with iters=5 (spec §4.2): SMTCConfig(iters=5) loads the same weights."""
        from smtc_fast.losses import valid_instances

        out = self.forward(frames, instance_noise=instance_noise)
        B, T, S, P, n = out.instance_logits.shape
        h, w = out.grid
        sem = out.semantic_logits.float().softmax(dim=2)  # (B, T, S, n)
        ins = out.instance_logits.float().softmax(dim=3) * sem[:, :, :, None]  # (B, T, S, P, n)
        sim = (F.normalize(out.semantic_slots.float(), dim=-1)[:, :, :, None]
               * F.normalize(out.instance_slots.float(), dim=-1)).sum(-1)  # (B, T, S, P)
        valid = valid_instances(out.semantic_logits, out.semantic_slots, out.instance_slots) > 0
        return SMTCPrediction(semantic_mask=sem.reshape(B, T, S, h, w), instance_mask=ins.reshape(B, T, S, P, h, w),
                              similarity=sim, valid=valid, grid=(h, w))

    def tokens(self, frames):
        """Label-propagation features (spec §4.1): (B*T, h*w, D) un-normed last-block tokens, and (h, w)."""
        _, tokens, grid = self.encode(frames, return_tokens=True)
        return tokens, grid


def _config_from_official(sd):
    """Infer an SMTCConfig from an official state dict's shapes (spec §6)."""
    S = sd["slot_attention.slots_mu"].shape[1]
    n_train = sd["transport_proj.weight"].shape[1]
    D = sd["transport_proj.weight"].shape[0]
    patch = sd["encoder.patch_embed.proj.weight"].shape[-1]
    side = int(round(n_train ** 0.5))
    if side * side != n_train:
        raise ValueError(f"transport_proj in-dim {n_train} is not a square training grid")
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
    names = {(384, 16): "vit_small_patch16_224", (384, 8): "vit_small_patch8_224", (768, 16): "vit_base_patch16_224",
             (768, 8): "vit_base_patch8_224", (192, 16): "vit_tiny_patch16_224"}
    by_dim = {384: "vit_small_patch16_224", 768: "vit_base_patch16_224", 192: "vit_tiny_patch16_224"}
    if (D, patch) in names:
        backbone, patch_override = names[(D, patch)], None
    elif D in by_dim:  # another patch size on a known width (e.g. the demo's ViT-Tiny/8): timm's patch_size override
        backbone, patch_override = by_dim[D], patch
    else:
        raise ValueError(f"no timm ViT known for embed dim {D} and patch {patch}")
    g = int(round((sd["encoder.pos_embed"].shape[1] - 1) ** 0.5))
    return SMTCConfig(backbone=backbone, patch_size=patch_override, depth=depth if depth != 12 else None,
                      img_size=g * patch if g * patch != 224 else None, resolution=(side * patch, side * patch),
                      num_slots=S)


def _load_file(path, map_location="cpu"):
    """torch.load(weights_only=True) with errors that name the file (missing, truncated, not a torch file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 (pickle, zip and torch errors all mean: not a loadable checkpoint)
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc)[:300]})") \
            from None


def load_checkpoint(path, config: Optional[SMTCConfig] = None, which="student", map_location="cpu"):
    """Build an SMTC from a checkpoint file and say which kind it was.

    Accepts: a released SMTC checkpoint ({'model_state_dict': ...}, official names, config inferred from shapes),
    a DINO backbone file (flat ViT names; loaded into `encoder`, the head keeps its initialisation), another
    backbone file (official DINOv2 / DINOv3 `.pth` or a timm state dict, for the backbone `config` names), or our
    own training checkpoint ({'format': 'smtc_fast', 'config', 'student', 'teacher', ...}; `which` picks the
    weights). Always strict, with `weights_only=True`. Returns (model, kind) with kind in
    {"official", "dino", "backbone", "smtc_fast"}.
    """
    ckpt = _load_file(path, map_location)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if ckpt.get("format") == "smtc_fast":
        cfg = config or SMTCConfig.from_dict(json.loads(ckpt["model_config"]))
        if which not in ("student", "teacher"):
            raise ValueError(f"which must be 'student' or 'teacher', got {which!r}")
        model = SMTC(cfg)
        model.load_state_dict(ckpt[which], strict=True)
        return model, "smtc_fast"
    if "model_state_dict" in ckpt:
        sd = ckpt["model_state_dict"]
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        model = SMTC(config or _config_from_official(sd))
        model.load_state_dict(sd, strict=True)
        return model, "official"
    sd = ckpt.get("state_dict", ckpt.get("teacher", ckpt))  # DINO files: flat, or the full training ckpt
    sd = {k.replace("module.", "", 1).replace("backbone.", "", 1): v for k, v in sd.items()}
    if "patch_embed.proj.weight" in sd:
        model = SMTC(config or SMTCConfig())
        if isinstance(model.encoder, ResNetBackbone):
            raise ValueError(f"{path}: a ViT backbone file, but the config's backbone is resnet50")
        if "pos_embed" in sd and "mask_token" not in sd and model.encoder.family == "dino":
            load_dino(model, sd)  # DINO files, loaded as they always were
            return model, "dino"
        load_backbone(model, sd)  # DINOv2 / DINOv3 official files, timm state dicts (config names the backbone)
        return model, "backbone"
    raise ValueError(f"{path}: not an SMTC, smtc_fast or ViT backbone checkpoint "
                     f"(top-level keys: {sorted(ckpt)[:10]})")


def load_backbone(model, state_dict_or_path):
    """Load a ViT backbone's weights into model.encoder, strictly, in any format `load_backbone_weights` reads:
    a DINO file, a timm state dict, or the official DINOv2 / DINOv3 `.pth` for the model's `backbone`."""
    if isinstance(model.encoder, ResNetBackbone):
        raise ValueError("backbone weights need a ViT backbone (ResNet-50 takes MoCo files: --moco)")
    load_backbone_weights(model.encoder, state_dict_or_path)
    return model


def load_dino(model, state_dict_or_path):
    """Load DINO ViT weights (flat timm/DINO names, no head) into model.encoder, strictly."""
    sd = state_dict_or_path
    if isinstance(sd, str):
        sd = _load_file(sd, "cpu")
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    if isinstance(model.encoder, ResNetBackbone):
        raise ValueError("DINO weights need a ViT backbone")
    try:
        model.encoder.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"DINO weights do not fit {model.config.backbone}: {str(exc)[:2000]}") from None
    return model
