"""`smtc eval-masks`, `smtc eval-prop`, `smtc eval-discovery` end to end on tiny DAVIS-layout fixtures."""
import functools
import json
import os
import shutil

import numpy as np
import pytest
import torch

from smtc_fast.cli import main
from smtc_fast.evaluate import discovery as Dsc
from smtc_fast.evaluate import io as eio
from smtc_fast.evaluate import metrics as M

DATA = os.path.join(os.path.dirname(__file__), "data")
D16 = os.path.join(DATA, "davis2016")
PRED = os.path.join(DATA, "davis2017_predictions")


def _davis_root(tmp_path, seqs=("blackswan",), n_frames=12, unsupervised_from=None):
    """A DAVIS-2017-layout root: JPEGs, indexed 0/1 annotations made from the DAVIS-2016 GT, a val list."""
    root = tmp_path / "DAVIS"
    for seq in seqs:
        (root / "JPEGImages/480p" / seq).mkdir(parents=True)
        for i in range(n_frames):
            shutil.copy(os.path.join(D16, "JPEGImages/480p", seq, f"{i:05d}.jpg"), root / "JPEGImages/480p" / seq)
            lab = (eio.read_label(os.path.join(D16, "Annotations/480p", seq, f"{i:05d}.png")) > 0).astype(np.uint8)
            eio.write_indexed_png(str(root / "Annotations/480p" / seq / f"{i:05d}.png"), lab)
            eio.write_indexed_png(str(root / "Annotations_unsupervised/480p" / seq / f"{i:05d}.png"), lab)
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("\n".join(seqs) + "\n")
    return root


def _jf_from_pngs(root, out, seq, n_frames):
    """J&F recomputed from the PNGs a command wrote, with the metrics module on the frames DAVIS scores (1..T-2,
    one object); J also as a plain IoU. Returns (J&F, J, predicted id maps (T, H, W))."""
    gt = np.stack([eio.read_label(str(root / "Annotations/480p" / seq / f"{i:05d}.png")) for i in range(n_frames)])
    pred = np.stack([eio.read_label(str(out / seq / f"{i:05d}.png")) for i in range(n_frames)])
    J, Fm = M.evaluate_sequence(gt[1:-1], pred[1:-1], "semi-supervised", n_objects=1)
    iou = [((g == 1) & (p == 1)).sum() / ((g == 1) | (p == 1)).sum() for g, p in zip(gt[1:-1], pred[1:-1])]
    assert J.mean() == pytest.approx(np.mean(iou), abs=1e-12)
    return (J.mean() + Fm.mean()) / 2, J.mean(), pred


@functools.lru_cache(maxsize=None)
def _brute_force_blackswan(n_frames):
    """Frames 0..n_frames-1 of blackswan, colour features, SMTC stride-16 settings, through the brute-force step."""
    from test_eval_propagation import brute_force_step

    from smtc_fast.evaluate import propagation as P

    frames = [os.path.join(D16, "JPEGImages/480p/blackswan", f"{i:05d}.jpg") for i in range(n_frames)]
    first = (eio.read_label(os.path.join(D16, "Annotations/480p/blackswan/00000.png")) > 0).astype(np.uint8)
    return np.stack([lab for _, lab in P.propagate_label_video(frames, first, P.ColorFeatures(8),
                                                               P.PRESETS["smtc-stride16"], step=brute_force_step)])


