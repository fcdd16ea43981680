"""Fused label propagation (smtc_fast.ops.propagate_labels) vs the evaluator's chunked dense step
(smtc_fast.evaluate.propagation.propagate_dense), measured side by side.

    python bench/bench_propagation.py --json bench_out/bench_propagation.json
    python bench/bench_propagation.py --quick --json ...      # stride 16 only, 20-frame video

Scenarios (performance_anchors.md §5.2, §7): one DAVIS-sized target frame (480x854 -> 30x53 at stride 16,
60x107 at stride 8; D = 384; 20 context frames + frame 0; top-k 7 radius 7 at stride 16, top-k 28 radius 35 at
stride 8; temperature 0.2) and a synthetic 80-frame video at stride 16 through propagate_video.

Every measurement runs in a fresh subprocess, twice: times come from a process with the default allocator
settings (what a user gets), memory from one with MALLOC_MMAP_THRESHOLD_=65536 (so freed buffers leave the RSS and
each step's peak shows). The latter setting makes every large temporary a fresh mmap that page-faults on first touch,
which slows the dense step by ~1.35x on this class of machine (0.40 instead of 0.30 s a frame at stride 16), so it
times nothing; its times are kept as median_ms_per_frame_mmap for reference.
peak_mb = the largest RSS increase during one propagation step over the RSS just before it (VmHWM reset through
/proc/self/clear_refs), i.e. the step's own working memory; the inputs (frame 0 + 20 context frames) are live in
both cases and not counted. For the video, process_peak_mb is the whole process's peak RSS increase over its RSS
before propagating (the evaluator's frame store and per-target context stack included, common to both impls).
On a shared machine, another busy process slows the dense step's OpenMP/MKL threads far more than the fused op
(measured: dense 0.3 -> 1.6 s a frame, fused 42 -> 90 ms): compare ratios from a quiet run, and run twice.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, statistics, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, {root!r})
from smtc_fast.evaluate import propagation as P
from smtc_fast.ops import propagate_labels

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

impl, scenario = {impl!r}, {scenario!r}
torch.manual_seed(0)
peaks, times, tops = [], [], []

def step(q, f0, l0, cf, cl, grid, topk, radius, temperature, chunk=1024):
    reset_peak()
    rss0 = status("VmRSS")
    t0 = time.perf_counter()
    if impl == "fused":
        out = propagate_labels(q, f0, l0, cf, cl, grid, topk, radius, temperature)
    else:
        out = P.propagate_dense(q, f0, l0, cf, cl, grid, topk, radius, temperature, chunk=chunk)
    times.append(time.perf_counter() - t0)
    peaks.append(status("VmHWM") - rss0)
    tops.append(status("VmHWM"))
    return out

D, K = 384, 3
if scenario.startswith("frame"):
    stride = int(scenario[5:])
    grid, topk, radius, reps = ((30, 53), 7, 7.0, {reps16}) if stride == 16 else ((60, 107), 28, 35.0, {reps8})
    N = grid[0] * grid[1]
    base = F.normalize(torch.randn(N, D), dim=1)
    frames = F.normalize(base + 0.3 * torch.randn(22, N, D), dim=2)  # frame 0, 20 context frames, the target
    first = F.one_hot(torch.randint(K, (N,)), K).float()
    ctx_l = torch.softmax(torch.randn(20, N, K), -1)
    step(frames[21], frames[0], first, frames[1:21], ctx_l, grid, topk, radius, 0.2)  # warm-up
    times.clear(); peaks.clear()
    for _ in range(reps):
        step(frames[21], frames[0], first, frames[1:21], ctx_l, grid, topk, radius, 0.2)
    extra = {{}}
else:  # a synthetic video at stride 16 through the evaluator's propagate_video
    stride, T, grid = 16, {frames}, (30, 53)
    N = grid[0] * grid[1]
    pre = P.PRESETS["smtc-stride16"]
    base = F.normalize(torch.randn(N, D), dim=1)
    def video():
        for t in range(T):  # a slowly drifting feature field, made on the fly like a real extractor would
            yield F.normalize(base + 0.05 * t ** 0.5 * torch.randn(N, D), dim=1)
    first = F.one_hot(torch.randint(K, (N,)), K).float()
    reset_peak()
    proc0 = status("VmRSS")
    for t, pred in P.propagate_video(video(), first, grid, pre.topk, pre.n_context, pre.radius, pre.temperature,
                                     step=step):
        pass
    # the per-step resets lower VmHWM, so the process peak is the largest VmHWM seen at the end of a step
    extra = {{"frames": T, "process_peak_mb": max(tops) - proc0}}
print(json.dumps({{"impl": impl, "stride": stride, "scenario": "frame" if scenario.startswith("frame") else "video",
                   "median_ms_per_frame": 1000 * statistics.median(times), "peak_mb": max(peaks),
                   "steps": len(times), **extra}}))
"""


