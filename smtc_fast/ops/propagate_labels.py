"""Fused label propagation: one target frame of the CRW / SMTC protocol (evaluation_protocols.md §2.3).

    query        (N, D)     float  L2-normalised features of the target frame on the grid (h, w), N = h*w
    first_feats  (N0, D)    float  frame 0, the long-term memory: every token is a candidate
    first_labels (N0, K)    float  frame 0's (soft) labels
    ctx_feats    (n, N, D)  float  the n short-term frames, on the query's grid (n may be 0)
    ctx_labels   (n, N, K)  float  their soft labels
    grid (h, w), topk >= 1, radius >= 0 (grid cells), temperature > 0
    -> labels    (N, K)     query's dtype

For query cell (qy, qx) the candidates are every frame-0 token and the context tokens (y, x) with
(y - qy)^2 + (x - qx)^2 < radius^2 (Euclidean disc on the feature grid, strict, as the official MaskedAttention).
logit = <query, key>; the k = min(topk, #candidates) largest logits are kept, weights = softmax(logit / temperature)
over those k, and the result is the weighted sum of the candidates' labels. This is exactly
`smtc_fast.evaluate.propagation.propagate_dense`; the official dense code also selects masked keys when a query
has fewer than k candidates, but their -1e10 logits get a zero weight, so "softmax over the valid candidates" is
the same result.

Tie rule at the k-th value: candidates are numbered frame-0 token i -> i, context frame j (in the given order),
token m -> N0 + j*N + m, and at equal logits the lower number wins. The reference (a stable descending sort) and
both kernels (a running top-k that visits candidates in increasing number and keeps the first seen) follow it,
so equal logits give identical results, not merely close ones.

The kernels (csrc/propagate/) never build the (N, (n+1) N) affinity or an HW x HW radius mask: frame 0 is a
blocked GEMM with a running top-k per query, the context frames are scanned only inside each query's disc.

No autograd: label propagation is an evaluation protocol; inputs that require grad are rejected (detach them).
Kernel dtypes: float32 on CPU and CUDA; other dtypes use the reference.
"""
import math

import torch

from smtc_fast.ops._common import NAMESPACES, check_dim, check_same, check_tensor, kernel_ops, use_kernel


def _check(query, first_feats, first_labels, ctx_feats, ctx_labels, grid, topk, radius, temperature):
    check_tensor("query", query, 2)
    check_tensor("first_feats", first_feats, 2)
    check_tensor("first_labels", first_labels, 2)
    check_tensor("ctx_feats", ctx_feats, 3)
    check_tensor("ctx_labels", ctx_labels, 3)
    for name, x in (("first_feats", first_feats), ("first_labels", first_labels), ("ctx_feats", ctx_feats),
                    ("ctx_labels", ctx_labels)):
        check_same("query", query, name, x)
    if len(grid) != 2 or int(grid[0]) < 0 or int(grid[1]) < 0 or int(grid[0]) * int(grid[1]) != query.shape[0]:
        raise ValueError(f"grid {tuple(grid)} must be (h, w) with h*w = N = {query.shape[0]} (the query's rows)")
    check_dim("first_feats", first_feats, 1, query.shape[1], "feature dim D of query")
    if first_feats.shape[0] < 1:
        raise ValueError(f"first_feats must have at least one token, got shape {tuple(first_feats.shape)}")
    check_dim("first_labels", first_labels, 0, first_feats.shape[0], "tokens N0 of first_feats")
    check_dim("ctx_feats", ctx_feats, 1, query.shape[0], "tokens N of query")
    check_dim("ctx_feats", ctx_feats, 2, query.shape[1], "feature dim D of query")
    check_dim("ctx_labels", ctx_labels, 0, ctx_feats.shape[0], "context frames n of ctx_feats")
    check_dim("ctx_labels", ctx_labels, 1, query.shape[0], "tokens N of query")
    check_dim("ctx_labels", ctx_labels, 2, first_labels.shape[1], "labels K of first_labels")
    if int(topk) < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be finite and >= 0, got {radius}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def _check_no_grad(*tensors):
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError("propagate_labels has no autograd (an evaluation protocol): detach the inputs or run "
                           "under torch.no_grad()")


