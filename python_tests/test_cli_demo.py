"""The main job and the CLI as a whole (issue 6): `smtc demo --quick`, `smtc visualize`, `smtc bench`, every
subcommand's --help, and clear errors for wrong paths, bad checkpoints and unwritable output folders."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from smtc_fast import cli
from smtc_fast.models import SMTC, SMTCConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config():
    return SMTCConfig(backbone="vit_tiny_patch16_224", patch_size=8, depth=1, img_size=64, resolution=(64, 64),
                      num_slots=4, num_instances=2)


@pytest.fixture(scope="module")
def released_ckpt(tmp_path_factory):
    """A checkpoint in the released format ({'model_state_dict': official names}) of a tiny random model."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"iteration": 0, "model_state_dict": SMTC(tiny_config()).state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from smtc_fast.data import make_clip

    folder = tmp_path_factory.mktemp("clip") / "shapes"
    folder.mkdir()
    frames, _ = make_clip(5, 6, (48, 80))
    for t, f in enumerate(frames):
        Image.fromarray((f.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"{t:05d}.png")
    return str(folder)


def _valid_image(path, animated=False):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width > 32 and im.height > 32
        if animated:
            assert getattr(im, "n_frames", 1) > 1, f"{path} is not animated"


def _recomputed_demo_jf(out, clip, feature_fn, stride):
    """J&F and J of one demo row recomputed from the PNGs the demo wrote (the clip's frames and annotations):
    frame 0's annotation propagated with the dense PyTorch step (the demo calls the fused op), scored by
    metrics.evaluate_sequence (the demo calls evaluate_semisupervised) on the frames DAVIS scores, 1..T-2."""
    import dataclasses
    import glob

    from smtc_fast.evaluate import io as eio
    from smtc_fast.evaluate import metrics as M
    from smtc_fast.evaluate import propagation as P

    frames = sorted(glob.glob(str(out / "clips" / "JPEGImages" / clip / "*.png")))
    gt = np.stack([eio.read_label(p) for p in sorted(glob.glob(str(out / "clips" / "Annotations" / clip / "*.png")))])
    assert len(frames) == len(gt) == 8
    preset = dataclasses.replace(P.PRESETS["smtc-stride16"], map_scale=stride, image_multiple=stride)
    preds = np.stack([lab for _, lab in P.propagate_label_video(frames, gt[0], feature_fn, preset,
                                                                step=P.propagate_dense)])
    J, Fm = M.evaluate_sequence(gt[1:-1], preds[1:-1], "semi-supervised", n_objects=int(gt[0].max()))
    return (J.mean() + Fm.mean()) / 2, J.mean()


def test_demo_quick_writes_a_complete_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and str(out / "report.html") in printed
    html = (out / "report.html").read_text()
    for text in ("Training losses", "Metrics", "J&amp;F", "IoU (oracle selection)", "not the paper"):
        assert text in html, text
    _valid_image(out / "losses.png")
    _valid_image(out / "figure.png")
    for clip in ("synthetic-0", "synthetic-1"):
        _valid_image(out / f"{clip}_slots.gif", animated=True)
        _valid_image(out / f"{clip}_propagation.gif", animated=True)
        assert f"{clip}_slots.gif" in html and f"{clip}_propagation.gif" in html
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert {r["features"] for r in rows} == {"demo model", "colour (no learning)"}
    # every reported score, recomputed from what the demo wrote: the clips and the trained checkpoint
    from smtc_fast.evaluate.propagation import ColorFeatures, ViTTokens
    from smtc_fast.models import load_checkpoint

    model, _ = load_checkpoint(str(out / "train" / "last.pt"))
    features = {"demo model": (ViTTokens(model.eval()), model.encoder.stride),
                "colour (no learning)": (ColorFeatures(8), 8)}
    for r in rows:
        jf, j = _recomputed_demo_jf(out, r["clip"], *features[r["features"]])
        assert r["J&F"] == pytest.approx(jf, abs=1e-6) and r["J"] == pytest.approx(j, abs=1e-6), r
    # a re-run into the same folder works (idempotent) and gives the same numbers (seeded, deterministic on CPU)
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())["rows"]
    assert [r["J&F"] for r in again] == [r["J&F"] for r in rows]


