"""`smtc demo`: the whole method on an embedded default dataset, in a few minutes on a CPU, with a report.

    smtc demo                         # train a small SMTC on real DAVIS clips + synthetic clips, evaluate, report
    smtc demo --quick --out DIR       # the same pipeline at a tiny size on synthetic clips only (seconds)
    smtc demo --checkpoint smtc.pth   # the released model instead of training (and/or --dino dino_deitsmall16.pth)
    smtc demo --data my_clips/        # your own frames / video / DAVIS-layout folder instead of the embedded clips

Steps: (1) the clips: two short DAVIS clips shipped with the package (smtc_fast/assets/davis, CC BY-NC 4.0) and two
synthetic clips with exact masks; (2) the model: unless weights are given, a small SMTC (a randomly initialised
2-block ViT-Tiny/8 at 128x128) trained with the full objective (L_sem + L_reg + L_obj, EMA teacher; spec §2-3) on
those clips and on synthetic clips; (3) label propagation (the CRW/SMTC protocol, evaluation_protocols.md §2) of
frame 0's mask with the model's tokens, scored with J&F; (4) object discovery (spec §4.2): the instance-slot
candidates against the foreground, frame mean IoU; (5) report.html with the loss curves, the metrics table and,
per clip, GIFs of the propagated masks and of the semantic / instance slots. The numbers are those of a tiny model
trained for minutes on a few clips: they show the pipeline works, they are not the paper's.
"""
import dataclasses
import html
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from PIL import Image

from smtc_fast._lazy import lazy, resolve_device
from smtc_fast.evaluate import io as eio

torch = lazy("torch")  # imported when a function runs: `smtc demo --help` stays fast (smtc_fast/_lazy.py)

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "davis")


@dataclass
class Clip:
    name: str
    frames: List[str]                  # frame files (the demo's own copy under out/clips)
    annotations: Optional[List[str]]   # one label PNG per frame (0 = background), or None
    source: str                        # where it came from, for the report


# ---------------------------------------------------------------------------------------------------------------
# clips

def _write_clip(out_dir, name, rgb, labels=None, ext=".jpg"):
    frames, anns = [], [] if labels is not None else None
    os.makedirs(os.path.join(out_dir, "JPEGImages", name), exist_ok=True)
    for t, im in enumerate(rgb):
        p = os.path.join(out_dir, "JPEGImages", name, f"{t:05d}{ext}")
        Image.fromarray(im).save(p, **({"quality": 92} if ext == ".jpg" else {}))
        frames.append(p)
        if labels is not None:
            a = os.path.join(out_dir, "Annotations", name, f"{t:05d}.png")
            eio.write_indexed_png(a, labels[t].astype(np.uint8))
            anns.append(a)
    return frames, anns


