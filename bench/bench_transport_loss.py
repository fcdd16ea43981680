"""L_sem forward+backward: the fused transport_loss op against today's unfused path, side by side in one run.

    python bench/bench_transport_loss.py [--json bench_out/bench_transport_loss.json] [--repeats 5]
                                         [--clips-1024 8] [--threads N]

Shapes: SMTC's training step (spec §2.1; performance_anchors.md §0): B = 32 clips x T = 4 frames, n = 256 tokens
(ViT-S/16 at 256^2), D = 384, S = 16, eps 0.05, 3 iterations, norm marginals; and n = 1024 tokens (ResNet-50
stride 8 at 256^2, paper Table 4). The unfused path at n = 1024 writes (B*12, 1024, 1024) costs, plans and cross
matrices (1.6 GB each at B = 32), so on a shared machine it runs at --clips-1024 clips (default 8); its memory
grows linearly in B (every large tensor has B*12 rows), the fused op's does not (chunks of clips).

"unfused" is transport_loss_reference = the path semantic_loss took before the op (correlation + sinkhorn ops,
gathers, (B*12, n, n) temporaries); "fused" is smtc_fast.ops.transport_loss. Time: one subprocess per shape that
alternates the two impls' steps (on a shared machine the noise then hits both alike; the ratio is the median
of the per-round ratios), with freed memory kept mapped as `smtc train` runs on the CPU (smtc_fast/cpu_memory.py;
--no-keep-cpu-memory times with glibc's defaults, where the unfused path's 100 MB temporaries are page-faulted in
again at every step, which more than doubled its time here). Memory: a fresh subprocess per impl, the peak RSS of
one step above what was resident before it (bench_ops.py's measure: /proc/self/clear_refs, then VmHWM). Same inputs
and threads for both.

Keys: float32 (`smtc train --no-amp`), and bf16 as a bf16 forward gives them (`--amp`, the default on a CPU with
native bf16). With bf16 keys both impls compute on the same float32 values (the unfused path widens them first;
the fused CPU kernel multiplies them on AMX with float32 accumulation, which is exact per product), so the loss
and its gradient agree to float32 rounding either way.
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

def make_inputs(B, n, requires_grad, keys="float32"):
    """keys "bfloat16": the keys as a bf16 forward (--amp) gives them; both impls compute on their float32 values"""
    import torch

    T, S, D = 4, 16, 384
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, S, n, generator=g).requires_grad_(requires_grad)
    t = torch.randn(B, T, S, n, generator=g)
    k = torch.randn(B, T, n, D, generator=g).to(getattr(torch, keys))
    return s, t, k, f"B={B},T={T},S={S},n={n},D={D},keys={keys}"


def make_step(impl, pass_, s, t, k):
    from smtc_fast.ops import transport_loss, transport_loss_reference

    fn = {"fused": transport_loss, "unfused": transport_loss_reference}[impl]

    def step():
        loss = fn(s, t, k)
        if pass_ == "fwdbwd":
            loss.backward()
            s.grad = None
        return loss

    return step


def child_memory(impl, B, n, pass_, threads, keys):
    """Peak RSS of one step above what was resident before it, in this fresh process."""
    import torch

    import smtc_fast

    if threads:
        torch.set_num_threads(threads)
    s, t, k, shape = make_inputs(B, n, pass_ == "fwdbwd", keys)
    step = make_step(impl, pass_, s, t, k)
    value = step().item()  # warm-up
    smtc_fast.release_cpu_cache()  # the kernels' kept output blocks count in the peak below
    base = reset_peak_rss()
    step()
    return {"impl": impl, "B": B, "n": n, "pass": pass_, "keys": keys, "shape": shape,
            "peak_mb": round((peak_rss() - base) / 2**20, 1), "loss": value}


def child_time(B, n, pass_, repeats, threads, keep_memory=True, keys="float32"):
    """Both impls' steps alternated in this one process, so that the machine's noise hits both alike; returns
    each impl's median and min wall time and the median of the per-round ratios unfused / fused."""
    import torch

    import smtc_fast

    assert smtc_fast.build_info()["extension"], "the fused rows need the built extension"
    if keep_memory:  # as smtc train on the CPU: freed blocks stay mapped, no per-step page faults on either side
        from smtc_fast.cpu_memory import keep_freed_memory

        keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    s, t, k, shape = make_inputs(B, n, pass_ == "fwdbwd", keys)
    steps = {impl: make_step(impl, pass_, s, t, k) for impl in ("fused", "unfused")}
    # The floor: the keys' dot products of every unordered frame pair, one GEMM in the keys' dtype (torch.bmm:
    # MKL in float32, oneDNN on AMX in bf16), the work neither implementation can skip (T(T-1)/2 pairs x n x n x D
    # multiply-adds; the rest is O(n^2) per pair)
    T = k.shape[1]
    pairs = [(i, j) for i in range(T) for j in range(i + 1, T)]
    ki = k[:, [i for i, _ in pairs]].flatten(0, 1).contiguous()
    kj = k[:, [j for _, j in pairs]].flatten(0, 1).transpose(1, 2).contiguous()
    steps["gemm_floor"] = lambda: torch.bmm(ki, kj)
    for step in steps.values():
        step()  # warm-up
    times = {impl: [] for impl in steps}
    for _ in range(repeats):
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[impl].append((time.perf_counter() - t0) * 1e3)
    ratios = [u / f for u, f in zip(times["unfused"], times["fused"])]
    return {"B": B, "n": n, "pass": pass_, "keys": keys, "shape": shape, "threads": torch.get_num_threads(),
            "fused_median_ms": statistics.median(times["fused"]), "fused_min_ms": min(times["fused"]),
            "unfused_median_ms": statistics.median(times["unfused"]), "unfused_min_ms": min(times["unfused"]),
            "ratio_median": statistics.median(ratios), "rounds": repeats,
            "gemm_floor_median_ms": statistics.median(times["gemm_floor"]),
            "gemm_gflop": 2 * k.shape[0] * len(pairs) * k.shape[2] ** 2 * k.shape[3] / 1e9}


