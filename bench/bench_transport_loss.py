"""L_sem forward+backward: the fused transport_loss op against today's unfused path, side by side in one run.

    python bench/bench_transport_loss.py [--json bench_out/bench_transport_loss.json] [--repeats 5]
                                         [--clips-1024 8] [--threads N]

Shapes: SMTC's training step (spec §2.1; performance_anchors.md §0): B = 32 clips x T = 4 frames, n = 256 tokens
(ViT-S/16 at 256^2), D = 384, S = 16, eps 0.05, 3 iterations, norm marginals; and n = 1024 tokens (ResNet-50
stride 8 at 256^2, paper Table 4). The unfused path at n = 1024 writes (B*12, 1024, 1024) costs, plans and cross
matrices (1.6 GB each at B = 32), so on a shared machine it runs at --clips-1024 clips (default 8); its memory
grows linearly in B (every large tensor has B*12 rows), the fused op's does not (chunks of clips).

"unfused" is transport_loss_reference = the path semantic_loss took before the op (correlation + sinkhorn ops,
gathers, (B*12, n, n) temporaries); "fused" is smtc_fast.ops.transport_loss. Every row runs in a fresh
subprocess: the median wall time of fwd+bwd steps, and the peak RSS above what was resident before the step
(bench_ops.py's measure: /proc/self/clear_refs, then VmHWM). Both impls see the same inputs and threads.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's smtc_fast (and its built extension), not another install
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_ops import environment, peak_rss, reset_peak_rss, write_json  # noqa: E402

MIN_SECONDS = 2.0


def run_one(impl, B, n, pass_, repeats, threads):
    import torch

    import smtc_fast
    from smtc_fast.ops import transport_loss, transport_loss_reference

    if threads:
        torch.set_num_threads(threads)
    T, S, D = 4, 16, 384
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, S, n, generator=g).requires_grad_(pass_ == "fwdbwd")
    t = torch.randn(B, T, S, n, generator=g)
    k = torch.randn(B, T, n, D, generator=g)
    fn = {"fused": transport_loss, "unfused": transport_loss_reference}[impl]
    if impl == "fused":
        assert smtc_fast.build_info()["extension"], "the fused row needs the built extension"

    def step():
        loss = fn(s, t, k)
        if pass_ == "fwdbwd":
            loss.backward()
            s.grad = None
        return loss

    value = step().item()  # warm-up
    smtc_fast.release_cpu_cache()  # the kernels' kept output blocks count in the peak below
    base = reset_peak_rss()
    step()
    peak_mb = (peak_rss() - base) / 2**20
    times = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < MIN_SECONDS:
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"op": "transport_loss", "impl": impl, "pass": pass_, "shape": f"B={B},T={T},S={S},n={n},D={D}",
            "B": B, "n": n, "median_ms": statistics.median(times), "min_ms": min(times), "samples": len(times),
            "peak_mb": round(peak_mb, 1), "loss": value, "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clips-1024", type=int, default=8, help="clips for the unfused path at n = 1024")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--_child", nargs=4, metavar=("IMPL", "B", "N", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        impl, B, n, pass_ = args._child
        print("RESULT " + json.dumps(run_one(impl, int(B), int(n), pass_, args.repeats, args.threads)))
        return
    b1024 = args.clips_1024
    plan = [("unfused", 32, 256), ("fused", 32, 256), ("unfused", b1024, 1024), ("fused", b1024, 1024),
            ("fused", 32, 1024)]
    records = []
    print(f"{'impl':8s} {'B':>3s} {'n':>5s} {'pass':7s} {'median ms':>10s} {'min ms':>8s} {'peak MB':>9s}  loss")
    for pass_ in ("fwdbwd", "fwd"):
        for impl, B, n in plan:
            cmd = [sys.executable, os.path.abspath(__file__), "--repeats", str(args.repeats), "--threads",
                   str(args.threads), "--_child", impl, str(B), str(n), pass_]
            env = dict(os.environ)
            env.pop("SMTC_FAST_FORCE_REFERENCE", None)
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "1048576")  # as bench_ops.py: each step's peak is its own
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{impl:8s} {B:3d} {n:5d} {pass_:7s} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            rec = json.loads(line[0][7:])
            records.append(rec)
            print(f"{impl:8s} {B:3d} {n:5d} {pass_:7s} {rec['median_ms']:10.1f} {rec['min_ms']:8.1f} "
                  f"{rec['peak_mb']:9.1f}  {rec['loss']:.6f}", flush=True)
    print("\nratios (unfused / fused, same run, same B and n):")
    by = {(r["impl"], r["B"], r["n"], r["pass"]): r for r in records}
    for (impl, B, n, pass_), r in sorted(by.items()):
        f = by.get(("fused", B, n, pass_))
        if impl == "unfused" and f:
            print(f"  B={B:2d} n={n:4d} {pass_:7s} time {r['median_ms'] / f['median_ms']:6.1f}x (min {r['min_ms'] / f['min_ms']:.1f}x)"
                  f"   peak memory {r['peak_mb']:.0f} MB vs {f['peak_mb']:.0f} MB = "
                  f"{r['peak_mb'] / max(f['peak_mb'], 0.1):.0f}x lower")
    if args.json:
        write_json(args.json, records, environment("cpu"))


if __name__ == "__main__":
    main()