def test_eval_masks_semi_supervised_matches_pinned(tmp_path, capsys):
    root = tmp_path / "DAVIS16"
    (root / "ImageSets/2016").mkdir(parents=True)
    (root / "ImageSets/2016/val.txt").write_text("blackswan\ncar-shadow\n")
    shutil.copytree(os.path.join(D16, "Annotations"), root / "Annotations")
    res = tmp_path / "res"
    for seq in ("blackswan", "car-shadow"):
        shutil.copytree(os.path.join(PRED, "osvos_semi", seq), res / seq)
    (res / "global_results-val.csv").write_text("stale,from,a,previous,run\n")  # must not be reused
    rc = main(["eval-masks", "--davis-root", str(root), "--results", str(res), "--task", "semi-supervised",
               "--binary"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Global results for val" in out and "0.940731" in out and "blackswan_1" in out
    summary = json.load(open(res / "eval_masks-semi-supervised-val.json"))
    assert abs(summary["global"]["J&F-Mean"] - 0.940731) <= 1e-6
    # the official names plus the task (the official tool would reuse a plain global_results-val.csv for any task)
    assert (res / "global_results-val-semi-supervised.csv").read_text().splitlines()[1].startswith("0.941,0.936,1.000")
    assert os.path.isfile(res / "per-sequence_results-val-semi-supervised.csv")
    assert (res / "global_results-val.csv").read_text() == "stale,from,a,previous,run\n"  # neither read nor written


def test_eval_masks_too_many_ids_and_missing_file(tmp_path, capsys):
    root = _davis_root(tmp_path, n_frames=4)
    res = tmp_path / "res" / "blackswan"
    res.mkdir(parents=True)
    for i in range(4):
        lab = eio.read_label(str(root / "Annotations/480p/blackswan" / f"{i:05d}.png")).copy()
        lab[:5, :5] = 2  # an id the GT does not have
        eio.write_indexed_png(str(res / f"{i:05d}.png"), lab)
    rc = main(["eval-masks", "--davis-root", str(root), "--results", str(tmp_path / "res"),
               "--task", "semi-supervised"])
    assert rc == 2
    assert "object id 2" in capsys.readouterr().err
    os.remove(res / "00002.png")
    rc = main(["eval-masks", "--davis-root", str(root), "--results", str(tmp_path / "res"),
               "--task", "semi-supervised"])
    assert rc == 2
    assert "00002.png" in capsys.readouterr().err


def test_eval_masks_size_mismatch_names_file(tmp_path, capsys):
    root = _davis_root(tmp_path, n_frames=3)
    res = tmp_path / "res" / "blackswan"
    res.mkdir(parents=True)
    for i in range(3):
        eio.write_indexed_png(str(res / f"{i:05d}.png"), np.zeros((240, 427), np.uint8))
    rc = main(["eval-masks", "--davis-root", str(root), "--results", str(tmp_path / "res"),
               "--task", "unsupervised", "--matching", "per-frame"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "00000.png" in err and "427x240" in err


@pytest.mark.parametrize("step_args,kernel", [([], "fused"), (["--dense"], "dense"), (["--kernel", "dense"], "dense")])
def test_eval_prop_cli_colour_features(tmp_path, capsys, step_args, kernel):
    """The fused operator by default, the dense PyTorch step with --dense (or --kernel dense): the same scores."""
    root = _davis_root(tmp_path, n_frames=6)
    out = tmp_path / "prop"
    rc = main(["eval-prop", "--root", str(root), "--out", str(out), "--features", "color",
               "--preset", "smtc-stride16", "--device", "cpu"] + step_args)
    assert rc == 0
    summary = json.load(open(out / "eval_prop-davis.json"))
    assert summary["kernel"] == kernel
    # the pipeline of the pinned propagation test on frames 0-5 (scored: 1-4), SMTC stride-16 settings. Pinned from
    # our own output: it catches a change, not an error. The independent checks: the written PNGs scored by the
    # metrics module give the reported J&F, and they are the labels of the brute-force propagation step.
    assert summary["global"]["J&F-Mean"] == pytest.approx(0.844827, abs=2e-4)
    jf, j, preds = _jf_from_pngs(root, out, "blackswan", 6)
    assert summary["global"]["J&F-Mean"] == pytest.approx(jf, abs=1e-9)
    assert summary["global"]["J-Mean"] == pytest.approx(j, abs=1e-9)
    assert np.array_equal(preds, _brute_force_blackswan(6))
    assert summary["settings"]["topk"] == 7 and summary["settings"]["radius"] == 7
    pngs = sorted(os.listdir(out / "blackswan"))
    assert pngs[0] == "00000.png" and len(pngs) == 6
    from PIL import Image
    assert Image.open(out / "blackswan" / "00005.png").mode == "P"
    assert os.path.isfile(out / "overlays" / "blackswan.jpg")
    assert os.path.isfile(out / "eval_prop-davis-per_object.csv")


def test_eval_prop_empty_first_annotation(tmp_path, capsys):
    root = _davis_root(tmp_path, n_frames=3)
    eio.write_indexed_png(str(root / "Annotations/480p/blackswan/00000.png"), np.zeros((480, 854), np.uint8))
    rc = main(["eval-prop", "--root", str(root), "--out", str(tmp_path / "o"), "--features", "color"])
    assert rc == 2
    assert "00000.png" in capsys.readouterr().err


class _GTProducer:
    """A mask producer that returns, per frame, the GT foreground on a 30x53 grid (plus an empty-ish distractor)."""

    def __init__(self, root, seq):
        self.gts = [eio.read_label(os.path.join(root, "Annotations_unsupervised/480p", seq, f))
                    for f in sorted(os.listdir(os.path.join(root, "Annotations_unsupervised/480p", seq)))]

    def __call__(self, rgb):
        out = []
        for g in self.gts[:rgb.shape[0]]:
            m = torch.nn.functional.interpolate(torch.as_tensor(g > 0).float()[None, None], size=(30, 53),
                                                mode="area")[0]
            bg = 1 - m
            out.append((torch.cat([m, bg]), [(0, 0), (1, 2)]))
        return out


def test_discovery_multi_with_perfect_candidates(tmp_path):
    root = _davis_root(tmp_path, n_frames=6)
    s = Dsc.evaluate_multi(str(root), _GTProducer(str(root), "blackswan"), str(tmp_path / "o"), progress=False)
    # a candidate equal to the (downsampled, re-upsampled) GT: high, and the same under both matchings here
    jf_o = s["official"]["global"]["J&F-Mean"]
    jf_p = s["per-frame"]["global"]["J&F-Mean"]
    assert 0.8 < jf_o <= 1.0 and jf_p == pytest.approx(jf_o, abs=1e-12)
    assert s["official_proposals_kept"]["blackswan"] == [[0, 0], [1, 2]]


def _tiny_checkpoint(tmp_path):
    """A random one-block ViT-S/16 SMTC saved the way smtc_fast.train saves checkpoints."""
    from smtc_fast.models import SMTC, SMTCConfig

    cfg = SMTCConfig(depth=1, resolution=(64, 64), num_slots=4, num_instances=2)
    torch.manual_seed(0)
    model = SMTC(cfg)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"format": "smtc_fast", "model_config": json.dumps(cfg.to_dict()), "student": model.state_dict(),
                "teacher": model.state_dict()}, ckpt)
    return ckpt, model


def test_eval_prop_cli_smtc_checkpoint_tokens(tmp_path):
    """--features smtc: the checkpoint's encoder tokens (un-normed last block) on the 30 x 53 grid."""
    from smtc_fast.evaluate import propagation as P
    from smtc_fast.models import vit_forward

    ckpt, model = _tiny_checkpoint(tmp_path)
    root = _davis_root(tmp_path, n_frames=3)
    out = tmp_path / "prop"
    assert main(["eval-prop", "--root", str(root), "--out", str(out), "--features", "smtc", "--checkpoint",
                 str(ckpt), "--device", "cpu", "--no-overlays"]) == 0
    summary = json.load(open(out / "eval_prop-davis.json"))
    assert len(os.listdir(out / "blackswan")) == 3
    jf, j, _ = _jf_from_pngs(root, out, "blackswan", 3)  # the reported scores are those of the written PNGs
    assert summary["global"]["J&F-Mean"] == pytest.approx(jf, abs=1e-9)
    assert summary["global"]["J-Mean"] == pytest.approx(j, abs=1e-9)
    # the features are the image resized to 480 x 848, through the encoder, last block without the final norm
    img = P.normalize_images(eio.read_rgb(str(root / "JPEGImages/480p/blackswan/00000.jpg"))[None])
    feats = P.ViTTokens(model)(img)
    assert feats.shape == (1, 384, 30, 53)
    small = torch.nn.functional.interpolate(img, size=(480, 848), mode="bilinear", align_corners=False)
    _, tok, _ = vit_forward(model.eval().encoder, small, return_tokens=True)
    torch.testing.assert_close(feats, tok.transpose(1, 2).reshape(1, 384, 30, 53))


def test_discovery_cli_tiny_smtc_checkpoint(tmp_path):
    ckpt, _ = _tiny_checkpoint(tmp_path)
    root = _davis_root(tmp_path, n_frames=5)
    out = tmp_path / "disc"
    args = ["eval-discovery", "--root", str(root), "--checkpoint", str(ckpt), "--out", str(out),
            "--resolution", "64", "96", "--device", "cpu"]
    assert main(args) == 0
    s1 = json.load(open(out / "eval_discovery-davis2017.json"))
    assert set(s1["per-frame"]["global"]) >= {"J&F-Mean", "J-Mean", "F-Mean"}
    assert len(os.listdir(out / "blackswan")) == 5
    assert main(args) == 0  # seeded: a second run gives the same numbers
    s2 = json.load(open(out / "eval_discovery-davis2017.json"))
    assert s1["global"] == s2["global"]


def test_discovery_single_object_davis2016_layout(tmp_path):
    """Single-object IoU pooled over frames: a GT-shaped candidate plus its complement (a background slot).
    The oracle keeps only the object; merging every candidate covers the whole frame."""
    root = tmp_path / "DAVIS2016"
    for sub in ("JPEGImages/480p/blackswan", "Annotations/480p/blackswan"):
        (root / sub).mkdir(parents=True)
    for i in range(4):
        shutil.copy(os.path.join(D16, "JPEGImages/480p/blackswan", f"{i:05d}.jpg"), root / "JPEGImages/480p/blackswan")
        shutil.copy(os.path.join(D16, "Annotations/480p/blackswan", f"{i:05d}.png"), root / "Annotations/480p/blackswan")

    class Producer:
        def __call__(self, rgb):
            out = []
            for i in range(rgb.shape[0]):
                g = eio.read_label(str(root / "Annotations/480p/blackswan" / f"{i:05d}.png")) > 0
                m = torch.as_tensor(g).float()[None]
                out.append((torch.cat([m, 1 - m]), [(0, 0), (1, 0)]))
            return out

    s = Dsc.evaluate_single(str(root), "davis2016", Producer(), str(tmp_path / "o"), sequences=["blackswan"],
                            progress=False)
    assert s["global"]["frames"] == 4
    assert s["global"]["IoU (oracle selection)"] == pytest.approx(1.0, abs=1e-9)
    fg = np.mean([(eio.read_label(str(root / "Annotations/480p/blackswan" / f"{i:05d}.png")) > 0).mean()
                  for i in range(4)])
    assert s["global"]["IoU (all candidates)"] == pytest.approx(fg, rel=0.05)
    assert os.path.isfile(tmp_path / "o" / "overlays" / "blackswan.jpg")


def _fg_producer(masks_per_frame):
    """Candidates = the given (H, W) bool foreground per frame (None: no candidate)."""
    def produce(rgb):
        out = []
        for m in masks_per_frame[:rgb.shape[0]]:
            if m is None:
                out.append((torch.zeros(0, 4, 4), []))
            else:
                out.append((torch.as_tensor(m).float()[None], [(0, 0)]))
        return out
    return produce


def test_discovery_segtrack_multi_object_merge_and_fbms_sparse(tmp_path):
    from PIL import Image

    h, w = 40, 60
    rgb = np.zeros((h, w, 3), np.uint8)
    a = np.zeros((h, w), bool)
    a[5:15, 5:20] = True
    b = np.zeros((h, w), bool)
    b[20:35, 30:50] = True
    # SegTrack-v2 original layout: GroundTruth/<seq>/1/, 2/ are merged into one foreground
    st = tmp_path / "STv2"
    for i in range(3):
        for sub, m in (("1", a), ("2", b)):
            (st / "GroundTruth/seqA" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray((m * 255).astype(np.uint8)).save(st / "GroundTruth/seqA" / sub / f"{i:05d}.png")
        (st / "JPEGImages/seqA").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(st / "JPEGImages/seqA" / f"{i:05d}.jpg")
    s = Dsc.evaluate_single(str(st), "segtrackv2", _fg_producer([a | b] * 3), str(tmp_path / "o1"), progress=False)
    assert s["global"]["frames"] == 3 and s["global"]["IoU (oracle selection)"] == pytest.approx(1.0)
    s = Dsc.evaluate_single(str(st), "segtrackv2", _fg_producer([a] * 3), str(tmp_path / "o2"), progress=False)
    assert s["global"]["IoU (oracle selection)"] == pytest.approx(a.sum() / (a | b).sum())
    # FBMS: sparse annotations 00000.png and 00004.png of a 6-frame video -> frames 0 and 4 only
    fb = tmp_path / "FBMSroot"
    (fb / "FBMS/cars1").mkdir(parents=True)
    (fb / "FBMS_annotation/cars1").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rgb).save(fb / "FBMS/cars1" / f"{i:05d}.jpg")
    for i in (0, 4):
        Image.fromarray((a * 255).astype(np.uint8)).save(fb / "FBMS_annotation/cars1" / f"{i:05d}.png")
    masks = [None, a, a, a, a, a]  # frame 0 has no candidate: IoU 0 there, 1 at frame 4
    s = Dsc.evaluate_single(str(fb), "fbms", _fg_producer(masks), str(tmp_path / "o3"), progress=False)
    assert s["global"]["frames"] == 2
    assert s["global"]["IoU (oracle selection)"] == pytest.approx(0.5)


def test_eval_masks_unsupervised_pinned_both_matchings(tmp_path, capsys):
    root = tmp_path / "DAVIS"
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("judo\ndogs-jump\n")
    res = tmp_path / "res"
    for seq in ("judo", "dogs-jump"):
        shutil.copytree(os.path.join(PRED, "osvos_semi", seq), root / "Annotations_unsupervised/480p" / seq)
        shutil.copytree(os.path.join(PRED, "rvos_unsup", seq), res / seq)
    got = {}
    for matching in ("official", "per-frame"):
        assert main(["eval-masks", "--davis-root", str(root), "--results", str(res), "--task", "unsupervised",
                     "--matching", matching, "--json", str(tmp_path / f"{matching}.json")]) == 0
        got[matching] = json.load(open(tmp_path / f"{matching}.json"))
    assert abs(got["official"]["global"]["J&F-Mean"] - 0.37214) <= 5e-6  # evaluation_protocols.md §1.9
    assert got["official"]["protocol"] == "unsupervised, official matching"
    assert got["per-frame"]["global"]["J&F-Mean"] >= got["official"]["global"]["J&F-Mean"]