def test_demo_with_a_checkpoint_and_user_frames(tmp_path, released_ckpt, clip_folder):
    """--checkpoint skips training; --data on a bare frame folder (no annotations) propagates frame 0's slots."""
    out = tmp_path / "demo"
    assert cli.main(["demo", "--checkpoint", released_ckpt, "--data", clip_folder, "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "official checkpoint" in html and "Training losses" not in html
    _valid_image(out / "shapes_slots.gif", animated=True)
    _valid_image(out / "shapes_propagation.gif", animated=True)


def test_visualize_renders_slots(tmp_path, released_ckpt, clip_folder, capsys):
    out = tmp_path / "vis"
    assert cli.main(["visualize", "--checkpoint", released_ckpt, "--clip", clip_folder, "--out", str(out),
                     "--iters", "2"]) == 0
    _valid_image(out / "shapes_slots.gif", animated=True)
    _valid_image(out / "shapes_slots.png")
    assert "candidate objects per frame" in capsys.readouterr().out


def test_slot_maps_partition_every_pixel(released_ckpt, clip_folder):
    from smtc_fast.evaluate.discovery import SMTCCandidates
    from smtc_fast.models import load_checkpoint
    from smtc_fast.visualize import read_clip, slot_maps

    model, _ = load_checkpoint(released_ckpt)
    rgb, names = read_clip(clip_folder)
    assert rgb.shape == (6, 48, 80, 3) and names[0] == "00000"
    maps = slot_maps(SMTCCandidates(model, 4, 2, (48, 80)), rgb)
    assert len(maps) == 6
    for m in maps:
        assert m["semantic"].shape == (48, 80) and 0 <= m["semantic"].min() and m["semantic"].max() < 4
        assert m["instance"].max() < 4 * model.config.num_instances  # P is not stored in the released format
        assert m["candidates"].shape[1:] == (48, 80) and m["candidates"].shape[0] == len(m["keys"])
    # the frame order and the windowing match the discovery evaluation's candidates exactly
    cands = SMTCCandidates(model, 4, 2, (48, 80))(rgb)
    assert [len(c[1]) for c in cands] == [len(m["keys"]) for m in maps]


def test_bench_command(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--clips", "1", "--tokens", "16", "--repeat", "1", "--json", str(path)]) == 0
    recs = json.loads(path.read_text())
    assert {r["op"].split(" ")[0] for r in recs} == {"correlation", "slot_aggregate", "sinkhorn", "propagate_labels"}
    for r in recs:
        assert r["kernel_ms"] > 0 and r["reference_ms"] > 0 and r["max_abs_diff"] < 1e-4, r
    assert "speed-up" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_documents_its_options(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: smtc " + command in text and "(default:" in text


def test_clear_errors_for_bad_input(tmp_path, released_ckpt, clip_folder, capsys):
    # a missing checkpoint
    assert cli.main(["visualize", "--checkpoint", str(tmp_path / "nope.pth"), "--clip", clip_folder]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    # a missing clip
    assert cli.main(["visualize", "--checkpoint", released_ckpt, "--clip", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "--clip" in err and "no such file" in err
    # a file that is not a checkpoint
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    assert cli.main(["visualize", "--checkpoint", str(junk), "--clip", clip_folder, "--out", str(tmp_path)]) == 2
    assert "not a readable torch checkpoint" in capsys.readouterr().err
    # a checkpoint of another architecture: the mismatched keys are listed
    sd = torch.load(released_ckpt, weights_only=True)["model_state_dict"]
    sd["extra.weight"] = torch.zeros(1)
    del sd["mlp_slot.0.bias"]
    other = tmp_path / "other.pth"
    torch.save({"model_state_dict": sd}, other)
    assert cli.main(["visualize", "--checkpoint", str(other), "--clip", clip_folder, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mlp_slot.0.bias" in err and "extra.weight" in err and "Traceback" not in err
    # an output folder that cannot be created (its parent is a file)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["demo", "--quick", "--out", str(blocker / "sub")]) == 2
    assert "--out" in capsys.readouterr().err
    # --data that does not exist
    assert cli.main(["demo", "--quick", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err


def test_mixed_clip_sources_interleave():
    from smtc_fast.data import MixedClips, SyntheticClips, open_clips

    a = SyntheticClips(num_frames=2, size=(16, 16), seed=1)
    b = SyntheticClips(num_frames=2, size=(16, 16), seed=2)
    mixed = MixedClips([a, b])
    assert torch.equal(mixed[4]["frames"], a[2]["frames"]) and torch.equal(mixed[5]["frames"], b[2]["frames"])
    assert set(mixed[3]) == {"frames", "index"} and mixed[3]["index"] == 3
    ds = open_clips("synthetic,synthetic", 2, 1, (16, 16), seed=3)
    assert isinstance(ds, MixedClips) and len(ds.sources) == 2


def test_demo_with_dino_weights_only(tmp_path):
    """--dino alone: DINO tokens propagate labels, nothing is trained and discovery is skipped (untrained head)."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    dino = tmp_path / "dino.pth"
    torch.save(vit.state_dict(), dino)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--dino", str(dino), "--out", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert {r["features"] for r in rows} == {"DINO ViT-S/16", "colour (no learning)"}
    assert all("IoU (oracle selection)" not in r for r in rows)
    _valid_image(out / "synthetic-0_propagation.gif", animated=True)
    assert not (out / "losses.png").exists()


def test_train_and_eval_errors_name_the_input(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "no_such_dir"), "--output", str(tmp_path / "run"),
                     "--steps", "1", "--quiet"]) == 2
    assert "no_such_dir" in capsys.readouterr().err
    assert cli.main(["train", "--dino", str(tmp_path / "dino.pth"), "--output", str(tmp_path / "run"),
                     "--steps", "1", "--quiet", "--backbone", "vit_tiny_patch16_224", "--depth", "1"]) == 2
    assert "dino.pth" in capsys.readouterr().err
    assert cli.main(["eval-discovery", "--root", str(tmp_path), "--checkpoint", str(tmp_path / "x.pth")]) == 2
    assert "x.pth" in capsys.readouterr().err
