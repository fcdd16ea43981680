"""`smtc eval-masks`: score any method's PNG masks with the official DAVIS J&F, faster.

A drop-in for davis2017-evaluation's `evaluation_method.py`: the same DAVIS layout, the same per-sequence protocol
(design/evaluation_protocols.md §1), the same printed tables and CSV columns, the same numbers (to 1e-6 on the
pinned fixtures). Differences, all deliberate:
- too many object ids is an error with exit status 2 (the official code calls sys.exit() with status 0);
- the CSVs are named after the task: global_results-<set>-<task>.csv (official: global_results-<set>.csv). The
  official script reuses a global_results-<set>.csv it finds in the results folder for ANY later run, even one
  for the other task (gotcha §0.6); with the task in our names neither tool ever reads the other's numbers.
  We overwrite ours every run and never read a CSV;
- `--matching per-frame` gives the SMTC repository's lenient unsupervised protocol (§1.8), clearly labelled;
- a JSON with full-precision global / per-object / per-frame values and an overlay image per sequence.

    smtc eval-masks --davis-root DAVIS --results RESULTS --task semi-supervised
    smtc eval-masks --davis-root DAVIS --results RESULTS --task unsupervised --matching per-frame
"""
import os
import sys
import time

import numpy as np

from smtc_fast.evaluate import io as eio
from smtc_fast.evaluate import metrics

# --kernel auto: the compiled semi-supervised scorer from this many scored frames on. Loading it means `import torch`
# (1.0-1.4 s a process on the CI machine); per object and 480p frame the numpy scorer takes 0.5-0.7 ms, the kernel
# 0.1-0.2 ms (bench_eval.py), so with DAVIS-2017's ~2 objects a frame the import pays from ~1500 frames.
KERNEL_MIN_FRAMES = 1500


def add_arguments(parser):
    parser.add_argument("--davis-root", required=True,
                        help="DAVIS root holding JPEGImages/, Annotations[_unsupervised]/ and ImageSets/ "
                             "(official --davis_path; its author-path default is useless, so required here)")
    parser.add_argument("--results", required=True,
                        help="folder with <seq>/<frame>.png indexed label maps (official --results_path)")
    parser.add_argument("--task", default="unsupervised", choices=["semi-supervised", "unsupervised"],
                        help="protocol (default from evaluation_method.py)")
    parser.add_argument("--matching", default="official", choices=list(metrics.MATCHINGS),
                        help="unsupervised only: 'official' = one Hungarian matching per sequence, <= 20 proposals "
                             "(davis2017-evaluation); 'per-frame' = the SMTC repository's copy, per-frame matching, "
                             "<= 300 proposals (protocol §1.8)")
    parser.add_argument("--max-proposals", type=int, default=None,
                        help="cap on proposal ids (unset: 20 for official, 300 for per-frame matching)")
    parser.add_argument("--set", default="val", help="subset: ImageSets/<year>/<set>.txt (default from "
                                                       "evaluation_method.py)")
    parser.add_argument("--resolution", default="480p", help="image / annotation folder (official default 480p)")
    parser.add_argument("--sequences", nargs="*", default=None,
                        help="score only these sequences (unset: all of the set's list)")
    parser.add_argument("--binary", action="store_true",
                        help="DAVIS-2016 style: every non-zero GT / prediction value is one object (a 0/255 PNG "
                             "would otherwise read 255 as void); sequence list from ImageSets/2016 when present")
    parser.add_argument("--json", default=None,
                        help="full-precision JSON summary (unset: <results>/eval_masks-<task>-<set>.json)")
    parser.add_argument("--overlays", default=None,
                        help="folder for one overlay per sequence (unset: <results>/overlays; '' = none)")
    parser.add_argument("--out", default=None,
                        help="folder for the CSVs and the JSON (unset: <results>, as the official tool)")
    parser.add_argument("--workers", type=int, default=metrics.default_workers(),
                        help="threads that decode PNGs and score frames (the numbers do not depend on it)")
    parser.add_argument("--kernel", default="auto", choices=["auto", "on", "off"],
                        help="semi-supervised: score with the compiled jf_counts kernel (on), the numpy scorer "
                             "(off), or the kernel from %d frames on (auto: `import torch` costs ~1 s, the numpy "
                             "scorer ~0.6 ms per object and frame); identical numbers" % KERNEL_MIN_FRAMES)


def sequence_list(davis_root, task, subset, binary=False):
    """Sequence names from ImageSets (2017 list; 2019 for the unsupervised test-dev / challenge sets, §1.1)."""
    years = ["2019" if task == "unsupervised" and subset in ("test-dev", "test-challenge") else "2017"]
    if binary:
        years.insert(0, "2016")
    for year in years:
        path = os.path.join(davis_root, "ImageSets", year, f"{subset}.txt")
        if os.path.isfile(path):
            with open(path) as f:
                return [line.strip() for line in f if line.strip()]
    raise eio.DataError(f"no sequence list: looked for ImageSets/{{{','.join(years)}}}/{subset}.txt in {davis_root}")


