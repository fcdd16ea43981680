"""Training-step time of SMTC on the CPU: compiled kernels vs the PyTorch references, float32 vs bf16 autocast
(`--amp`), and backbone vs head share.

    python bench/bench_train.py --json bench_out/bench_train.json
    python bench/bench_train.py --resolution 256 --batch 32 --steps 2 --warmup 1 --rounds 1 --modes kernels bf16

One "step" is what smtc_fast.train does per iteration: two augmented views, student forward (train mode) and
teacher forward (no grad), L_sem + L_reg + L_obj, backward, AdamW, EMA. Each mode runs in its own subprocess
(SMTC_FAST_FORCE_REFERENCE=1 for the references), alternating, so both see the same machine state. Mode "bf16" is
the kernels under the trainer's `--amp` autocast (smtc_fast.precision: bf16 where the CPU has AVX512-BF16 or AMX,
else float32, which the table then says).
The head share is measured by running the same step with the backbone keys precomputed (no encoder forward or
backward): head = that time, backbone = full step - head.
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
    torch.manual_seed(0)
    H = W = args.resolution
    cfg = SMTCConfig(backbone=args.backbone, resolution=(H, W), num_slots=args.slots, num_instances=args.instances,
                     depth=args.depth)
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

    def step(head_only):
        # the two views' augmentation belongs to the full step only: the head step starts from cached keys (timing
        # it here made the augmentation ~3/4 of the "head" time at 256^2)
        if not head_only:
            x_s = augment_clips(clips, list(range(B)))
            x_t = augment_clips(clips, list(range(B, 2 * B)))
        with precision.autocast("cpu", args.amp):  # as smtc_fast.train: the forwards autocast, the losses not
            if head_only:
                keys_s, grid = cached["s"]
                out_s = student.head(keys_s, B, T, grid, noise)
                with torch.no_grad():
                    out_t = teacher.head(*cached["t"][:1], B, T, cached["t"][1], noise)
            else:
                out_s = student(x_s, noise)
                with torch.no_grad():
                    out_t = teacher(x_t, noise)
        loss = semantic_loss(out_s.semantic_logits, out_t.semantic_logits, out_t.keys) \
            + overlap_loss(out_s.semantic_logits) \
            + object_loss(out_s.proj, out_t.proj,
                          valid_instances(out_s.semantic_logits, out_s.semantic_slots, out_s.instance_slots),
                          valid_instances(out_t.semantic_logits, out_t.semantic_slots, out_t.instance_slots))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(teacher, student, 0.999, False)

    with torch.no_grad(), precision.autocast("cpu", args.amp):
        ks, _, grid = student.encode(augment_clips(clips, list(range(B))))
        kt, _, _ = teacher.encode(augment_clips(clips, list(range(B, 2 * B))))
    cached = {"s": (ks.detach(), grid), "t": (kt.detach(), grid)}

    times = {"full": [], "head": []}
    for k in range(args.warmup + args.steps):
        for mode in (("head",) if args.head_only else ("full", "head")):
            t0 = time.perf_counter()
            step(mode == "head")
            if k >= args.warmup:
                times[mode].append(time.perf_counter() - t0)
    probe = torch.zeros(1, 2, 2)
    head = statistics.median(times["head"])
    full = statistics.median(times["full"]) if times["full"] else float("nan")  # --head-only: no full step
    print(json.dumps({"uses_kernels": use_kernel(probe), "precision": precision.describe("cpu", args.amp),
                      "step_s": full, "head_s": head,
                      "backbone_s": max(0.0, full - head), "backbone_share": max(0.0, full - head) / full,
                      "head_share": min(1.0, head / full), "all_full_s": times["full"], "all_head_s": times["head"]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_small_patch16_224")
    parser.add_argument("--depth", type=int, default=None, help="override the ViT depth (default: 12)")
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
                        choices=["kernels", "bf16", "reference"],
                        help="kernels = float32 with the compiled ops; bf16 = the same under --amp autocast; "
                             "reference = float32 with the PyTorch references")
    parser.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--head-only", action="store_true",
                        help="time only the head step (backbone keys precomputed): the official batch in minutes")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        return measure(args)

    passthrough = []
    for key in ("backbone", "depth", "resolution", "batch", "frames", "slots", "instances", "steps", "warmup",
                "threads"):
        if getattr(args, key) is not None:
            passthrough += [f"--{key}", str(getattr(args, key))]
    if args.head_only:
        passthrough.append("--head-only")
    results = {mode: [] for mode in args.modes}
    for _ in range(args.rounds):
        for mode in args.modes:
            env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
            env["SMTC_FAST_FORCE_REFERENCE"] = "1" if mode == "reference" else "0"
            amp = ["--amp"] if mode == "bf16" else []
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_measure", *passthrough, *amp],
                                  env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
            results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {}
    for mode, runs in results.items():
        summary[mode] = {k: statistics.median(r[k] for r in runs)
                         for k in ("step_s", "head_s", "backbone_s", "backbone_share", "head_share")}
        summary[mode]["uses_kernels"] = runs[0]["uses_kernels"]
        summary[mode]["precision"] = runs[0]["precision"]
    for other in ("reference", "bf16"):
        if other in summary and "kernels" in summary:
            for part in ("step", "head"):
                summary[f"kernels_over_{other}_{part}" if other == "bf16" else f"reference_over_kernels_{part}"] = (
                    summary["kernels"][f"{part}_s"] / summary[other][f"{part}_s"] if other == "bf16"
                    else summary[other][f"{part}_s"] / summary["kernels"][f"{part}_s"])
    out = {"environment": environment(), "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
           "summary": summary, "runs": results}

    print(f"{'mode':<10} {'step ms':>9} {'head ms':>9} {'backbone %':>11} {'head %':>7}  kernels  precision")
    for mode in args.modes:
        s = summary[mode]
        print(f"{mode:<10} {1e3 * s['step_s']:9.1f} {1e3 * s['head_s']:9.1f} {100 * s['backbone_share']:10.1f}% "
              f"{100 * s['head_share']:6.1f}%  {str(s['uses_kernels']):<7}  {s['precision']}")
    if "reference_over_kernels_step" in summary:
        print(f"reference / kernels: step x{summary['reference_over_kernels_step']:.3f}, "
              f"head x{summary['reference_over_kernels_head']:.3f}")
    if "kernels_over_bf16_step" in summary:
        print(f"float32 / bf16 (--amp): step x{summary['kernels_over_bf16_step']:.3f}, "
              f"head x{summary['kernels_over_bf16_head']:.3f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print("wrote", args.json)


if __name__ == "__main__":
    main()
