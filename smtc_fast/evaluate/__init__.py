"""Evaluators: the official DAVIS / JHMDB / VIP metrics, label propagation and object discovery.

metrics.py            vectorised J, F, statistics, both unsupervised matchings, PCK, mIoU
metrics_reference.py  the official-style per-object loops (test oracle, benchmark baseline)
io.py                 frame / label readers with errors that name the file, indexed PNGs, overlays, JSON/CSV
davis.py              `smtc eval-masks`      (drop-in for davis2017-evaluation's evaluation_method.py)
propagation.py        `smtc eval-prop`       (CRW / SMTC label propagation on DAVIS-2017, JHMDB, VIP)
discovery.py          `smtc eval-discovery`  (single- and multi-object discovery from an SMTC model)
Submodules are imported on use, so importing smtc_fast stays light.
"""