def propagate_labels_reference(query, first_feats, first_labels, ctx_feats, ctx_labels, grid, topk, radius,
                               temperature, chunk=256):
    """Pure-PyTorch reference of `propagate_labels` (same signature and result): the dense affinity against all
    N0 + n*N candidates, in chunks of `chunk` queries, the radius as a -inf mask, top-k by a stable sort."""
    _check(query, first_feats, first_labels, ctx_feats, ctx_labels, grid, topk, radius, temperature)
    _check_no_grad(query, first_feats, first_labels, ctx_feats, ctx_labels)
    n_q, d = query.shape
    n0, n_lab = first_labels.shape
    n_ctx = ctx_feats.shape[0]
    h, w = int(grid[0]), int(grid[1])
    keys = torch.cat([first_feats, ctx_feats.reshape(-1, d)])  # (N0 + n*N, D), in candidate order
    labels = torch.cat([first_labels, ctx_labels.reshape(-1, n_lab)])  # (N0 + n*N, K)
    k = min(int(topk), keys.shape[0])
    ys = torch.arange(n_q, device=query.device) // max(w, 1)
    xs = torch.arange(n_q, device=query.device) % max(w, 1)
    out = query.new_empty(n_q, n_lab)
    for s in range(0, n_q, chunk):
        q = query[s:s + chunk]  # (c, D)
        logits = q @ keys.T  # (c, N0 + n*N)
        dist2 = (ys[s:s + chunk, None] - ys[None]) ** 2 + (xs[s:s + chunk, None] - xs[None]) ** 2  # (c, N) int
        inside = dist2.double() < float(radius) ** 2
        logits[:, n0:] = logits[:, n0:].masked_fill(~inside.repeat(1, n_ctx), float("-inf"))
        vals, idx = torch.sort(logits, dim=1, descending=True, stable=True)  # equal logits: lower index first
        vals, idx = vals[:, :k], idx[:, :k]  # (c, k); -inf = fewer candidates than k, zero weight below
        weights = torch.softmax(vals / temperature, dim=1)
        out[s:s + chunk] = torch.einsum("ck,ckl->cl", weights, labels[idx])
    return out


def propagate_labels(query, first_feats, first_labels, ctx_feats, ctx_labels, grid, topk, radius, temperature):
    """Propagated soft labels (N, K) of one target frame; see the module docstring for shapes and the rule.

    Example (one DAVIS frame at stride 16, SMTC preset): query (1590, 384), first_feats (1590, 384),
    first_labels (1590, K), ctx_feats (20, 1590, 384), ctx_labels (20, 1590, K), grid (30, 53), topk 7,
    radius 7, temperature 0.2. No autograd (raises if an input requires grad).
    """
    _check(query, first_feats, first_labels, ctx_feats, ctx_labels, grid, topk, radius, temperature)
    _check_no_grad(query, first_feats, first_labels, ctx_feats, ctx_labels)
    if use_kernel(query, dtypes=(torch.float32,)):
        return kernel_ops(query).propagate_labels(query, first_feats, first_labels, ctx_feats, ctx_labels,
                                                  [int(grid[0]), int(grid[1])], int(topk), float(radius),
                                                  float(temperature))
    return propagate_labels_reference(query, first_feats, first_labels, ctx_feats, ctx_labels, grid, topk, radius,
                                      temperature)


def _register(ns):
    @torch.library.register_fake(f"{ns}::propagate_labels")
    def _propagate_labels_fake(query, first_feats, first_labels, ctx_feats, ctx_labels, grid, topk, radius,
                               temperature):
        _check(query, first_feats, first_labels, ctx_feats, ctx_labels, grid, topk, radius, temperature)
        return query.new_empty((query.shape[0], first_labels.shape[1]))


for _ns in NAMESPACES:
    _register(_ns)
