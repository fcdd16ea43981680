"""Training-step time of SMTC on the CPU: compiled kernels vs the PyTorch references, float32 vs bf16 autocast
(`--amp`), and backbone vs head share.

    python bench/bench_train.py --json bench_out/bench_train.json
    python bench/bench_train.py --resolution 256 --batch 32 --steps 2 --warmup 1 --rounds 1 --modes kernels bf16
    python bench/bench_train.py --resolution 256 --batch 32 --paired --steps 6 --warmup 1 --modes kernels bf16
    python bench/bench_train.py --paired --test-shapes --steps 16 --warmup 3 --modes kernels bf16

One "step" is what smtc_fast.train does per iteration: two augmented views, student forward (train mode) and
teacher forward (no grad), L_sem + L_reg + L_obj, backward, AdamW, EMA. Each mode runs in its own subprocess
(SMTC_FAST_FORCE_REFERENCE=1 for the references), alternating, so both see the same machine state. Mode "bf16" is
the kernels under the trainer's `--amp` autocast (smtc_fast.precision: bf16 where the CPU has AVX512-BF16 or AMX,
else float32, which the table then says).
Like the trainer on the CPU, every mode keeps freed memory mapped (smtc_fast/cpu_memory.py); --no-keep-cpu-memory
measures with glibc's defaults, where the large tensors are page-faulted in again at every step.
The head share is measured by running the same step with the backbone keys precomputed (no encoder forward or
backward): head = that time, backbone = full step - head.
--paired times the head step only, kernels and references alternating step by step in one process per precision
(use_kernel reads SMTC_FAST_FORCE_REFERENCE at every call), and reports the ratio of each adjacent pair: a shared
machine's slow phases last longer than a step, so they hit both sides of a pair alike. Which side goes first
alternates. It also reports the smtc_fast operators' share of the kernels' step and the ceiling it implies: the
time outside them is the same code on both sides, so reference / (kernels' step - ops) bounds the ratio any kernel
work can reach. --test-shapes repeats it at each model shape the tests use (TEST_SHAPES).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environment():
    import torch

    import smtc_fast

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = smtc_fast.build_info()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,  # threads: see config
            "python": platform.python_version(), "commit": commit, "extension": info["extension"],
            "cpu_kernels": info["cpu_kernels"], "load_avg": os.getloadavg()}


def measure(args):
    """Runs inside the subprocess: times `args.steps` full steps and head-only steps; prints one JSON line."""
    import torch

    from smtc_fast import precision
    from smtc_fast.data import augment_clips, make_clip
    from smtc_fast.losses import object_loss, overlap_loss, semantic_loss, valid_instances
    from smtc_fast.models import SMTC, SMTCConfig
    from smtc_fast.ops._common import use_kernel
    from smtc_fast.train import ema_update, param_groups

    torch.set_num_threads(args.threads)
    if args.keep_cpu_memory:  # as smtc train on the CPU (smtc_fast/cpu_memory.py); both modes alike
        from smtc_fast.cpu_memory import keep_freed_memory

        keep_freed_memory()
    torch.manual_seed(0)
    H = W = args.resolution
    cfg = SMTCConfig(backbone=args.backbone, resolution=(H, W), num_slots=args.slots, num_instances=args.instances,
                     depth=args.depth, patch_size=args.patch_size, img_size=args.img_size)
    student = SMTC(cfg).train()
    teacher = SMTC(cfg).eval()
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(param_groups(student, 0.1), lr=1e-5)
    clips = torch.stack([make_clip(i, args.frames, (H, W), 2)[0] for i in range(args.batch)])
    B, T = clips.shape[:2]
    D = student.transport_proj.out_channels
    noise = torch.randn(B * T, args.slots, args.instances, D)

    parts = {}  # head-only steps: seconds per component, accumulated over the timed steps

    def record(name, t0):
        t1 = time.perf_counter()
        parts[name] = parts.get(name, 0.0) + (t1 - t0)
        return t1

    def step(head_only):
        # the two views' augmentation belongs to the full step only: the head step starts from cached keys (timing
        # it here made the augmentation ~3/4 of the "head" time at 256^2)
        if not head_only:
            x_s = augment_clips(clips, list(range(B)))
            x_t = augment_clips(clips, list(range(B, 2 * B)))
        lap = record if head_only else (lambda name, t0: time.perf_counter())
        t = time.perf_counter()
        with precision.autocast("cpu", args.amp):  # as smtc_fast.train: the forwards autocast, the losses not
            if head_only:  # SMTC.head, component by component
                keys_s, grid = cached["s"]
                keys_s = keys_s.contiguous()  # as SMTC.head does
                x = student.fuse(keys_s, B, T, grid)
                t = lap("student fuse (correlation + h_c)", t)
                slots = student.slot_attention(x, instance_noise=noise)
                t = lap("student slot attention (3 + 3)", t)
                out_s = student.head_outputs(keys_s, slots, B, T, grid)
                t = lap("student mlp_slot", t)
                with torch.no_grad():
                    out_t = teacher.head(*cached["t"][:1], B, T, cached["t"][1], noise)
                t = lap("teacher head", t)
            else:
                out_s = student(x_s, noise)
                with torch.no_grad():
                    out_t = teacher(x_t, noise)
        l_sem = semantic_loss(out_s.semantic_logits, out_t.semantic_logits, out_t.keys)
        t = lap("L_sem", t)
        l_reg = overlap_loss(out_s.semantic_logits)
        t = lap("L_reg", t)
        v_s = valid_instances(out_s.semantic_logits, out_s.semantic_slots, out_s.instance_slots)
        v_t = valid_instances(out_t.semantic_logits, out_t.semantic_slots, out_t.instance_slots)
        t = lap("validity filter", t)
        loss = l_sem + l_reg + object_loss(out_s.proj, out_t.proj, v_s, v_t)
        t = lap("L_obj", t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t = lap("backward", t)
        opt.step()
        ema_update(teacher, student, 0.999, False)
        lap("AdamW + EMA", t)

    with torch.no_grad(), precision.autocast("cpu", args.amp):
        ks, _, grid = student.encode(augment_clips(clips, list(range(B))))
        kt, _, _ = teacher.encode(augment_clips(clips, list(range(B, 2 * B))))
    cached = {"s": (ks.detach(), grid), "t": (kt.detach(), grid)}

    if args.paired:  # head steps, kernels and references alternating in this one process (see main's --paired)
        times = {"kernels": [], "reference": []}
        for k in range(args.warmup + args.steps):
            # which side goes first alternates (ABBA...), so a cost that falls on a pair's first or second step
            # (allocator state, caches) is not charged to one side
            for side in (("kernels", "reference") if k % 2 == 0 else ("reference", "kernels")):
                # use_kernel() reads this variable at every call, so the next step takes that side's ops
                os.environ["SMTC_FAST_FORCE_REFERENCE"] = "1" if side == "reference" else "0"
                t0 = time.perf_counter()
                step(True)
                if k >= args.warmup:
                    times[side].append(time.perf_counter() - t0)
        ratios = [r / k for k, r in zip(times["kernels"], times["reference"])]
        # The ceiling: the kernels' share of their step, from one profiled step. The time outside the smtc_fast
        # operators (GEMMs, LayerNorms, glue: the same code on both sides) stays whatever the kernels do, so the
        # ratio cannot exceed reference / that rest even if every op took no time at all.
        os.environ["SMTC_FAST_FORCE_REFERENCE"] = "0"
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(True)
        events = prof.events()
        total = sum(e.self_cpu_time_total for e in events)

        def in_op(e):  # inside an smtc_fast operator or its autograd node (forward or backward)
            while e is not None:
                if "smtc_fast" in e.name:
                    return True
                e = e.cpu_parent
            return False

        # inclusive: what an op runs inside (aten calls of its wrapper, the backward's allocations) is its time
        ops = sum(e.self_cpu_time_total for e in events if in_op(e))
        print(json.dumps({"precision": precision.describe("cpu", args.amp), "head_s": times, "ratios": ratios,
                          "op_share": ops / total}))
        return

    times = {"full": [], "head": []}
    for k in range(args.warmup + args.steps):
        for mode in (("head",) if args.head_only else ("full", "head")):
            if mode == "head" and k == args.warmup:
                parts.clear()  # components of the timed head steps only
            t0 = time.perf_counter()
            step(mode == "head")
            if k >= args.warmup:
                times[mode].append(time.perf_counter() - t0)
    parts = {name: v / args.steps for name, v in parts.items()}  # mean seconds per head step
    probe = torch.zeros(1, 2, 2)
    head = statistics.median(times["head"])
    full = statistics.median(times["full"]) if times["full"] else float("nan")  # --head-only: no full step
    print(json.dumps({"uses_kernels": use_kernel(probe), "precision": precision.describe("cpu", args.amp),
                      "step_s": full, "head_s": head,
                      "backbone_s": max(0.0, full - head), "backbone_share": max(0.0, full - head) / full,
                      "head_share": min(1.0, head / full), "all_full_s": times["full"], "all_head_s": times["head"],
                      "head_parts_s": parts}))


def passthrough(args):
    """The measuring subprocess's arguments: the shape and timing options as given."""
    out = []
    for key in ("backbone", "depth", "patch_size", "img_size", "resolution", "batch", "frames", "slots", "instances",
                "steps", "warmup", "threads"):
        if getattr(args, key) is not None:
            out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if not args.keep_cpu_memory:
        out.append("--no-keep-cpu-memory")
    return out


