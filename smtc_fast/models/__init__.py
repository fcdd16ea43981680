"""The SMTC model (official_smtc_spec.md §1): backbone, correlation fusion, two-stage masked slot attention."""
from smtc_fast.models.backbone import (ResNetBackbone, create_vit, interpolate_pos_embed, load_backbone_weights,
                                      vit_forward)
from smtc_fast.models.slot_attention import SlotAttention
from smtc_fast.models.smtc import (SMTC, SMTCConfig, SMTCOutput, SMTCPrediction, load_backbone, load_checkpoint,
                                   load_dino)

__all__ = ["SMTC", "SMTCConfig", "SMTCOutput", "SMTCPrediction", "load_checkpoint", "load_dino", "SlotAttention",
           "create_vit", "vit_forward", "ResNetBackbone", "interpolate_pos_embed", "load_backbone", "load_backbone_weights"]
