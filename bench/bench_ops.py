"""Time the three ops' kernels against their PyTorch references (and peers) at SMTC's training shapes.

    python bench/bench_ops.py [--json bench_out/bench_ops.json] [--device cpu|cuda] [--quick]

Shapes (performance_anchors.md §0): 128 frames (32 clips x 4), N = M = 256 tokens, D = 384, S = 16, P = 4;
Sinkhorn on 384 problems of 256 x 256 (32 clips x 12 ordered frame pairs), eps 0.05, 3 iterations.
Every (op, impl, pass) runs in a fresh subprocess so that its peak memory (CPU: the RSS high-water mark
above the resident set before the call, reset through /proc/self/clear_refs; GPU: max_memory_allocated above
the inputs) is its own; all rows of one run are measured side
by side on the same machine, so compare them as ratios. Writes a JSON list of records
{"op", "impl", "pass", "shape", "median_ms", "peak_mb", "environment"} (the environment header: CPU/GPU,
torch, threads, commit).
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shapes(quick):
    if quick:
        return dict(frames=16, pairs=48, N=256, D=384, S=16, P=4)
    return dict(frames=128, pairs=384, N=256, D=384, S=16, P=4)


def make_case(op, impl, quick, device):
    """Returns (fn(requires_grad_inputs) -> output tensor(s), inputs, shape string)."""
    import torch
    import torch.nn.functional as F

    from smtc_fast import ops

    s = shapes(quick)
    g = torch.Generator().manual_seed(0)
    if op == "correlation":
        a = torch.randn(s["pairs"], s["N"], s["D"], generator=g).to(device)
        b = torch.randn(s["pairs"], s["N"], s["D"], generator=g).to(device)
        fn = {"kernel": ops.correlation, "reference": ops.correlation_reference}.get(impl)
        if impl == "compiled_reference":
            fn = torch.compile(ops.correlation_reference, dynamic=False)
        return fn, (a, b), f"a=b=({s['pairs']},{s['N']},{s['D']})"
    if op == "slot_aggregate":
        B, S, P, N, D = s["frames"], s["S"], s["P"], s["N"], s["D"]
        l1 = torch.randn(B, S, N, generator=g).to(device)
        l2 = torch.randn(B, S, P, N, generator=g).to(device)
        v = torch.randn(B, N, D, generator=g).to(device)
        if impl == "kernel_bf16_values":  # v as `--amp` gives it: bf16 values, float32 logits
            v = v.bfloat16()
        mask = (l1 > 0.3).float()
        agg = {"kernel": ops.slot_aggregate, "kernel_bf16_values": ops.slot_aggregate,
               "reference": ops.slot_aggregate_reference}.get(impl)
        if impl == "compiled_reference":
            agg = torch.compile(ops.slot_aggregate_reference, dynamic=False)

        def three_iterations(l1, l2, v):  # both stages, 3 iterations' worth (spec §1.3)
            outs = []
            for _ in range(3):
                outs.append(agg(l1, v)[0])
            for _ in range(3):
                outs.append(agg(l2, v, mask)[0])
            return outs

        return three_iterations, (l1, l2, v), f"B={B},S={S},P={P},N={N},D={D},3+3 iters"
    if op == "sinkhorn":
        B, N, D = s["pairs"], s["N"], 64
        fi = F.normalize(torch.randn(B, N, D, generator=g), dim=-1)
        fj = F.normalize(torch.randn(B, N, D, generator=g), dim=-1)
        cost = (1 - fi @ fj.transpose(1, 2)).contiguous().to(device)
        lmu = torch.log_softmax(torch.randn(B, N, generator=g), -1).to(device)
        lnu = torch.log_softmax(torch.randn(B, N, generator=g), -1).to(device)
        if impl == "pot":
            import ot

            def pot(cost, lmu, lnu):
                res = ot.batch.solve_batch(cost, 0.05, a=lmu.exp(), b=lnu.exp(), method="log_sinkhorn",
                                           max_iter=3, tol=0.0)
                return res.plan

            return pot, (cost, lmu, lnu), f"({B},{N},{N}),eps=0.05,iters=3"
        fn = {"kernel": ops.sinkhorn, "reference": ops.sinkhorn_reference}.get(impl)
        if impl == "compiled_reference":
            fn = torch.compile(ops.sinkhorn_reference, dynamic=False)
        return (lambda c, m, n: fn(c, m, n, eps=0.05, iters=3)), (cost, lmu, lnu), f"({B},{N},{N}),eps=0.05,iters=3"
    raise ValueError(op)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak_rss():
    """Resets the process's RSS high-water mark (Linux: clear_refs 5) and returns the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") * 1024
    except OSError:  # not Linux: fall back to the lifetime peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss():
    try:
        return _status_kb("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


MIN_SECONDS = 1.0

# An H100 SXM's limits, for the roofline lines (the CUDA kernels' .cu headers derive the same numbers).
H100 = dict(name="H100 SXM", bytes_per_s=3.35e12, fp32_flops=67e12, exps_per_s=16 * 132 * 1.755e9)


def roofline(op, quick):
    """Forward-pass floor of the kernel path at the bench's shape: (bytes moved, FLOPs, exps), float32."""
    s = shapes(quick)
    N, D = s["N"], s["D"]
    if op == "correlation":
        P = s["pairs"]
        return 4 * (2 * P * N * D + P * N * N), 2 * P * N * N * D, 0
    if op == "slot_aggregate":
        B, S, P = s["frames"], s["S"], s["P"]
        stage1 = 4 * (2 * B * S * N) + 4 * (B * S * N + B * N * D + B * S * D)             # attention + GEMM
        stage2 = 4 * (2 * B * S * P * N + B * S * N) + 4 * (B * S * P * N + B * N * D + B * S * P * D)
        flops = 3 * 2 * B * S * N * D + 3 * 2 * B * S * P * N * D
        exps = 3 * 4 * B * S * N + 3 * 4 * B * S * P * N
        return 3 * stage1 + 3 * stage2, flops, exps
    if op == "sinkhorn":
        B = s["pairs"]
        return 4 * 2 * B * N * N, 0, 7 * B * N * N  # cost read + plan written; 7 exps per entry (3 iterations)
    raise ValueError(op)


def roofline_lines(records, device, quick):
    """One line per op: bytes, FLOPs, exps, the bound and its time on an H100; on a GPU also the measured
    kernel time as a fraction of that floor."""
    lines = [f"\nroofline, forward, float32 ({H100['name']}: {H100['bytes_per_s'] / 1e12:.2f} TB/s, "
             f"{H100['fp32_flops'] / 1e12:.0f} TFLOP/s FP32, {H100['exps_per_s'] / 1e12:.1f} T exp/s):"]
    for op in ("correlation", "slot_aggregate", "sinkhorn"):
        nbytes, flops, exps = roofline(op, quick)
        t = {"memory": nbytes / H100["bytes_per_s"], "FP32": flops / H100["fp32_flops"],
             "SFU": exps / H100["exps_per_s"]}
        bound = max(t, key=t.get)
        line = (f"  {op:16s} {nbytes / 1e6:8.1f} MB {flops / 1e9:7.2f} GFLOP {exps / 1e6:7.1f} M exp"
                f"  -> {bound} bound, {t[bound] * 1e6:7.1f} us")
        k = next((r for r in records if r["op"] == op and r["impl"] == "kernel" and r["pass"] == "fwd"), None)
        if device == "cuda" and k:
            line += f"; measured {k['median_ms'] * 1e3:.1f} us = {t[bound] * 1e3 / k['median_ms']:.0%} of the floor"
        lines.append(line)
    return lines


def run_one(op, impl, pass_, quick, device, repeats):
    """Measured in this (fresh) process: median time and peak memory above the inputs."""
    import torch

    import smtc_fast

    if impl == "reference":
        os.environ["SMTC_FAST_FORCE_REFERENCE"] = "1"
    fn, inputs, shape = make_case(op, impl, quick, device)
    grad_idx = {"correlation": (0, 1), "slot_aggregate": (0, 1, 2), "sinkhorn": (0,)}[op]
    inputs = [x.requires_grad_(pass_ == "fwdbwd" and i in grad_idx) for i, x in enumerate(inputs)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    # The cotangents are inputs of the backward, made once outside the timed step like the forward's inputs: on
    # this class of VM a fresh 50 MB of ones costs ~15 ms of page faults, which would be timed for every impl.
    cotangents = None

    def step():
        nonlocal cotangents
        out = fn(*inputs)
        outs = out if isinstance(out, (list, tuple)) else [out]
        if pass_ == "fwdbwd":
            if cotangents is None:
                cotangents = [torch.ones_like(o) for o in outs]
            torch.autograd.backward(list(outs), cotangents)
            for x in inputs:
                x.grad = None
        sync()

    step()  # warm-up (compilation, thread pools, first-touch)
    # The kernels keep their freed large CPU outputs for reuse (csrc/common/alloc.h). Empty that cache before the
    # memory measurement, so that the step's peak counts every block the kernels map, kept ones included.
    smtc_fast.release_cpu_cache()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    step()  # the peak-memory measurement: the high-water mark above what was resident before
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (peak_rss() - base) / 2**20
    # At least `repeats` steps and at least MIN_SECONDS of them: a 15 ms kernel gets ~70 samples, so that a burst
    # of noise from the VM's neighbours moves its median less; a one-second reference keeps `repeats`.
    times = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < MIN_SECONDS:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"op": op, "impl": impl, "pass": pass_, "shape": shape, "median_ms": statistics.median(times),
            "samples": len(times), "peak_mb": round(peak_mb, 1), "device": device}


def environment(device):
    import torch

    import smtc_fast

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception:
        commit = None
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except Exception:
        pass
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu, "commit": commit,
           "device": device, "python": platform.python_version(), "build_info": smtc_fast.build_info(),
           "cpu_cache_mb": smtc_fast.cpu_cache_info()["limit_bytes"] >> 20}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


