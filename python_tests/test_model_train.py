"""The trainer (issue 3): schedule, param groups, resume exactness, DDP equivalence, signals, NaN stop, data
loaders, and that learning improves object discovery on synthetic clips."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from smtc_fast.data import FrameFolderClips, VideoFileClips, augment_clips, make_clip, open_clips
from smtc_fast.models import SMTC, SMTCConfig, load_checkpoint
from smtc_fast.testing import kernel_ran
from smtc_fast.train import TrainConfig, discovery_iou, lr_at, param_groups, set_lr, train

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--backbone", "vit_tiny_patch16_224", "--patch-size", "8", "--depth", "2", "--img-size", "64",
        "--resolution", "64", "64", "--num-slots", "4", "--num-instances", "3"]


def tiny_model(**kw):
    base = dict(backbone="vit_tiny_patch16_224", patch_size=8, depth=2, img_size=64, resolution=(64, 64),
                num_slots=4, num_instances=3)
    base.update(kw)
    return SMTCConfig(**base)


def tiny_train(tmp, **kw):
    base = dict(output=str(tmp), steps=4, batch_size=2, lr=1e-3, grad_iter=2, workers=0, log_every=1,
                save_every=1000, quiet=True, amp=False,  # parity tests stay float32 (bf16: test_cpu_bf16.py)
                keep_cpu_memory=False)  # a process-wide malloc setting: only the `smtc train` subprocesses set it
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_schedule_covers_every_step_and_groups():
    cfg = TrainConfig(steps=7, lr=1.0, min_lr_ratio=0.1, grad_iter=3, encoder_lr_mult=0.01)
    lrs = [lr_at(cfg, s) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    model = SMTC(tiny_model())
    groups = param_groups(model, 0.1)
    assert [g["name"] for g in groups] == ["encoder", "encoder_no_decay", "head", "head_no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    opt = torch.optim.AdamW(groups)
    set_lr(opt, cfg, 2)
    assert [g["lr"] for g in opt.param_groups][:2] == [0.0, 0.0]
    set_lr(opt, cfg, 3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * lr_at(cfg, 3))
    assert opt.param_groups[2]["lr"] == pytest.approx(lr_at(cfg, 3))


def test_resume_continues_exactly(tmp_path):
    full = train(tiny_train(tmp_path / "full"), tiny_model())
    # the same run interrupted after step 2 (checkpoint written on the way out), then resumed to 4
    half = train(tiny_train(tmp_path / "int", stop_at=2), tiny_model())
    assert half["step"] == 2
    resumed = train(tiny_train(tmp_path / "int", steps=4, resume="auto"), tiny_model())
    assert resumed["step"] == 4
    for (k, a), b in zip(full["student"].state_dict().items(), resumed["student"].state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(full["teacher"].state_dict().values(), resumed["teacher"].state_dict().values()):
        assert torch.equal(a, b)
    assert read_metrics(tmp_path / "full")[-1]["loss"] == read_metrics(tmp_path / "int")[-1]["loss"]
    ckpt = torch.load(tmp_path / "int" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and {"student", "teacher", "optimizer", "scheduler", "rng", "train_config"} <= set(ckpt)
    model, kind = load_checkpoint(str(tmp_path / "int" / "last.pt"))
    assert kind == "smtc_fast"


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    import smtc_fast.losses as losses
    import smtc_fast.train as tr

    calls = {"n": 0}
    real = losses.semantic_loss

    def flaky(*args, **kw):
        calls["n"] += 1
        out = real(*args, **kw)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(losses, "semantic_loss", flaky)  # what the trainer's step_losses calls
    summary = train(tiny_train(tmp_path, steps=5, save_every=1), tiny_model())
    assert summary["exit_code"] == tr.EXIT_NONFINITE and "loss is nan at step 2" in summary["message"]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2


def _cli(tmp, *extra, world=1):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    args = ["train", "--output", str(tmp), "--batch-size", str(4 // world), "--workers", "0", "--log-every", "1",
            "--lr", "1e-3", "--grad-iter", "0", "--drop-path-rate", "0", "--quiet", "--no-amp", *TINY, *extra]
    if world == 1:
        cmd = [sys.executable, "-m", "smtc_fast.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "smtc_fast.cli", *args]
    return cmd, env


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    """Global batch 4: one process x 4 clips vs two gloo processes x 2 clips -> the same losses and weights."""
    for world in (1, 2):
        cmd, env = _cli(tmp_path / f"w{world}", "--steps", "3", "--device", "cpu", world=world)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_metrics(tmp_path / "w1"), read_metrics(tmp_path / "w2")
    assert len(one) == len(two) == 3
    print("DDP vs single-process max |loss diff| per step:", [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)])
    for a, b in zip(one, two):
        for k in ("loss", "sem", "reg", "obj"):
            assert a[k] == pytest.approx(b[k], abs=2e-5), (a["step"], k, a[k], b[k])
    w1 = torch.load(tmp_path / "w1" / "last.pt", weights_only=True)["student"]
    w2 = torch.load(tmp_path / "w2" / "last.pt", weights_only=True)["student"]
    print("DDP vs single-process max |weight diff| after 3 steps:", max((w1[k] - w2[k]).abs().max().item() for k in w1))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=2e-4, rtol=1e-3, msg=k)


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(tmp_path):
    cmd, env = _cli(tmp_path, "--steps", "100000", "--device", "cpu")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    k = ckpt["step"]
    assert k >= 2 and "interrupted: checkpoint saved" in err
    # resume the killed run for 2 more steps; it must end where an uninterrupted run with the same schedule ends
    cmd, env = _cli(tmp_path, "--steps", "100000", "--device", "cpu", "--resume", "auto", "--stop-at", str(k + 2))
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0
    cmd, env = _cli(tmp_path / "ref", "--steps", "100000", "--device", "cpu", "--stop-at", str(k + 2))
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0
    a = torch.load(tmp_path / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == k + 2
    for key in b["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key


def test_frame_folder_and_video_datasets(tmp_path):
    frames, _ = make_clip(0, num_frames=12, size=(48, 64))
    u8 = (frames.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    for v in ("vidA", "vidB"):
        d = tmp_path / "ytvos" / "JPEGImages" / v
        d.mkdir(parents=True)
        for t, img in enumerate(u8):
            Image.fromarray(img).save(d / f"{t:05d}.jpg", quality=95)
    ds = open_clips(str(tmp_path / "ytvos"), num_frames=4, gap=2, size=(32, 32), seed=1)
    assert isinstance(ds, FrameFolderClips)
    item = ds[5]
    assert item["frames"].shape == (4, 3, 32, 32) and 0 <= item["frames"].min() and item["frames"].max() <= 1
    assert torch.equal(ds[5]["frames"], item["frames"])  # a pure function of (seed, index)

    import av

    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for img in u8:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    vds = open_clips(path, num_frames=4, gap=2, size=(48, 64), seed=1)
    assert isinstance(vds, VideoFileClips) and vds.num_frames_of(path) == 12
    clip = vds[3]["frames"]
    assert clip.shape == (4, 3, 48, 64)
    # decoded frames are the encoded synthetic frames (lossy codec: loose tolerance)
    errs = [min((clip[k] - frames[t]).abs().mean().item() for t in range(12)) for k in range(4)]
    assert max(errs) < 0.06


def test_augmentation_same_params_over_frames():
    frames, _ = make_clip(1, num_frames=3, size=(32, 32))
    same = frames[:1].repeat(3, 1, 1, 1)  # three identical frames
    out = augment_clips(torch.stack([same, same]), [5, 6], crop_and_flip=True)
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])
    assert not torch.allclose(out[0], out[1])
    again = augment_clips(torch.stack([same, same]), [5, 6], crop_and_flip=True)
    assert torch.equal(out, again)


def _learning_run(tmp_path, steps, clips):
    mc = tiny_model(drop_path_rate=0.0)
    torch.manual_seed(0)  # train() seeds with 0 too, so the trained run starts from these initial weights
    before = discovery_iou(SMTC(mc), num_clips=clips)
    summary = train(tiny_train(tmp_path, steps=steps, batch_size=4, grad_iter=0, encoder_lr_mult=1.0,
                               log_every=50), mc)
    after = discovery_iou(summary["student"], num_clips=clips)
    print(f"discovery after {steps} steps: before {before} after {after}")
    return before, after


def test_learning_improves_discovery(tmp_path):
    """150 CPU steps (~25 s) on synthetic clips clearly improve foreground discovery over the untrained model
    (measured: fg IoU 0.34 -> 0.55 on 16 held-out clips)."""
    before, after = _learning_run(tmp_path, 150, 12)
    assert after["fg_iou"] > before["fg_iou"] + 0.08


@pytest.mark.slow
def test_learning_improves_discovery_longer(tmp_path):
    """600 steps. On this tiny config (random-init 2-block ViT at 64x64) fg IoU jumps from ~0.34 to ~0.4-0.6 in the
    first 150-300 steps and then plateaus (measured every 150 steps up to 900: 0.58 0.60 0.48 0.54 0.52 0.53). The
    plateau is chaotic: float-level differences between kernel builds moved the 600-step value from 0.44-0.58 to
    0.415 (the same with SMTC_FAST_FORCE_REFERENCE=1), so the check is that longer training stays clearly above the
    untrained model."""
    before, after = _learning_run(tmp_path, 600, 16)
    assert after["fg_iou"] > before["fg_iou"] + 0.05


def test_paper_variants_and_init_train_end_to_end(tmp_path, capsys):
    """Every paper option (spec §5.1) wired through the trainer, starting from a released-format checkpoint."""
    mc = tiny_model(slot_update="gru", stage2_mask="prob")
    torch.manual_seed(1)
    released = SMTC(mc).state_dict()
    torch.save({"iteration": 0, "model_state_dict": released}, tmp_path / "released.pth")
    summary = train(tiny_train(tmp_path / "run", steps=2, marginals="uniform", cost="neg_cos", obj_variant="l2",
                               ema_encoder=True, crop_flip=True, grad_iter=0, init=str(tmp_path / "released.pth"),
                               lr=0.0, ema=1.0), mc)
    assert summary["exit_code"] == 0 and "(official checkpoint)" in capsys.readouterr().out
    assert all(torch.isfinite(torch.tensor(summary["last"][k])) for k in ("loss", "sem", "reg", "obj"))
    # lr 0 and momentum 1: neither network moved away from the released weights (the encoder EMA included)
    for k, v in summary["teacher"].state_dict().items():
        assert torch.equal(v, released[k]), k


def test_ema_skips_the_encoder_unless_asked():
    from smtc_fast.train import ema_update

    torch.manual_seed(0)
    student, teacher = SMTC(tiny_model()), SMTC(tiny_model())
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.75, include_encoder=False)
    s = student.state_dict()
    for k, v in teacher.state_dict().items():
        want = t0[k] if k.startswith("encoder.") else 0.75 * t0[k] + 0.25 * s[k]
        torch.testing.assert_close(v, want, msg=k)
    ema_update(teacher, student, 0.0, include_encoder=True)
    assert torch.equal(teacher.encoder.pos_embed, student.encoder.pos_embed)


def test_trainer_defaults_are_the_official_recipe():
    """Spec §1.6, §2, §3.3: the defaults define the method. Tests that pass these values explicitly cannot see a
    changed default, so each is pinned here against the spec."""
    official = dict(
        sinkhorn_eps=0.05, sinkhorn_iters=3,        # §2.1 sinkhorn_cluster: K = exp(-M / 0.05), 3 iterations
        marginals="norm", cost="one_minus_cos",     # §2.1 (paper Eq. 8 is the named option)
        w_sem=1.0, w_reg=1.0,                       # §2: cons_scale = ent_scale = 1.0; L_obj weight 1
        obj_variant="cos", obj_margin=0.5,          # §2.3: hinge relu(cos - 0.5) on the negatives
        ema=0.999, ema_encoder=False,               # §1.6: constant momentum, the encoder is not EMA'd
        lr=2e-5, min_lr_ratio=0.1, weight_decay=0.1,  # §3.3: cosine lr -> 0.1 lr, wd 0.1 on weights
        grad_iter=3000, encoder_lr_mult=0.01,       # §1.6: encoder lr x0 before 3000 steps, x0.01 after
        steps=10000, batch_size=32, num_frames=4, gap=4, seed=0,  # §3.3 start_twostage.sh, per GPU
        augment=True, crop_flip=False,              # §3.4: the photometric augmentation only
    )
    cfg = TrainConfig()
    assert {k: getattr(cfg, k) for k in official} == official


def test_training_step_sem_loss_is_the_official_value(tmp_path, monkeypatch):
    """The trainer's logged L_sem of its first step equals the brute-force official L_sem (spec §2.1) of that step's
    own student and teacher outputs: the training path (config defaults, the losses it calls, the ops) is checked,
    not only `semantic_loss` called directly."""
    import smtc_fast.train as tr
    from test_model_losses import official_sem_loss

    outputs = []

    class Recording(SMTC):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            outputs.append(out)
            return out

    monkeypatch.setattr(tr, "SMTC", Recording)
    train(tiny_train(tmp_path, steps=1), tiny_model())
    assert len(outputs) == 2  # the student's forward, then the teacher's (the teacher is a copy of the student)
    student, teacher = outputs
    want = official_sem_loss(student.semantic_logits.detach(), teacher.semantic_logits, teacher.keys)
    got = read_metrics(tmp_path)[0]["sem"]
    assert got == pytest.approx(want.item(), rel=1e-5, abs=2e-5)


@pytest.mark.parametrize("amp", [False, True])
def test_step_compiles_as_one_graph(amp):
    """The trainer's forward half (losses.step_losses: both models, L_sem / L_reg / L_obj, with the compiled ops)
    is captured by torch.compile(fullgraph=True) with no graph break, the prerequisite of `--compile` and of CUDA
    graphs ('reduce-overhead'). aot_eager traces forward and backward through our ops' fake and autograd
    registrations and runs the traced graphs eagerly: the loss terms and every gradient equal eager's bitwise.
    (Inductor, the `--compile default` backend, is exercised by the slow test below.)"""
    from smtc_fast.losses import step_losses
    from smtc_fast.precision import autocast_dtype

    torch.manual_seed(0)
    student = SMTC(tiny_model(drop_path_rate=0.0)).train()
    teacher = SMTC(tiny_model(drop_path_rate=0.0)).eval()
    teacher.load_state_dict(student.state_dict())
    x_s, x_t = torch.rand(2, 3, 3, 64, 64), torch.rand(2, 3, 3, 64, 64)
    noise_s, noise_t = torch.randn(6, 4, 3, 192), torch.randn(6, 4, 3, 192)
    dtype = autocast_dtype("cpu", amp)

    def run(fn):
        student.zero_grad(set_to_none=True)
        l_sem, l_reg, obj_sum, v_s = fn(student, teacher, x_s, x_t, noise_s, noise_t, dtype)
        (l_sem + l_reg + obj_sum / (v_s + 1e-10).sum()).backward()
        return [t.detach() for t in (l_sem, l_reg, obj_sum, v_s)], \
            {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    ops = ("correlation", "slot_aggregate", "transport_loss", "_transport_loss_backward")
    with kernel_ran("cpu", *ops):
        eager, grads_e = run(step_losses)
    with kernel_ran("cpu", *ops):  # the compiled graph calls the same registered ops
        compiled, grads_c = run(torch.compile(step_losses, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) > 20
    for n in grads_e:
        assert torch.equal(grads_e[n], grads_c[n]), n


@pytest.mark.slow
def test_compile_default_trains_like_eager(tmp_path):
    """`--compile default` (inductor) trains: the same first-step losses as eager to float tolerance (inductor fuses
    and reorders float ops), and the run completes with a checkpoint."""
    eager = train(tiny_train(tmp_path / "eager", steps=2), tiny_model(drop_path_rate=0.0))
    compiled = train(tiny_train(tmp_path / "compiled", steps=2, compile="default"), tiny_model(drop_path_rate=0.0))
    assert compiled["exit_code"] == 0 and os.path.exists(tmp_path / "compiled" / "last.pt")
    for k in ("loss", "sem", "reg", "obj"):
        assert compiled["last"][k] == pytest.approx(eager["last"][k], rel=1e-4, abs=1e-5), k


KEEP_MEMORY_CHILD = r"""
import resource, sys
import torch
from smtc_fast.cpu_memory import keep_freed_memory

def faults_of_a_step():  # allocate, touch and free a 48 MB tensor: a (128, 256, 384) activation of the head
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(128, 256, 384)  # (numpy would madvise huge pages for it: 2 MB faults, not torch's 4 KB ones)
    del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

applied = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = [faults_of_a_step() for _ in range(16)]
print(applied, max(faults[-4:]))  # the steady state: glibc's aligned allocations settle after a few steps
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_cpu_memory_stops_the_per_step_page_faults():
    """smtc_fast.cpu_memory (applied by `smtc train` on the CPU): after a few steps of allocating and freeing the
    head's 48 MB activation, allocating it again faults no pages in, where glibc's default unmaps it on free and
    faults all 12k pages in again at every step. Fresh processes: the setting is process-wide."""
    runs = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", KEEP_MEMORY_CHILD, mode], capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT), check=True).stdout.split()
        runs[mode] = (out[0] == "True", int(out[1]))
    assert runs["keep"][0] and not runs["default"][0]
    assert runs["default"][1] > 10000  # 48 MB / 4 KB = 12288 pages, faulted in again
    assert runs["keep"][1] < 1000, runs