def run_measure(label, extra, force_reference=None):
    """One measuring subprocess (this script with --_measure and `extra`) -> its JSON line."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if force_reference is not None:
        env["SMTC_FAST_FORCE_REFERENCE"] = "1" if force_reference else "0"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_measure", *extra], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{label} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(args, summary, runs):
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": environment(),
                       "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                       "summary": summary, "runs": runs}, f, indent=1)
        print("wrote", args.json)


# The model shapes the tests train and run (python_tests: test_model_smtc/test_model_train's tiny(), test_cpu_bf16's
# small_model(), the ResNet test, test_eval_cli), each at the trainer tests' 2 clips of 4 frames: --test-shapes
TEST_SHAPES = {
    "vit-tiny/8 64^2 S4 P3": dict(backbone="vit_tiny_patch16_224", patch_size=8, img_size=64, depth=2,
                                  resolution=64, slots=4, instances=3),
    "vit-small/16 64^2 S4 P3": dict(backbone="vit_small_patch16_224", depth=2, resolution=64, slots=4, instances=3),
    "vit-small/16 64^2 S4 P2": dict(backbone="vit_small_patch16_224", depth=1, resolution=64, slots=4, instances=2),
    "resnet50/8 64^2 S4 P2": dict(backbone="resnet50", resolution=64, slots=4, instances=2),
    "vit-small/16 64^2 S16 P4": dict(backbone="vit_small_patch16_224", depth=1, resolution=64, slots=16,
                                     instances=4),
}


def paired(args):
    """--paired: the head step's kernels / references ratio, pair by pair (see the option's help)."""
    precisions = []
    if {"kernels", "reference"} & set(args.modes):
        precisions.append("float32")
    if {"bf16", "reference-bf16"} & set(args.modes):
        precisions.append("bf16")
    shapes = {"as given": {}}
    if args.test_shapes:
        # each shape sets its whole model: the overrides it leaves out are the model's own, not the command line's
        shapes = {name: dict(dict(depth=None, patch_size=None, img_size=None, batch=2, frames=4), **shape)
                  for name, shape in TEST_SHAPES.items()}
    results = {(name, p): [] for name in shapes for p in precisions}
    for name, shape in shapes.items():
        shape_args = argparse.Namespace(**{**vars(args), **shape})
        for _ in range(args.rounds):
            for prec in precisions:
                amp = ["--amp"] if prec == "bf16" else []
                results[name, prec].append(run_measure(prec, [*passthrough(shape_args), "--head-only", "--paired",
                                                              *amp]))
    summary = {}
    width = max(len(name) for name in shapes)
    print(f"{'shape':<{width}} {'precision':<10} {'pairs':>5} {'kernels ms':>11} {'reference ms':>13} "
          f"{'ratio median':>13} {'min':>6} {'max':>6}  >=2x     ops %  ceiling")
    for (name, prec), runs in results.items():
        ratios = [r for run in runs for r in run["ratios"]]
        kern = [t for run in runs for t in run["head_s"]["kernels"]]
        ref = [t for run in runs for t in run["head_s"]["reference"]]
        share = statistics.median(run["op_share"] for run in runs)
        s = {"pairs": len(ratios), "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
             "ratio_max": max(ratios), "kernels_head_s_median": statistics.median(kern),
             "reference_head_s_median": statistics.median(ref), "pairs_at_least_2x": sum(r >= 2 for r in ratios),
             "precision": runs[0]["precision"], "op_share": share,
             "ceiling": statistics.median(ref) / (statistics.median(kern) * (1 - share))}
        summary[prec if name == "as given" else f"{name} {prec}"] = s
        print(f"{name:<{width}} {prec:<10} {s['pairs']:5d} {1e3 * s['kernels_head_s_median']:11.1f} "
              f"{1e3 * s['reference_head_s_median']:13.1f} {s['ratio_median']:13.3f} {s['ratio_min']:6.3f} "
              f"{s['ratio_max']:6.3f}  {s['pairs_at_least_2x']:>3}/{s['pairs']:<3} {100 * share:8.1f}% "
              f"{s['ceiling']:8.2f}x")
    print("ops % = the smtc_fast operators' share of the kernels' head step (one profiled step); ceiling = "
          "reference / (kernels' step without them): the ratio if every op took no time")
    write_json(args, summary, {f"{name} {prec}": runs for (name, prec), runs in results.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_small_patch16_224")
    parser.add_argument("--depth", type=int, default=None, help="override the ViT depth (default: 12)")
    parser.add_argument("--patch-size", type=int, default=None, help="override the ViT patch size")
    parser.add_argument("--img-size", type=int, default=None, help="override the ViT's pos-embed image size")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="clips per step")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating kernel/reference subprocess rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["kernels", "bf16", "reference"],
                        choices=["kernels", "bf16", "reference", "reference-bf16"],
                        help="kernels = float32 with the compiled ops; bf16 = the same under --amp autocast; "
                             "reference = float32 with the PyTorch references; reference-bf16 = the references "
                             "under --amp")
    parser.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--head-only", action="store_true",
                        help="time only the head step (backbone keys precomputed): the official batch in minutes")
    parser.add_argument("--keep-cpu-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="glibc keeps freed memory mapped, as `smtc train` does on the CPU (smtc_fast/"
                             "cpu_memory.py); --no-keep-cpu-memory measures with glibc's defaults")
    parser.add_argument("--paired", action="store_true",
                        help="head step only: per precision, one process per round runs kernel and reference steps "
                             "alternately and reports the ratio of each adjacent pair (robust to a shared machine's "
                             "slow phases, which last longer than a step)")
    parser.add_argument("--test-shapes", action="store_true",
                        help="with --paired: run it at each model shape the tests use (TEST_SHAPES), 2 clips of 4 "
                             "frames, instead of the shape given")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        return measure(args)
    if args.paired:
        return paired(args)

    extra = passthrough(args) + (["--head-only"] if args.head_only else [])
    results = {mode: [] for mode in args.modes}
    for _ in range(args.rounds):
        for mode in args.modes:
            amp = ["--amp"] if mode.endswith("bf16") else []
            results[mode].append(run_measure(mode, [*extra, *amp], force_reference=mode.startswith("reference")))
    summary = {}
    for mode, runs in results.items():
        summary[mode] = {k: statistics.median(r[k] for r in runs)
                         for k in ("step_s", "head_s", "backbone_s", "backbone_share", "head_share")}
        summary[mode]["head_parts_s"] = {name: statistics.median(r["head_parts_s"][name] for r in runs)
                                         for name in runs[0]["head_parts_s"]}
        summary[mode]["uses_kernels"] = runs[0]["uses_kernels"]
        summary[mode]["precision"] = runs[0]["precision"]
    # ratios > 1 mean the first-named mode is slower
    for slow, fast in (("reference", "kernels"), ("reference-bf16", "bf16"), ("kernels", "bf16"),
                       ("reference", "bf16")):
        if slow in summary and fast in summary:
            for part in ("step", "head"):
                summary[f"{slow}_over_{fast}_{part}"] = summary[slow][f"{part}_s"] / summary[fast][f"{part}_s"]
    print(f"{'mode':<15} {'step ms':>9} {'head ms':>9} {'backbone %':>11} {'head %':>7}  kernels  precision")
    for mode in args.modes:
        s = summary[mode]
        print(f"{mode:<15} {1e3 * s['step_s']:9.1f} {1e3 * s['head_s']:9.1f} {100 * s['backbone_share']:10.1f}% "
              f"{100 * s['head_share']:6.1f}%  {str(s['uses_kernels']):<7}  {s['precision']}")
    for slow, fast in (("reference", "kernels"), ("reference-bf16", "bf16"), ("kernels", "bf16"),
                       ("reference", "bf16")):
        if f"{slow}_over_{fast}_head" in summary:
            print(f"{slow} / {fast}: step x{summary[f'{slow}_over_{fast}_step']:.3f}, "
                  f"head x{summary[f'{slow}_over_{fast}_head']:.3f}")
    print(f"\nhead step by component (ms, mean over the timed steps; median over rounds)")
    print(f"{'component':<34}" + "".join(f"{m:>15}" for m in args.modes))
    for name in summary[args.modes[0]]["head_parts_s"]:
        print(f"{name:<34}" + "".join(f"{1e3 * summary[m]['head_parts_s'][name]:15.1f}" for m in args.modes))
    print(f"{'sum':<34}" + "".join(f"{1e3 * sum(summary[m]['head_parts_s'].values()):15.1f}" for m in args.modes))
    write_json(args, summary, results)


if __name__ == "__main__":
    main()