def synthetic_clips(out_dir, count, num_frames, size, seed=777):
    """Held-out synthetic clips (seeds the trainer never draws) written as PNG frames with exact masks."""
    from smtc_fast.data import make_clip

    clips = []
    for i in range(count):
        frames, masks = make_clip(seed * 1000 + i, num_frames, size, num_objects=2)
        rgb = (frames.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        name = f"synthetic-{i}"
        f, a = _write_clip(out_dir, name, rgb, masks.numpy(), ext=".png")
        clips.append(Clip(name, f, a, "synthetic (smtc_fast.data.make_clip), exact masks"))
    return clips


def _annotation_folder(seq_dir):
    """DAVIS layout: <root>/JPEGImages[/480p]/<seq> -> <root>/Annotations[/480p]/<seq> when it exists."""
    parts = os.path.normpath(seq_dir).split(os.sep)
    if "JPEGImages" in parts:
        i = len(parts) - 1 - parts[::-1].index("JPEGImages")
        cand = os.sep.join(parts[:i] + ["Annotations"] + parts[i + 1:])
        if os.path.isdir(cand):
            return cand
    return None


def user_clips(data, out_dir, max_frames, max_height):
    """--data: a video file, a folder of frames, or a folder of such folders (DAVIS layout: annotations found in
    the sibling Annotations tree are used for scores). Frames are copied (scaled to max_height) into out/clips."""
    from smtc_fast.visualize import read_clip

    if not os.path.exists(data):
        raise eio.DataError(f"--data {data}: no such file or folder")
    if os.path.isdir(data) and not _has_frames(data):
        root = os.path.join(data, "JPEGImages") if os.path.isdir(os.path.join(data, "JPEGImages")) else data
        subs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if len(subs) == 1 and not _has_frames(os.path.join(root, subs[0])):  # JPEGImages/480p/<seq>
            root = os.path.join(root, subs[0])
            subs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        sources = [os.path.join(root, d) for d in subs if _has_frames(os.path.join(root, d))]
        if not sources:
            raise eio.DataError(f"--data {data}: no frames, video file or folders of frames found")
    else:
        sources = [data]
    clips = []
    for src in sources:
        rgb, names = read_clip(src, max_frames, max_height)
        name = os.path.splitext(os.path.basename(os.path.normpath(src)))[0]
        labels = None
        ann_dir = _annotation_folder(src) if os.path.isdir(src) else None
        if ann_dir:
            paths = [os.path.join(ann_dir, n + ".png") for n in names]
            if all(os.path.exists(p) for p in paths):
                labels = np.stack([np.asarray(Image.fromarray(eio.read_label(p)).resize(
                    (rgb.shape[2], rgb.shape[1]), Image.NEAREST)) for p in paths])
                labels = np.where(labels == 255, 0, labels)
        f, a = _write_clip(out_dir, name, rgb, labels)
        clips.append(Clip(name, f, a, f"{src}" + (" with annotations" if a else " (no annotations)")))
    return clips


def _has_frames(folder):
    return any(n.lower().endswith(eio.IMAGE_EXTS) for n in os.listdir(folder))


# ---------------------------------------------------------------------------------------------------------------
# model

def tiny_configs(quick, steps, batch_size, seed, out_dir, data, device):
    from smtc_fast.models import SMTCConfig
    from smtc_fast.train import TrainConfig

    res = (64, 64) if quick else (128, 128)
    model_cfg = SMTCConfig(backbone="vit_tiny_patch16_224", patch_size=8, depth=2, img_size=res[0],
                           resolution=res, num_slots=4 if quick else 8, num_instances=3, drop_path_rate=0.0)
    cfg = TrainConfig(data=data, output=out_dir, steps=steps, batch_size=batch_size, lr=1e-3, grad_iter=0,
                      encoder_lr_mult=1.0, workers=0, log_every=5, save_every=10 ** 9, seed=seed, device=device,
                      quiet=False)
    return cfg, model_cfg


def loss_plot(metrics_path, png):
    """Loss curves (total and the three terms) from a metrics.jsonl -> PNG. None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(metrics_path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    for ax, key, title in zip(axes, ["loss", "sem", "reg", "obj"],
                              ["total loss", "L_sem (transport CE)", "L_reg (slot overlap)", "L_obj (instances)"]):
        ax.plot(steps, [r[key] for r in recs], lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


# ---------------------------------------------------------------------------------------------------------------
# evaluation of one clip

def propagate(clip, first_label, feature_fn, preset, device, label_name):
    """Propagate an (H, W) id map of frame 0 through the clip with the fused op -> predicted id maps (T, H, W)."""
    from smtc_fast.evaluate.propagation import propagate_label_video, resolve_step

    return np.stack([lab for _, lab in propagate_label_video(clip.frames, first_label, feature_fn, preset, -1, 16,
                                                             1024, device, label_name, step=resolve_step("fused"))])


def propagation_scores(clip, feature_fn, preset, device):
    """Propagate frame 0's annotation -> (predicted id maps (T, H, W), J&F dict)."""
    from smtc_fast.evaluate import metrics

    gt = np.stack([eio.read_label(p) for p in clip.annotations])
    preds = propagate(clip, gt[0], feature_fn, preset, device, clip.annotations[0])
    n = int(gt.max())
    ids = np.arange(1, n + 1)[:, None, None, None]
    J, Fm = metrics.evaluate_semisupervised(gt[None] == ids, preds[None] == ids)
    J, Fm = J[:, 1:-1], Fm[:, 1:-1]  # the DAVIS evaluator skips the first and the last frame
    return preds, {"J&F": float((J.mean() + Fm.mean()) / 2), "J": float(J.mean()), "F": float(Fm.mean())}


def discovery_scores(clip, maps):
    """Single-object protocol (§3): frame mean IoU with the foreground of the instance-slot candidates (oracle
    selection / all merged), and of the semantic-slot regions with oracle selection (the paper's SMTC-dagger row of
    Table 2: the first stage only)."""
    from smtc_fast.evaluate.discovery import single_frame_iou

    oracle, merged, semantic = [], [], []
    for p, m in zip(clip.annotations, maps):
        gt = eio.read_label(p) > 0
        o, a = single_frame_iou(m["candidates"], gt)
        oracle.append(o)
        merged.append(a)
        regions = m["semantic"][None] == np.unique(m["semantic"])[:, None, None]
        semantic.append(single_frame_iou(regions, gt)[0])
    return {"IoU (oracle selection)": float(np.mean(oracle)), "IoU (all candidates)": float(np.mean(merged)),
            "IoU semantic slots (oracle)": float(np.mean(semantic))}


# ---------------------------------------------------------------------------------------------------------------
# report

REPORT_COLUMNS = ["clip", "features", "J&F", "J", "F", "IoU (oracle selection)", "IoU (all candidates)",
                  "IoU semantic slots (oracle)", "candidates/frame"]


def _table(rows, cols):
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = ""
    for r in rows:
        cells = "".join(f"<td>{html.escape(_fmt(r.get(c, '-')))}</td>" for c in cols)
        body += f"<tr>{cells}</tr>\n"
    return f"<table><tr>{head}</tr>\n{body}</table>"


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(out, info, rows, clips_html, loss_png):
    cols = [c for c in REPORT_COLUMNS if any(c in r for r in rows)]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>smtc_fast demo report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}"
        "th{background:#eee}td:first-child,td:nth-child(2){text-align:left}img{max-width:100%}"
        ".note{background:#fff6d5;padding:.6em 1em;border-left:4px solid #e0b400}</style>",
        "<h1>smtc_fast demo</h1>",
        f"<p class='note'>{html.escape(info['statement'])}</p>",
        "<h2>Run</h2><ul>" + "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>"
                                     for k, v in info["facts"].items()) + "</ul>",
    ]
    if loss_png:
        parts.append(f"<h2>Training losses</h2><img src='{os.path.basename(loss_png)}' alt='loss curves'>")
    parts.append("<h2>Metrics</h2>" + _table(rows, cols))
    parts.append("<p>J&amp;F: label propagation of frame 0's annotation (CRW/SMTC protocol, top-k "
                 f"{info['preset']['topk']}, {info['preset']['n_context']} context frames, radius "
                 f"{info['preset']['radius']}, temperature {info['preset']['temperature']}), the DAVIS J and F over "
                 "frames 1..T-2. IoU: object discovery, the instance-slot candidates "
                 "(cos(semantic, instance) &ge; 0.5, min-max, &gt; 0.3) against the annotated foreground, frame "
                 "mean; 'oracle selection' keeps the candidates that overlap the object more than the background "
                 "(SMTC's single-object utility), 'all candidates' merges every one; 'semantic slots' scores the "
                 "regions of the argmax semantic slot the same way (the first stage alone, paper Table 2's "
                 "SMTC&dagger;).</p>")
    parts.append("<h2>Clips</h2>" + clips_html)
    path = os.path.join(out, "report.html")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