def run_child(args_list):
    cmd = [sys.executable, os.path.abspath(__file__)] + args_list
    env = dict(os.environ)
    env.pop("SMTC_FAST_FORCE_REFERENCE", None)
    if "--_memory" in args_list:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "1048576")  # as bench_ops.py: each step's peak is its own
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(f"  FAILED {args_list}: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(line[0][7:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument("--repeats", type=int, default=7, help="alternating rounds of the timing")
    parser.add_argument("--clips-1024", type=int, default=8, help="clips for the unfused path at n = 1024")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--keep-cpu-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="time with freed memory kept mapped, as `smtc train` runs on the CPU (smtc_fast/"
                             "cpu_memory.py); --no-keep-cpu-memory: glibc's defaults, where the unfused path's "
                             "100 MB temporaries are page-faulted in at every step")
    parser.add_argument("--_time", nargs=4, metavar=("B", "N", "PASS", "KEYS"), help=argparse.SUPPRESS)
    parser.add_argument("--_memory", nargs=5, metavar=("IMPL", "B", "N", "PASS", "KEYS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._time:
        B, n, pass_, keys = args._time
        print("RESULT " + json.dumps(child_time(int(B), int(n), pass_, args.repeats, args.threads,
                                                args.keep_cpu_memory, keys)))
        return
    if args._memory:
        impl, B, n, pass_, keys = args._memory
        print("RESULT " + json.dumps(child_memory(impl, int(B), int(n), pass_, args.threads, keys)))
        return
    common = ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    if not args.keep_cpu_memory:
        common.append("--no-keep-cpu-memory")
    shapes = [(32, 256), (args.clips_1024, 1024)]
    records = []
    print(f"{'keys':8s} {'B':>3s} {'n':>5s} {'pass':7s} | {'fused ms (median/min)':>22s} | "
          f"{'unfused ms (median/min)':>24s} | {'ratio':>6s} | {'peak MB fused':>13s} {'unfused':>8s} {'ratio':>6s}")
    # float32 keys (--no-amp), and bf16 keys as a bf16 forward gives them (--amp, the default where the CPU has
    # native bf16): the same float32 values to both impls; the fused CPU kernel multiplies them on AMX
    runs = [("float32", "fwdbwd"), ("float32", "fwd"), ("bfloat16", "fwdbwd")]
    for keys, pass_ in runs:
        for B, n in shapes:
            tr = run_child(common + ["--_time", str(B), str(n), pass_, keys])
            mf = run_child(common + ["--_memory", "fused", str(B), str(n), pass_, keys])
            mu = run_child(common + ["--_memory", "unfused", str(B), str(n), pass_, keys])
            if not (tr and mf and mu):
                continue
            rec = dict(tr, fused_peak_mb=mf["peak_mb"], unfused_peak_mb=mu["peak_mb"], fused_loss=mf["loss"],
                       unfused_loss=mu["loss"])
            records.append(rec)
            print(f"{keys:8s} {B:3d} {n:5d} {pass_:7s} | {tr['fused_median_ms']:10.1f} / {tr['fused_min_ms']:9.1f} | "
                  f"{tr['unfused_median_ms']:11.1f} / {tr['unfused_min_ms']:10.1f} | {tr['ratio_median']:5.1f}x | "
                  f"{mf['peak_mb']:13.1f} {mu['peak_mb']:8.1f} {mu['peak_mb'] / max(mf['peak_mb'], 0.1):5.0f}x",
                  flush=True)
    # The fused op alone at the full batch and 1024 tokens: its memory does not grow with B.
    mf = run_child(common + ["--_memory", "fused", "32", "1024", "fwdbwd", "float32"])
    if mf:
        records.append(dict(mf, op="transport_loss"))
        print(f"\nfused alone, B=32 n=1024 fwdbwd: peak {mf['peak_mb']:.1f} MB above the inputs "
              f"(the unfused path's tensors are 1.6 GB each at this shape)")
    print("ratio = median over rounds of unfused / fused step time, the two alternated in one process")
    for rec in records:
        if "gemm_floor_median_ms" in rec and rec["pass"] == "fwdbwd":
            floor = rec["gemm_floor_median_ms"]
            print(f"keys {rec['keys']}, B={rec['B']} n={rec['n']}: the keys' dot products alone (one {rec['keys']} "
                  f"bmm, {rec['gemm_gflop']:.1f} "
                  f"GFLOP) take {floor:.1f} ms: fused = {rec['fused_median_ms'] / floor:.2f}x that floor; the unfused "
                  f"path can be at most {rec['unfused_median_ms'] / floor:.1f}x slower than an op at the floor")
    if args.json:
        write_json(args.json, records, environment("cpu"))


if __name__ == "__main__":
    main()