def annotation_dir(davis_root, task, resolution="480p"):
    sub = "Annotations" if task == "semi-supervised" else "Annotations_unsupervised"
    path = os.path.join(davis_root, sub, resolution)
    if not os.path.isdir(path):
        raise eio.DataError(f"annotation folder not found: {path} (task {task!r} reads {sub}/{resolution})")
    return path


def score_sequence(gt_paths, results_dir, seq, task, matching="official", max_proposals=None, binary=False,
                   workers=1, kernel=None):
    """Read one sequence's GT and predictions and score it. Returns (J (K, T), F (K, T), frame ids, gt, pred).
    workers: threads for decoding and scoring (metrics.default_workers() for all cores, up to 8); kernel: the
    semi-supervised scorer (metrics.diagonal_jf_labels: None = the compiled one when torch is loaded)."""
    ids = [os.path.splitext(os.path.basename(p))[0] for p in gt_paths]
    first = eio.read_label(gt_paths[0])
    if task == "semi-supervised":  # §1.5: first and last frame are not scored (and not read)
        gt_paths, ids = gt_paths[1:-1], ids[1:-1]
        gt = eio.read_label_stack(gt_paths, shape=first.shape, workers=workers)
    else:  # every frame, the first one decoded once
        gt = np.concatenate([first[None], eio.read_label_stack(gt_paths[1:], shape=first.shape, workers=workers)])
    if binary:
        first = eio.binarize_(first)
        gt = eio.binarize_(gt)  # 0/1 in place
    n_objects = int(np.where(first == 255, 0, first).max())  # §1.1: max id of the FIRST annotation
    pred_paths = [os.path.join(results_dir, seq, f"{i}.png") for i in ids]
    pred = eio.read_label_stack(pred_paths, shape=gt.shape[1:], workers=workers)
    if binary:
        pred = eio.binarize_(pred)
    try:
        J, F = metrics.evaluate_sequence(gt, pred, task, matching, max_proposals, n_objects=n_objects,
                                         workers=workers, kernel=kernel)
    except metrics.TooManyObjectsError as e:
        raise metrics.TooManyObjectsError(f"{os.path.join(results_dir, seq)}: {e}") from None
    return J, F, ids, gt, pred


def evaluate_davis(davis_root, results_dir, task, matching="official", subset="val", sequences=None,
                   max_proposals=None, binary=False, resolution="480p", overlays_dir=None, progress=True,
                   workers=1, kernel="auto"):
    """Score a results folder; returns the summary dict (also what --json writes).
    kernel: the semi-supervised scorer, "on" / "off" / "auto" (the compiled one from KERNEL_MIN_FRAMES frames)."""
    from tqdm import tqdm

    ann_root = annotation_dir(davis_root, task, resolution)
    seqs = sequences if sequences else sequence_list(davis_root, task, subset, binary)
    all_gt_paths = {seq: eio.list_frames(os.path.join(ann_root, seq), exts=(".png",)) for seq in seqs}
    use_kernel = _scorer_choice(kernel, task, sum(max(len(p) - 2, 0) for p in all_gt_paths.values()))
    per_object = {}
    per_frame = {}
    for seq in tqdm(seqs, desc="sequences", disable=not progress):
        J, F, ids, gt, pred = score_sequence(all_gt_paths[seq], results_dir, seq, task, matching, max_proposals,
                                             binary, workers, use_kernel)
        for k in range(J.shape[0]):  # official keys seq_1..seq_K (for unsupervised: in proposal order, §1.6)
            per_object[f"{seq}_{k + 1}"] = (J[k], F[k])
            per_frame[f"{seq}_{k + 1}"] = {"frames": ids, "J": J[k].tolist(), "F": F[k].tolist()}
        if overlays_dir:
            _overlay(davis_root, resolution, seq, ids, gt, pred, overlays_dir)
    glob, rows = metrics.summarize(per_object)
    protocol = task if task == "semi-supervised" else f"unsupervised, {matching} matching"
    return {"protocol": protocol, "task": task, "matching": matching if task == "unsupervised" else None,
            "set": subset, "davis_root": os.path.abspath(davis_root), "results": os.path.abspath(results_dir),
            "n_sequences": len(seqs), "n_objects": len(rows), "global": glob, "per_object": rows,
            "per_frame": per_frame}