# ---------------------------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser):
    parser.add_argument("--out", default="runs/demo", help="report folder (report.html, GIFs, PNGs, checkpoint)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny pipeline on synthetic clips only (seconds; what the test runs)")
    parser.add_argument("--checkpoint", default=None,
                        help="a released SMTC checkpoint (or a `smtc train` last.pt) to use instead of training")
    parser.add_argument("--dino", default=None,
                        help="DINO ViT-S/16 weights (dino_deitsmall16_pretrain.pth): its tokens also propagate "
                             "labels; without --checkpoint the slot head stays untrained, so discovery is skipped")
    parser.add_argument("--data", default=None,
                        help="your clips instead of the embedded ones: a video file, a folder of frames, or a folder "
                             "of frame folders (DAVIS layout: Annotations/ next to JPEGImages/ gives scores)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of the small model (default 600, --quick 12; ~4 min on 2 CPU cores)")
    parser.add_argument("--batch-size", type=int, default=None, help="clips per step (default 4, --quick 2)")
    parser.add_argument("--max-frames", type=int, default=30, help="frames per clip used for the evaluation")
    parser.add_argument("--max-height", type=int, default=240,
                        help="work on frames scaled to this height (the official evaluation uses 480)")
    parser.add_argument("--iters", type=int, default=5, help="slot-attention iterations at inference "
                                                              "(eval_multi.sh: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and of the instance-slot noise")
    parser.add_argument("--device", default="auto", type=resolve_device,
                        help="device: auto = cuda when available, else cpu")