def env_header():
    import torch

    try:
        commit = subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(), "commit": commit,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _child(impl, scenario, args, memory):
    code = CHILD.format(root=ROOT, impl=impl, scenario=scenario, frames=args.frames, reps16=args.reps,
                        reps8=max(1, args.reps // 3))
    env = dict(os.environ)
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.check_output([sys.executable, "-c", code], text=True, env=env)
    return json.loads(out.strip().splitlines()[-1])


def run_child(impl, scenario, args):
    """Times from a default-allocator process, peaks from a MALLOC_MMAP_THRESHOLD_ one (module docstring)."""
    rec = _child(impl, scenario, args, memory=False)
    mem = _child(impl, scenario, args, memory=True)
    rec["median_ms_per_frame_mmap"] = mem["median_ms_per_frame"]
    for key in ("peak_mb", "process_peak_mb"):
        if key in mem:
            rec[key] = mem[key]
    print(f"{rec['scenario']:5s} stride {rec['stride']:2d} {impl:5s}: {rec['median_ms_per_frame']:9.1f} ms/frame, "
          f"step peak {rec['peak_mb']:7.1f} MB  ({rec['steps']} steps; {rec['median_ms_per_frame_mmap']:.0f} ms in the "
          f"memory run)"
          + (f", process peak +{rec['process_peak_mb']:.1f} MB" if "process_peak_mb" in rec else ""), flush=True)
    return rec


H100 = {"fma_flops": 67e12, "l2_bytes_s": 10e12, "dram_bytes_s": 3.35e12}  # SXM, FP32 FMA peak


def _disc_half_width(dy, radius):  # propagate.h disc_half_width
    if dy * dy >= radius * radius:
        return -1
    dx = 0
    while (dx + 1) ** 2 + dy * dy < radius * radius:
        dx += 1
    return dx


def cuda_roofline(h, w, radius, n_ctx=20, d=384, tile=16):
    """The CUDA kernel's roofline on an H100 for one target frame (csrc/propagate/propagate_cuda.cu's header):
    a block per `tile` queries of a grid row streams frame 0 and, per disc row, the union run of its queries'
    windows. FLOPs = 2 D x tile x streamed keys (padded queries and union overhead included); L2 bytes = each tile
    reads its streamed keys once; DRAM bytes = the features once."""
    reach = 0
    while reach + 1 < radius:
        reach += 1
    n = h * w
    streamed = 0
    for qy in range(h):
        for qx0 in range(0, w, tile):
            ng = min(tile, w - qx0)
            run = 0
            for dy in range(-reach, reach + 1):
                hw = _disc_half_width(dy, radius)
                if hw >= 0 and 0 <= qy + dy < h:
                    run += min(w - 1, qx0 + ng - 1 + hw) - max(0, qx0 - hw) + 1
            streamed += n + n_ctx * run
    flops = 2 * d * tile * streamed
    l2 = 4 * d * streamed
    dram = 4 * d * (2 + n_ctx) * n
    t = {"compute_us": flops / H100["fma_flops"] * 1e6, "l2_us": l2 / H100["l2_bytes_s"] * 1e6,
         "dram_us": dram / H100["dram_bytes_s"] * 1e6}
    bound = max(t, key=t.get)
    return {"gflop": flops / 1e9, "l2_gb": l2 / 1e9, "dram_mb": dram / 1e6, **t, "bound": bound[:-3],
            "bound_us": t[bound]}


def print_roofline():
    out = {}
    for stride, (h, w, radius) in {16: (30, 53, 7.0), 8: (60, 107, 35.0)}.items():
        r = out[f"stride{stride}"] = cuda_roofline(h, w, radius)
        print(f"roofline (H100, CUDA kernel) stride {stride:2d} {h}x{w} radius {radius:g}: {r['gflop']:.1f} GFLOP "
              f"({r['compute_us']:.0f} us at 67 TFLOP/s), L2 {r['l2_gb']:.2f} GB ({r['l2_us']:.0f} us), DRAM "
              f"{r['dram_mb']:.0f} MB ({r['dram_us']:.0f} us): {r['bound']}-bound, {r['bound_us'] / 1e3:.2f} ms/frame")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="bench_out/bench_propagation.json")
    ap.add_argument("--quick", action="store_true", help="stride 16 only and a 20-frame video")
    ap.add_argument("--frames", type=int, default=80, help="frames of the synthetic video")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per single-frame measurement")
    args = ap.parse_args()
    if args.quick:
        args.frames = min(args.frames, 20)
    result = {"env": env_header(), "records": [], "ratios": {}}
    print(json.dumps(result["env"]))
    result["cuda_roofline_h100"] = print_roofline()
    scenarios = ["frame16"] + ([] if args.quick else ["frame8"]) + ["video"]
    for sc in scenarios:
        recs = {impl: run_child(impl, sc, args) for impl in ("dense", "fused")}
        result["records"] += [recs["dense"], recs["fused"]]
        key = f"{recs['fused']['scenario']}_stride{recs['fused']['stride']}"
        ratio = {"speedup": recs["dense"]["median_ms_per_frame"] / recs["fused"]["median_ms_per_frame"],
                 "peak_memory_ratio": recs["dense"]["peak_mb"] / max(recs["fused"]["peak_mb"], 1e-3)}
        result["ratios"][key] = ratio
        print(f"  -> {key}: fused {ratio['speedup']:.1f}x faster, {ratio['peak_memory_ratio']:.1f}x lower step peak",
              flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