def _scorer_choice(kernel, task, n_frames):
    """metrics.evaluate_sequence's `kernel` for --kernel on/off/auto (auto: the kernel when it is built and torch
    is loaded already (eval-prop) or n_frames >= KERNEL_MIN_FRAMES repays loading it; else the numpy scorer)."""
    if kernel not in ("auto", "on", "off"):
        raise ValueError(f"kernel must be 'auto', 'on' or 'off', got {kernel!r}")
    if kernel == "off" or task != "semi-supervised":
        return False
    if kernel == "on":
        return True
    if "torch" not in sys.modules and n_frames < KERNEL_MIN_FRAMES:
        return False
    try:
        import torch  # noqa: F401  (what metrics.jf_kernel's "auto" looks for)
    except ImportError:
        return False
    return None


def _overlay(davis_root, resolution, seq, ids, gt, pred, out_dir):
    """Middle scored frame of the sequence: prediction | ground truth, each over the frame (skipped without JPEGs)."""
    t = len(ids) // 2
    jpg = os.path.join(davis_root, "JPEGImages", resolution, seq, f"{ids[t]}.jpg")
    if not os.path.isfile(jpg):
        return
    eio.save_overlay(os.path.join(out_dir, f"{seq}.jpg"), eio.read_rgb(jpg), pred[t], gt[t])


def print_tables(summary, subset, elapsed=None, file=None):
    """The two tables evaluation_method.py prints (global, then per sequence = per object)."""
    file = file or sys.stdout  # looked up at call time (a default argument would pin the import-time stream)
    g = summary["global"]
    print(f"--------------------------- Global results for {subset} ---------------------------", file=file)
    print(eio.format_table([g]), file=file)
    print(f"\n---------- Per sequence results for {subset} ----------", file=file)
    rows = [{"Sequence": k, "J-Mean": v["J-Mean"], "F-Mean": v["F-Mean"]} for k, v in summary["per_object"].items()]
    print(eio.format_table(rows), file=file)
    if elapsed is not None:
        print(f"\nTotal time:{elapsed}", file=file)


def task_tag(task, matching="official"):
    """The protocol in a file name: 'semi-supervised', 'unsupervised' or 'unsupervised-per-frame'."""
    return task if task == "semi-supervised" or matching == "official" else f"{task}-{matching}"


def csv_paths(out_dir, subset, task, matching="official"):
    """The official CSV names with the protocol added, so neither tool reuses the other's numbers (module doc)."""
    tag = task_tag(task, matching)
    return (os.path.join(out_dir, f"global_results-{subset}-{tag}.csv"),
            os.path.join(out_dir, f"per-sequence_results-{subset}-{tag}.csv"))


def write_outputs(summary, out_dir, subset, json_path):
    """The official tables and %.3f under task-named CSVs (overwritten every run), our full-precision JSON and CSV."""
    g = summary["global"]
    global_csv, per_seq_csv = csv_paths(out_dir, subset, summary["task"], summary["matching"] or "official")
    eio.write_csv(global_csv, [g], float_format="%.3f")
    rows = [{"Sequence": k, "J-Mean": v["J-Mean"], "F-Mean": v["F-Mean"]} for k, v in summary["per_object"].items()]
    eio.write_csv(per_seq_csv, rows, float_format="%.3f")
    full = [{"object": k, **v} for k, v in summary["per_object"].items()]
    eio.write_csv(os.path.splitext(json_path)[0] + "-per_object.csv", full)
    eio.write_json(json_path, summary)


def run(args):
    t0 = time.time()
    print(f"Evaluating sequences for the {args.task} task"
          + (f" ({args.matching} matching)" if args.task == "unsupervised" else "") + "...")
    overlays = os.path.join(args.results, "overlays") if args.overlays is None else args.overlays
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.kernel == "on" and args.task == "semi-supervised":
        try:
            metrics.jf_kernel(True)  # say now, not after decoding the first sequence, when it cannot load
        except RuntimeError as e:
            print(f"smtc eval-masks: error: --kernel on: {e}", file=sys.stderr)
            return 2
    try:
        summary = evaluate_davis(args.davis_root, args.results, args.task, args.matching, args.set,
                                 args.sequences, args.max_proposals, args.binary, args.resolution, overlays,
                                 workers=args.workers, kernel=args.kernel)
    except (eio.DataError, metrics.TooManyObjectsError) as e:
        print(f"smtc eval-masks: error: {e}", file=sys.stderr)
        return 2
    out_dir = args.out or args.results
    os.makedirs(out_dir, exist_ok=True)
    json_path = args.json or os.path.join(out_dir, f"eval_masks-{task_tag(args.task, args.matching)}-{args.set}.json")
    summary["seconds"] = time.time() - t0
    write_outputs(summary, out_dir, args.set, json_path)
    print_tables(summary, args.set, time.time() - t0)
    official_cache = os.path.join(args.results, f"global_results-{args.set}.csv")
    if os.path.isfile(official_cache):
        print(f"\nnote: {official_cache} (the official tool's cache, which it reuses for any task) was not read")
    csvs = csv_paths(out_dir, args.set, args.task, args.matching)
    print(f"\nwrote {json_path}, {csvs[0]} and {csvs[1]}")
    return 0
