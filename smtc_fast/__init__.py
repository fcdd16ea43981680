"""smtc_fast: Semantics Meets Temporal Correspondence (SMTC, ICCV 2023) as fast, tested software.

Layout (ops -> model -> losses -> trainer / evaluators -> CLI):
  smtc_fast.ops        the registered operators (C++/CUDA kernels) and their PyTorch references
  smtc_fast.models     the SMTC model (backbone, correlation fusion, two-stage masked slot attention)
  smtc_fast.losses     L_sem, L_reg, L_obj and the instance matching
  smtc_fast.train      the trainer (`smtc train`)
  smtc_fast.evaluate   label propagation, object discovery and the official metrics
  smtc_fast.cli        the `smtc` command

Importing never fails for want of the compiled extension: every op falls back to its reference.
Importing smtc_fast itself loads neither torch nor the extension (the `smtc` command's start-up): the names
below load smtc_fast._extension on first use.
"""
__version__ = "0.1.0"
__all__ = ["build_info", "cpu_cache_info", "release_cpu_cache", "__version__"]


def __getattr__(name):  # PEP 562: build_info & co. import torch and the extension only when asked for
    if name in ("build_info", "cpu_cache_info", "release_cpu_cache"):
        from smtc_fast import _extension

        return getattr(_extension, name)
    raise AttributeError(f"module 'smtc_fast' has no attribute {name!r}")
