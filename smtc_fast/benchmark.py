"""`smtc bench`: time every kernel against its PyTorch reference on SMTC's per-step workload, in this process.

A quick check that a fresh install has its kernels built and right: it builds one training step's worth of inputs
on random unit features (the previous-frame correlation, both slot-attention stages, the transport plans of every
ordered frame pair, spec §1.2-§2.1) and one label-propagation step (evaluation_protocols.md §2.3), runs each op
and its reference side by side (median of --repeat runs after a warm-up) and prints the ratio and the largest
difference. The careful, per-process measurements with peak memory are the scripts in bench/ (README, Benchmarks).
"""
import json
import statistics
import time

from smtc_fast._lazy import lazy, resolve_device

torch = lazy("torch")  # imported when a function runs: `smtc bench --help` stays fast (smtc_fast/_lazy.py)
F = lazy("torch.nn.functional")


def add_arguments(parser):
    parser.add_argument("--clips", type=int, default=8, help="clips of T=4 frames (official: 32 per GPU)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per frame (256 = 16x16 at 256^2, spec §1.2)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per op (the median is reported)")
    parser.add_argument("--device", default="auto", type=resolve_device,
                        help="device: auto = cuda when available, else cpu")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--seed", type=int, default=0)


def _median_ms(fn, args, repeat, device):
    def once():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, (time.perf_counter() - t0) * 1e3

    out, _ = once()  # warm-up (first-call allocation, lazy initialisation)
    return out, statistics.median(once()[1] for _ in range(max(1, repeat)))


def workload(clips, tokens, device, seed=0):
    """[(name, kernel fn, reference fn, inputs)] for one SMTC training step and one propagation step."""
    from smtc_fast import ops

    g = torch.Generator().manual_seed(seed)
    B, T, N, D, S, P = clips, 4, tokens, 384, 16, 4
    keys = F.normalize(torch.randn(B, T, N, D, generator=g), dim=-1)
    prev = keys.roll(1, dims=1)  # the previous frame, cyclically (spec §1.2)
    i, j = zip(*[(a, b) for a in range(T) for b in range(T) if a != b])  # T(T-1) ordered pairs (spec §2.1)
    fi, fj = keys[:, list(i)].flatten(0, 1), keys[:, list(j)].flatten(0, 1)
    mu = torch.log_softmax(fi.abs().sum(-1).log(), -1)
    nu = torch.log_softmax(fj.abs().sum(-1).log(), -1)
    dots = torch.randn(B * T, S, N, generator=g)
    inst = torch.randn(B * T, S, P, N, generator=g)
    v = torch.randn(B * T, N, D, generator=g)
    gh, gw = 30, 53  # DAVIS 480x854 at stride 16 (evaluation_protocols.md §2.5)
    q = F.normalize(torch.randn(gh * gw, D, generator=g), dim=-1)
    f0 = F.normalize(torch.randn(gh * gw, D, generator=g), dim=-1)
    ctx = F.normalize(torch.randn(20, gh * gw, D, generator=g), dim=-1)
    l0 = torch.rand(gh * gw, 5, generator=g)
    lc = torch.rand(20, gh * gw, 5, generator=g)
    rows = [
        ("correlation", ops.correlation, ops.correlation_reference,
         (keys.flatten(0, 1), prev.flatten(0, 1))),
        ("slot_aggregate stage 1", ops.slot_aggregate, ops.slot_aggregate_reference, (dots, v)),
        ("slot_aggregate stage 2", ops.slot_aggregate, ops.slot_aggregate_reference, (inst, v, dots > 0.3)),
        ("sinkhorn (all frame pairs)", lambda c, m, n: ops.sinkhorn(c, m, n),
         lambda c, m, n: ops.sinkhorn_reference(c, m, n), (1 - ops.correlation(fi, fj), mu, nu)),
        ("propagate_labels (1 frame)", lambda *a: ops.propagate_labels(*a, (gh, gw), 7, 7.0, 0.2),
         lambda *a: ops.propagate_labels_reference(*a, (gh, gw), 7, 7.0, 0.2), (q, f0, l0, ctx, lc)),
    ]
    return [(name, fn, ref, tuple(x.to(device) for x in inputs)) for name, fn, ref, inputs in rows]


def run(args):
    import smtc_fast

    device = torch.device(args.device)
    info = smtc_fast.build_info()
    print(f"smtc_fast {smtc_fast.__version__}: CPU kernels {info['cpu_kernels']}, CUDA kernels {info['cuda_kernels']}"
          + (f" ({info['why_no_cuda']})" if info["why_no_cuda"] else "")
          + f"; device {device}, {torch.get_num_threads()} threads")
    print(f"{'op':28s} {'kernel ms':>10s} {'reference ms':>13s} {'speed-up':>9s} {'max |diff|':>11s}")
    records = []
    for name, fn, ref, inputs in workload(args.clips, args.tokens, device, args.seed):
        with torch.no_grad():
            out, tk = _median_ms(fn, inputs, args.repeat, device)
            expected, tr = _median_ms(ref, inputs, args.repeat, device)
        out = out[0] if isinstance(out, tuple) else out
        expected = expected[0] if isinstance(expected, tuple) else expected
        diff = (out - expected).abs().max().item()
        print(f"{name:28s} {tk:10.1f} {tr:13.1f} {tr / tk:8.1f}x {diff:11.2e}")
        records.append({"op": name, "kernel_ms": tk, "reference_ms": tr, "speedup": tr / tk, "max_abs_diff": diff,
                        "device": str(device), "threads": torch.get_num_threads()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.json}")
    return 0
