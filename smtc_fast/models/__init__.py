"""The SMTC model (official_smtc_spec.md §1): backbone, correlation fusion, two-stage masked slot attention.

Names load their submodule on first use (PEP 562), so `smtc_fast.models.config` (SMTCConfig, no torch) can be
imported by the CLI's help without importing torch and timm.
"""
import importlib

_WHERE = {
    "ResNetBackbone": "backbone", "create_vit": "backbone", "interpolate_pos_embed": "backbone",
    "vit_forward": "backbone", "load_backbone_weights": "backbone",
    "SlotAttention": "slot_attention",
    "SMTCConfig": "config",
    "SMTC": "smtc", "SMTCOutput": "smtc", "SMTCPrediction": "smtc", "load_checkpoint": "smtc", "load_dino": "smtc",
    "load_backbone": "smtc",
}

__all__ = ["SMTC", "SMTCConfig", "SMTCOutput", "SMTCPrediction", "load_checkpoint", "load_dino", "SlotAttention",
           "create_vit", "vit_forward", "ResNetBackbone", "interpolate_pos_embed", "load_backbone", "load_backbone_weights"]


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"smtc_fast.models.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'smtc_fast.models' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