def _check_outdir(out):
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise eio.DataError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def run(args):
    from smtc_fast.evaluate.propagation import PRESETS, Preset, ViTTokens, ColorFeatures
    from smtc_fast.models import SMTC, load_checkpoint
    from smtc_fast.models.smtc import load_dino
    from smtc_fast.visualize import (colour_labels, distinct_colours, panel_row, save_gif, slot_maps, slot_panels,
                                     strip)
    from smtc_fast.evaluate.discovery import SMTCCandidates

    t_start = time.time()
    out = args.out
    for name, path in (("--checkpoint", args.checkpoint), ("--dino", args.dino)):
        if path is not None and not os.path.isfile(path):
            raise eio.DataError(f"{name} {path}: no such file")
    _check_outdir(out)
    for sub in ("clips", "train"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)  # a re-run starts clean, idempotently
    clip_dir = os.path.join(out, "clips")

    # ---- (1) clips
    if args.data:
        clips = user_clips(args.data, clip_dir, args.max_frames, args.max_height)
    elif args.quick:
        clips = synthetic_clips(clip_dir, 2, 8, (64, 96))
    else:
        clips = user_clips(os.path.join(ASSETS, "JPEGImages"), clip_dir, args.max_frames, args.max_height)
        for c in clips:
            c.source = "DAVIS-2016 val (embedded, 427x240, CC BY-NC 4.0) with annotations"
        clips += synthetic_clips(clip_dir, 2, 16, (120, 200))
    print(f"smtc demo: {len(clips)} clips: " + ", ".join(f"{c.name} ({len(c.frames)} frames)" for c in clips))

    # ---- (2) model
    facts = {}
    metrics_path = loss_png = None
    model = dino = None
    if args.checkpoint:
        model, kind = load_checkpoint(args.checkpoint)
        facts["model"] = f"{kind} checkpoint {args.checkpoint} ({model.config.backbone}), not trained here"
    if args.dino:
        dino = SMTC()  # ViT-S/16, the DINO architecture; only its encoder is used
        load_dino(dino, args.dino)
        facts["DINO"] = f"{args.dino} (ViT-S/16 tokens for label propagation)"
    trained = model is None and dino is None
    if trained:
        from smtc_fast.train import discovery_iou, train

        steps = args.steps or (12 if args.quick else 600)
        bs = args.batch_size or (2 if args.quick else 4)
        data = "synthetic" + ("" if args.quick else "," + os.path.join(clip_dir, "JPEGImages"))
        cfg, model_cfg = tiny_configs(args.quick, steps, bs, args.seed, os.path.join(out, "train"), data,
                                      args.device)
        torch.manual_seed(args.seed)
        before = discovery_iou(SMTC(model_cfg), num_clips=4 if args.quick else 8, device=args.device)
        t0 = time.time()
        summary = train(cfg, model_cfg)
        train_s = time.time() - t0
        if summary["exit_code"]:
            print(f"smtc demo: training stopped (exit code {summary['exit_code']}): {summary.get('message', '')}",
                  file=sys.stderr)
            return summary["exit_code"]
        model = summary["student"]
        after = discovery_iou(model, num_clips=4 if args.quick else 8, device=args.device)
        metrics_path = summary["metrics"]
        loss_png = loss_plot(metrics_path, os.path.join(out, "losses.png"))
        facts["model"] = (f"SMTC with a randomly initialised {model_cfg.depth}-block ViT-Tiny/{model_cfg.patch_size} "
                          f"encoder at {model_cfg.resolution[0]}x{model_cfg.resolution[1]}, S={model_cfg.num_slots} "
                          f"semantic x P={model_cfg.num_instances} instance slots")
        facts["training"] = (f"{steps} steps x {bs} clips of 4 frames ({steps * bs} clips) on "
                             + ("synthetic clips" if args.quick else "the clips below + synthetic clips, interleaved")
                             + f", lr {cfg.lr}, full objective with EMA teacher, {train_s / 60:.1f} min on "
                             f"{args.device} ({torch.get_num_threads()} threads); checkpoint {summary['checkpoint']}")
        facts["synthetic discovery (held-out clips, fg IoU)"] = f"{before['fg_iou']:.3f} before -> " \
                                                                f"{after['fg_iou']:.3f} after training"
    for m in (model, dino):
        if m is not None:
            m.eval()

    # ---- (3) + (4) per clip
    base = PRESETS["smtc-stride16"]
    feature_sets = []
    if model is not None and (args.checkpoint or trained):
        feature_sets.append(("SMTC" if args.checkpoint else "demo model", ViTTokens(model), model.encoder.stride))
    if dino is not None:
        feature_sets.append(("DINO ViT-S/16", ViTTokens(dino), 16))
    feature_sets.append(("colour (no learning)", ColorFeatures(8), 8))
    rows, clips_html, figure = [], "", None
    for clip in clips:
        rgb = np.stack([eio.read_rgb(p) for p in clip.frames])
        h, w = rgb.shape[1:3]
        section = f"<h3>{html.escape(clip.name)}</h3><p>{html.escape(clip.source)}; {len(clip.frames)} frames " \
                  f"of {w}x{h}</p>"
        maps = None
        if model is not None and (args.checkpoint or trained):
            stride = model.encoder.stride
            producer = SMTCCandidates(model, 4, args.iters, (h // stride * stride, w // stride * stride),
                                      seed=args.seed, device=args.device)
            maps = slot_maps(producer, rgb)
            panels = slot_panels(rgb, maps, model.config.num_slots, model.config.num_instances)
            gif = save_gif(os.path.join(out, f"{clip.name}_slots.gif"), panels)
            section += f"<p>Semantic slots, instance slots and discovered objects:</p>" \
                       f"<img src='{os.path.basename(gif)}'>"
            if figure is None and clip.annotations and not clip.name.startswith("synthetic"):
                figure = strip(panels)
            elif figure is None and args.quick:
                figure = strip(panels)
        seeds = None
        if clip.annotations is None and maps is not None:
            seeds = maps[0]["semantic"] + 1  # no annotation: propagate frame 0's semantic segmentation instead
        for label, fn, stride in feature_sets:
            preset = Preset(base.topk, base.n_context, base.radius, base.temperature, stride, "floor", stride,
                            f"smtc-stride16 settings at stride {stride}")
            row = {"clip": clip.name, "features": label}
            if clip.annotations:
                preds, scores = propagation_scores(clip, fn, preset, args.device)
                row.update(scores)
            else:
                preds = None if seeds is None else propagate(clip, seeds, fn, preset, args.device,
                                                             "frame 0 semantic slots")
            if label == feature_sets[0][0] and preds is not None:
                pal = eio.davis_palette() if clip.annotations else distinct_colours(256)
                gt = [eio.read_label(p) for p in clip.annotations] if clip.annotations else None
                frames = [panel_row([colour_labels(rgb[t], preds[t], pal, skip_zero=bool(gt))]
                                    + ([colour_labels(rgb[t], gt[t], pal, skip_zero=True)] if gt else []),
                                    [f"propagated ({label})"] + (["ground truth"] if gt else []))
                          for t in range(len(preds))]
                gif = save_gif(os.path.join(out, f"{clip.name}_propagation.gif"), frames)
                section += f"<p>Label propagation with {html.escape(label)} features" + \
                           ("" if gt else " (frame 0's semantic slots as the seed labels)") + \
                           f":</p><img src='{os.path.basename(gif)}'>"
            if maps is not None and clip.annotations and label == feature_sets[0][0]:
                row.update(discovery_scores(clip, maps))
                row["candidates/frame"] = float(np.mean([m["candidates"].shape[0] for m in maps]))
            rows.append(row)
        clips_html += section
    fig_path = None
    if figure is not None:
        fig_path = os.path.join(out, "figure.png")
        Image.fromarray(figure).save(fig_path)
        clips_html = f"<img src='figure.png' alt='summary figure'>" + clips_html

    facts["evaluation"] = f"{len(clips)} clips at up to {args.max_height} px height, on {args.device}"
    facts["total time"] = f"{(time.time() - t_start) / 60:.1f} min"
    paper = ("the paper's ViT-S/16 results are DAVIS-2017 label propagation J&F 0.676 (67.6, Table 4) and "
             "DAVIS-2017-Unsupervised J&F 0.405 (40.5, Table 3; 44.8 in the SMTC README), on the full benchmarks at "
             "480p: see the README for the commands that reproduce those")
    if trained:
        statement = ("These numbers come from a tiny SMTC trained here for minutes on a handful of clips; they show "
                     "that the pipeline runs end to end, they are not the paper's results: " + paper + ".")
    else:
        statement = (f"The weights you gave, evaluated on {len(clips)} short clips at up to {args.max_height} px "
                     "height: a quick look, not the paper's protocol; " + paper + ".")
    preset_info = dataclasses.asdict(base)
    report = write_report(out, {"statement": statement, "facts": facts, "preset": preset_info}, rows, clips_html,
                          loss_png)
    eio.write_json(os.path.join(out, "metrics.json"), {"rows": rows, "facts": facts})
    cols = [c for c in REPORT_COLUMNS if any(c in r for r in rows)]
    print(eio.format_table([{c: r.get(c, "-") for c in cols} for r in rows], float_format="%.3f"))
    print(f"smtc demo: finished in {time.time() - t_start:.0f} s; report: {os.path.abspath(report)}")
    return 0

