"""`smtc demo`: until the full demo lands (issue 6), a short end-to-end showcase of the ops.

It builds SMTC's per-step workload on random unit features (the rolled-frame correlation, both slot-attention
stages, and the transport plans of every ordered frame pair), checks every kernel against its PyTorch reference
and prints the time of each, so a fresh install shows at once whether the kernels are built and right.
"""
import time

import torch
import torch.nn.functional as F


def add_arguments(parser):
    parser.add_argument("--clips", type=int, default=8, help="clips of T=4 frames (official: 32 per GPU)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per frame (256 = 16x16 at 256^2, spec §1.2)")
    parser.add_argument("--seed", type=int, default=0)


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t0) * 1e3


def run(args):
    import smtc_fast
    from smtc_fast import ops

    info = smtc_fast.build_info()
    print(f"smtc_fast {smtc_fast.__version__}: CPU kernels {info['cpu_kernels']}, CUDA kernels {info['cuda_kernels']}"
          + (f" ({info['why_no_cuda']})" if info["why_no_cuda"] else ""))
    torch.manual_seed(args.seed)
    B, T, N, D, S, P = args.clips, 4, args.tokens, 384, 16, 4
    keys = F.normalize(torch.randn(B, T, N, D), dim=-1)
    prev = keys.roll(1, dims=1)  # the previous frame, cyclically (spec §1.2)
    i, j = zip(*[(a, b) for a in range(T) for b in range(T) if a != b])  # T(T-1) ordered pairs (spec §2.1)
    fi, fj = keys[:, list(i)].flatten(0, 1), keys[:, list(j)].flatten(0, 1)
    mu = torch.log_softmax(fi.abs().sum(-1).log(), -1)
    nu = torch.log_softmax(fj.abs().sum(-1).log(), -1)
    dots = torch.randn(B * T, S, N)
    inst = torch.randn(B * T, S, P, N)
    v = torch.randn(B * T, N, D)
    rows = [
        ("correlation (B*T frames)", ops.correlation, ops.correlation_reference, (keys.flatten(0, 1), prev.flatten(0, 1))),
        ("slot_aggregate stage 1", ops.slot_aggregate, ops.slot_aggregate_reference, (dots, v)),
        ("slot_aggregate stage 2", ops.slot_aggregate, ops.slot_aggregate_reference, (inst, v, dots > 0.3)),
        ("sinkhorn (all frame pairs)", lambda c, m, n: ops.sinkhorn(c, m, n), lambda c, m, n: ops.sinkhorn_reference(c, m, n),
         (1 - ops.correlation(fi, fj), mu, nu)),
    ]
    print(f"{'op':28s} {'kernel ms':>10s} {'reference ms':>13s} {'max |diff|':>11s}")
    for name, fn, ref, inputs in rows:
        out, tk = _timed(fn, *inputs)
        expected, tr = _timed(ref, *inputs)
        out = out[0] if isinstance(out, tuple) else out
        expected = expected[0] if isinstance(expected, tuple) else expected
        diff = (out - expected).abs().max().item()
        print(f"{name:28s} {tk:10.1f} {tr:13.1f} {diff:11.2e}")
    print("The full demo (training, label propagation, discovery and a report) is the subject of issue 6.")
