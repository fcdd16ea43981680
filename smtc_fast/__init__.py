"""smtc_fast: Semantics Meets Temporal Correspondence (SMTC, ICCV 2023) as fast, tested software.

Layout (ops -> model -> losses -> trainer / evaluators -> CLI):
  smtc_fast.ops        the registered operators (C++/CUDA kernels) and their PyTorch references
  smtc_fast.models     the SMTC model (backbone, correlation fusion, two-stage masked slot attention)
  smtc_fast.losses     L_sem, L_reg, L_obj and the instance matching
  smtc_fast.train      the trainer (`smtc train`)
  smtc_fast.evaluate   label propagation, object discovery and the official metrics
  smtc_fast.cli        the `smtc` command

Importing never fails for want of the compiled extension: every op falls back to its reference.
"""
from smtc_fast._extension import build_info, cpu_cache_info, release_cpu_cache

__version__ = "0.1.0"
__all__ = ["build_info", "cpu_cache_info", "release_cpu_cache", "__version__"]