PLAN = [  # (op, impl, passes)
    ("correlation", "kernel", ("fwd", "fwdbwd")),
    ("correlation", "reference", ("fwd", "fwdbwd")),
    ("slot_aggregate", "kernel", ("fwd", "fwdbwd")),
    ("slot_aggregate", "kernel_bf16_values", ("fwd", "fwdbwd")),
    ("slot_aggregate", "reference", ("fwd", "fwdbwd")),
    ("slot_aggregate", "compiled_reference", ("fwd", "fwdbwd")),
    ("sinkhorn", "kernel", ("fwd", "fwdbwd")),
    ("sinkhorn", "reference", ("fwd", "fwdbwd")),
    ("sinkhorn", "compiled_reference", ("fwd",)),
    ("sinkhorn", "pot", ("fwd",)),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="an eighth of the training batch (a smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default=None, help="comma-separated ops to run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd references")
    parser.add_argument("--_child", nargs=3, metavar=("OP", "IMPL", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        rec = run_one(*args._child, args.quick, args.device, args.repeats)
        print("RESULT " + json.dumps(rec))
        return
    records = []
    print(f"{'op':16s} {'impl':20s} {'pass':7s} {'median ms':>10s} {'peak MB':>9s}")
    for op, impl, passes in PLAN:
        if args.only and op not in args.only.split(","):
            continue
        if impl == "compiled_reference" and args.no_compile:
            continue
        if impl == "pot":
            try:
                import ot  # noqa: F401
            except ImportError:
                print(f"{op:16s} {impl:20s} skipped (pip install pot to compare)")
                continue
        for pass_ in passes:
            cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--repeats",
                   str(args.repeats), "--_child", op, impl, pass_] + (["--quick"] if args.quick else [])
            env = dict(os.environ)
            env.pop("SMTC_FAST_FORCE_REFERENCE", None)
            # A fixed mmap threshold: freed large blocks go back to the OS, so each call's peak RSS is its own
            # (glibc's default raises the threshold after the first free and keeps such blocks resident).
            env.setdefault("MALLOC_MMAP_THRESHOLD_", "1048576")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{op:16s} {impl:20s} {pass_:7s} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            rec = json.loads(line[0][7:])
            records.append(rec)
            print(f"{op:16s} {impl:20s} {pass_:7s} {rec['median_ms']:10.1f} {rec['peak_mb']:9.1f}", flush=True)
    print("\nratios (reference or peer time / kernel time, same run):")
    by = {(r["op"], r["impl"], r["pass"]): r for r in records}
    for (op, impl, pass_), r in sorted(by.items()):
        k = by.get((op, "kernel", pass_))
        if impl != "kernel" and k:
            print(f"  {op:16s} {pass_:7s} {impl:20s} {r['median_ms'] / k['median_ms']:7.1f}x"
                  f"   peak memory {r['peak_mb']:.0f} MB vs kernel {k['peak_mb']:.0f} MB")
    for line in roofline_lines(records, args.device, args.quick):
        print(line)
    if args.json:
        write_json(args.json, records, environment(args.device))


def write_json(path, records, env):
    """A JSON list of records, each carrying the environment header (machine, torch, threads, commit)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    header = {k: v for k, v in env.items() if k != "build_info"}
    header["cuda_kernels"] = env["build_info"]["cuda_kernels"]
    with open(path, "w") as f:
        json.dump([dict(r, environment=header) for r in records], f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
