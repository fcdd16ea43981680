"""SMTCConfig: the model's options, in a module that imports neither torch nor timm.

`smtc train --help` builds its model options from these fields (smtc_fast/train.py), and a help screen should not
pay for importing torch; smtc_fast.models.smtc re-exports it.
"""
import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass
class SMTCConfig:
    """Model configuration. Defaults = the released checkpoint's model (spec §1, §6)."""
    backbone: str = "vit_small_patch16_224"  # any timm ViT name (DINO/DeiT/AugReg/DINOv2 +-reg/DINOv3, backbone.py),
                                              # or "resnet50" (stride 8, paper Table 4)
    patch_size: Optional[int] = None          # timm overrides for small test/demo models (None = the model's own)
    depth: Optional[int] = None
    img_size: Optional[int] = None            # the pretrained pos-embed grid = img_size / patch_size
    drop_path_rate: float = 0.1               # DINO's default, active in the student only (spec §1.1)
    resolution: Tuple[int, int] = (256, 256)  # training resolution: fixes transport_proj's in-dim (spec §1.2)
    num_slots: int = 16
    num_instances: int = 4
    iters: int = 3                            # 3 in training, 5 in the official discovery evaluation
    stage2_mask: str = "logits"               # "logits" (official, tau 0.3) | "prob" (paper Eq. 7, tau 0.5) | "soft"
    tau: Optional[float] = None               # None -> 0.3 for "logits", 0.5 for "prob"
    slot_update: str = "residual"             # "residual" (official) | "gru" (paper Eq. 6)
    mlp_slot_hidden: Optional[int] = None     # None -> 2 * D (768 for ViT-S)
    sigma_grad: str = "zero"                  # "zero" (official: AdamW's decay shrinks log sigma) | "none" (frozen)

    def __post_init__(self):
        self.resolution = tuple(int(r) for r in self.resolution)
        if len(self.resolution) != 2 or min(self.resolution) <= 0:
            raise ValueError(f"resolution must be (H, W) > 0, got {self.resolution}")
        for name in ("num_slots", "num_instances", "iters"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SMTCConfig fields: {sorted(unknown)}")
        return cls(**d)
