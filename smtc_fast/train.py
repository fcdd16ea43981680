"""`smtc train`: the SMTC trainer (spec §3), single process or `torchrun` DDP, top to bottom.

    student = SMTC(config)                 DropPath active (train mode)
    teacher = copy of the student          eval mode, no gradient, EMA of the student after every step (spec §1.6)
    per step: clips -> two photometric draws (student / teacher) -> both forwards -> L_sem + L_reg + L_obj (spec §2)
              -> AdamW (4 groups, cosine lr, encoder lr 0 for grad_iter steps then x0.01) -> EMA

Reproducibility: clip `k` of step `s` has the global index s * global_batch + k; its content, its two augmentations
and its instance-slot noise are functions of (seed, index) only. A DDP run therefore sees exactly the data and noise
a single process with the same global batch sees, and `--resume` continues the same sequence. Remaining process
randomness (DropPath) comes from the torch RNG, whose state the checkpoint holds.

Fixes of the official trainer (spec §5.2): the lr schedule has one value per step, single-process runs work, no
anomaly detection, the blur sigma is drawn per clip, checkpoints are atomic and resumable.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from smtc_fast._lazy import lazy, no_grad
from smtc_fast.models.config import SMTCConfig

# torch, the data pipeline, the losses and the model load when train() runs, not for `smtc train --help`
# (smtc_fast/_lazy.py); each name stands for the plain import it replaces.
torch = lazy("torch")
dist = lazy("torch.distributed")
F = lazy("torch.nn.functional")
augment_clips, open_clips = lazy("smtc_fast.data", "augment_clips"), lazy("smtc_fast.data", "open_clips")
SMTC, load_dino = lazy("smtc_fast.models.smtc", "SMTC"), lazy("smtc_fast.models.smtc", "load_dino")
load_backbone = lazy("smtc_fast.models.smtc", "load_backbone")
precision = lazy("smtc_fast.precision")
cpu_memory = lazy("smtc_fast.cpu_memory")

EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130


@dataclass
class TrainConfig:
    """Trainer options. Defaults = the official relaxed recipe (start_twostage.sh; spec §3.3), per process."""
    data: str = "synthetic"            # 'synthetic', a video file / folder of videos, or a JPEGImages frame-folder root
    output: str = "runs/smtc"          # checkpoints (last.pt), metrics.jsonl, config.json
    steps: int = 10000                 # total optimiser steps
    batch_size: int = 32               # clips per process (official: 32 per GPU x 4 GPUs)
    num_frames: int = 4
    gap: int = 4
    lr: float = 2e-5                   # head lr; cosine to min_lr_ratio * lr over `steps`, no warmup (spec §3.3)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1          # on weights (>1-D, not biases) of both the encoder and the head
    grad_iter: int = 3000              # encoder lr x0 before this step, x encoder_lr_mult after (spec §1.6)
    encoder_lr_mult: float = 0.01
    ema: float = 0.999                 # teacher momentum, constant (spec §1.6)
    ema_encoder: bool = False          # paper Eq. 14 (True) vs official code (False: the teacher keeps the initial encoder)
    w_sem: float = 1.0                 # --bi_cons x cons_scale
    w_reg: float = 1.0                 # --entro_cons x ent_scale
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 3
    marginals: str = "norm"            # 'norm' (official) | 'uniform' (paper Eq. 8)
    cost: str = "one_minus_cos"        # 'one_minus_cos' (official) | 'neg_cos' (paper Eq. 8)
    obj_variant: str = "cos"           # 'cos' (official hinge) | 'l2' (paper Eq. 12)
    obj_margin: float = 0.5
    jpeg_draft: bool = True            # decode JPEGs >= 2x the training size at 1/2..1/8 scale (data/clips.py)
    augment: bool = True               # the official photometric augmentation
    crop_flip: bool = False            # the paper's random crop + flip
    synthetic_objects: int = 2
    dino: Optional[str] = None         # DINO ViT weights file for the encoder (e.g. dino_deitsmall16_pretrain.pth)
    backbone_weights: Optional[str] = None  # any ViT backbone file for --backbone: official DINOv2 / DINOv3 .pth,
                                            # a timm state dict, or a DINO file (models/backbone.py)
    moco: Optional[str] = None         # MoCo ResNet-50 weights (backbone 'resnet50')
    init: Optional[str] = None         # start from an SMTC checkpoint (official or ours), student = teacher
    resume: Optional[str] = None       # a checkpoint to continue, or 'auto' = <output>/last.pt if it exists
    stop_at: Optional[int] = None      # end this run after this many steps (with a checkpoint), as an interruption
                                       # would; the schedule still spans `steps`, and --resume continues
    seed: int = 0
    workers: int = 2
    device: str = "auto"               # 'auto' | 'cpu' | 'cuda'
    amp: bool = True                   # bf16 autocast on CUDA and on CPUs with native bf16 (smtc_fast.precision)
    compile: str = "none"              # torch.compile the step's forward + losses: 'none' | 'default' | 'reduce-overhead'
    keep_cpu_memory: bool = True       # CPU: glibc keeps freed blocks mapped (smtc_fast/cpu_memory.py)
    log_every: int = 10
    save_every: int = 500
    quiet: bool = False                # no progress bar / start banner


# ------------------------------------------------------------------------------------------------------------ helpers
def _mix(*parts):
    """A 63-bit seed from integers (a fixed polynomial hash, identical on every machine and process)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h * 0x100000001B3 + int(p) + 0x9E3779B97F4A7C15) & 0x7FFFFFFFFFFFFFFF
    return h


def instance_noise(indices, stream, seed, shape):
    """Standard-normal instance-slot noise, one draw per clip from (seed, clip index, stream): (B*T, S, P, D)."""
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(_mix(seed, i, stream, 7))) for i in indices]
    return torch.stack(out).flatten(0, 1)


def lr_at(cfg, step):
    """Cosine from lr to min_lr_ratio*lr, defined for every step 0..steps-1 (spec §5.2 fix)."""
    final = cfg.lr * cfg.min_lr_ratio
    progress = step / max(1, cfg.steps - 1)
    return final + 0.5 * (cfg.lr - final) * (1.0 + math.cos(math.pi * progress))


def param_groups(model, weight_decay):
    """The official 4 AdamW groups (spec §1.6): encoder weights, encoder 1-D/bias, head weights, head 1-D/bias.
    DINO's rule: a tensor is 'regularised' unless it is a bias or 1-D."""
    groups = [[], [], [], []]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = name.endswith(".bias") or p.dim() == 1
        groups[(0 if name.startswith("encoder.") else 2) + int(no_decay)].append(p)
    names = ["encoder", "encoder_no_decay", "head", "head_no_decay"]
    return [{"params": ps, "weight_decay": 0.0 if k % 2 else weight_decay, "name": names[k]}
            for k, ps in enumerate(groups)]


def set_lr(optimizer, cfg, step):
    base = lr_at(cfg, step)
    enc = 0.0 if step < cfg.grad_iter else cfg.encoder_lr_mult
    for g in optimizer.param_groups:
        g["lr"] = base * (enc if g["name"].startswith("encoder") else 1.0)
    return base


@no_grad
def ema_update(teacher, student, momentum, include_encoder):
    for (name, p_t), p_s in zip(teacher.named_parameters(), student.parameters()):
        if not include_encoder and name.startswith("encoder."):
            continue  # official: the teacher keeps the initial (DINO) backbone forever
        p_t.mul_(momentum).add_(p_s.detach(), alpha=1.0 - momentum)


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def rng_state():
    """Every RNG the run touches, in types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [list(x) if isinstance(x, tuple) else x
                                                          for x in random.getstate()],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, student, teacher, optimizer, step, cfg, model_cfg, extra=None):
    """Atomic: write <path>.tmp, fsync, rename. `step` = the number of completed steps."""
    ckpt = {"format": "smtc_fast", "step": step, "student": student.state_dict(), "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": {"kind": "cosine", "step": step},
            "train_config": json.dumps(dataclasses.asdict(cfg)), "model_config": json.dumps(model_cfg.to_dict()),
            "rng": rng_state(), **(extra or {})}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StepSampler:
    """Streams this rank's clip indices: step s, rank r, slot k -> s * global_batch + r * batch + k.
    (A plain iterable with a length, all DataLoader asks of a sampler; torch.utils.data.Sampler adds nothing.)"""

    def __init__(self, start_step, steps, batch_size, world, rank):
        self.start_step, self.steps, self.batch_size, self.world, self.rank = start_step, steps, batch_size, world, rank

    def __iter__(self):
        gb = self.batch_size * self.world
        for s in range(self.start_step, self.steps):
            base = s * gb + self.rank * self.batch_size
            yield from range(base, base + self.batch_size)

    def __len__(self):
        return (self.steps - self.start_step) * self.batch_size


def _all_reduce_mean(values, world):
    """values: 1-D float tensor; averaged over ranks."""
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return values


@no_grad
def discovery_iou(model, num_clips=8, seed=12345, size=(64, 64), num_frames=4, num_objects=2, device="cpu"):
    """Object discovery on held-out synthetic clips (for the 'learning works' check and validation logging).

    Per frame: every pixel takes its argmax semantic slot (masks upsampled bilinearly from the token grid); the slot
    covering most of the image border is the background, the union of the others is the discovered foreground.
    Returns {"fg_iou": mean IoU with the ground-truth foreground, "mbo": mean over objects of the best IoU of any
    single slot region}. No ground truth is used to pick slots for fg_iou.
    """
    from smtc_fast.data import make_clip
    from smtc_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD

    was_training = model.training
    model.eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)
    fg_ious, best = [], []
    for c in range(num_clips):
        frames, masks = make_clip(seed + c, num_frames, size, num_objects)
        x = ((frames[None] - mean) / std).to(device)
        noise = instance_noise([c], 0, seed, (num_frames, model.config.num_slots, model.config.num_instances,
                                              model.transport_proj.out_channels)).to(device)
        pred = model.predict(x, instance_noise=noise)
        sem = pred.semantic_mask[0].float().cpu()  # (T, S, h, w)
        sem = F.interpolate(sem, size=size, mode="bilinear", align_corners=False)
        labels = sem.argmax(dim=1)  # (T, H, W)
        S = sem.shape[1]
        for t in range(num_frames):
            lab, gt = labels[t], masks[t]
            border = torch.cat([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
            bg = torch.bincount(border, minlength=S).argmax()
            fg, gt_fg = lab != bg, gt > 0
            fg_ious.append(((fg & gt_fg).sum() / (fg | gt_fg).sum().clamp_min(1)).item())
            for k in range(1, num_objects + 1):
                obj = gt == k
                if obj.any():
                    ious = [((lab == s) & obj).sum().item() / max(1, ((lab == s) | obj).sum().item()) for s in range(S)]
                    best.append(max(ious))
    model.train(was_training)
    return {"fg_iou": float(np.mean(fg_ious)), "mbo": float(np.mean(best)) if best else float("nan")}


# ------------------------------------------------------------------------------------------------------------ training
def train(cfg: TrainConfig, model_cfg: Optional[SMTCConfig] = None):
    """Run (or continue) a training run. Returns a summary dict (exit_code, step, last losses, checkpoint path)."""
    model_cfg = model_cfg or SMTCConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(cfg.device, local_rank) if cfg.device == "cuda" else torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    is_main = rank == 0
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {cfg.steps}, {cfg.batch_size}")
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)  # restored on return (callers may be tests or notebooks)
    # glibc keeps freed blocks mapped, so the step's large tensors are not page-faulted in again at every step
    # (smtc_fast/cpu_memory.py; a process-wide setting, left in place after train() returns)
    kept_memory = device.type == "cpu" and cfg.keep_cpu_memory and cpu_memory.keep_freed_memory()

    # ---- model, teacher, optimiser. Every rank builds the same initial weights (the teacher is copied before DDP
    # would broadcast rank 0's student), then the RNGs are seeded per rank as the official code does (spec §3.3).
    torch.manual_seed(cfg.seed)
    student = SMTC(model_cfg)
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    if cfg.dino and cfg.backbone_weights:
        raise ValueError("give --dino or --backbone-weights, not both (both load the encoder)")
    if cfg.dino:
        load_dino(student, cfg.dino)
    if cfg.backbone_weights:
        load_backbone(student, cfg.backbone_weights)
    if cfg.moco:
        student.encoder.load_moco(cfg.moco)
    if cfg.init:
        from smtc_fast.models import load_checkpoint

        init_model, kind = load_checkpoint(cfg.init, model_cfg)
        student.load_state_dict(init_model.state_dict(), strict=True)
        if is_main:
            print(f"initialised from {cfg.init} ({kind} checkpoint)")
    student.to(device).train()
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=cfg.lr)

    os.makedirs(cfg.output, exist_ok=True)
    ckpt_path = os.path.join(cfg.output, "last.pt")
    start_step = 0
    resume = cfg.resume
    if resume == "auto":
        resume = ckpt_path if os.path.exists(ckpt_path) else None
    if resume:
        ckpt = torch.load(resume, map_location="cpu", weights_only=True)
        if ckpt.get("format") != "smtc_fast":
            raise ValueError(f"--resume {resume}: not an smtc_fast training checkpoint")
        student.load_state_dict(ckpt["student"], strict=True)
        teacher.load_state_dict(ckpt["teacher"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step = int(ckpt["step"])
        set_rng_state(ckpt["rng"])  # the saved state is rank 0's; other ranks re-derive theirs from it
        if rank:
            torch.manual_seed(_mix(cfg.seed, start_step, rank))
        if is_main:
            print(f"resumed from {resume} at step {start_step}")

    model = student
    if world > 1:
        # find_unused_parameters: slots_sigma gets no gradient with sigma_grad="none" (spec §1.5), nor do the last
        # block's proj/mlp and the final norm, which the training forward does not run.
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    # ---- data
    H, W = model_cfg.resolution
    kwargs = {"num_objects": cfg.synthetic_objects} if "synthetic" in cfg.data.split(",") else {}
    # Real clips come from the workers as uint8 (a quarter of the bytes of float32) and become float on the device.
    dataset = open_clips(cfg.data, cfg.num_frames, cfg.gap, (H, W), cfg.seed, uint8=True, draft=cfg.jpeg_draft,
                         **kwargs)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=StepSampler(start_step, cfg.steps, cfg.batch_size, world, rank),
        num_workers=cfg.workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=False)
    S, P, D = model_cfg.num_slots, model_cfg.num_instances, student.transport_proj.out_channels
    # bf16 autocast where the device computes bf16 natively (CUDA; AVX512-BF16 / AMX CPUs), else float32. The
    # losses run outside it, in float32 (they cast their inputs up: losses.py step_losses).
    amp_dtype = precision.autocast_dtype(device, cfg.amp)
    from smtc_fast.losses import step_losses as forward_losses  # the real function: torch.compile traces into it

    if cfg.compile != "none":
        # fullgraph: a graph break is an error, not a silent slowdown. dynamic=False: every step has the same
        # shapes (drop_last), and static shapes are what CUDA graphs replay
        forward_losses = torch.compile(forward_losses, fullgraph=True, dynamic=False, mode=cfg.compile)

    # ---- logging
    metrics_path = os.path.join(cfg.output, "metrics.jsonl")
    writer = None
    if is_main:
        with open(os.path.join(cfg.output, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "model": model_cfg.to_dict(), "world_size": world,
                       "commit": git_commit()}, f, indent=1)
        if not cfg.quiet:
            print(f"smtc train  commit {git_commit()}  world {world}  device {device}  "
                  f"precision {precision.describe(device, cfg.amp)}  start step {start_step}"
                  + ("  freed memory kept mapped (--no-keep-cpu-memory)" if kept_memory else ""))
            print("train config:", json.dumps(dataclasses.asdict(cfg)))
            print("model config:", json.dumps(model_cfg.to_dict()))
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(cfg.output, "tb"))
        except Exception:  # tensorboard not installed: the JSON-lines log is the record
            writer = None

    stop = {"signal": None}

    def _on_signal(signum, frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start_step, disable=not is_main or cfg.quiet, dynamic_ncols=True)
    summary = {"exit_code": 0, "step": start_step, "checkpoint": ckpt_path, "metrics": metrics_path}
    gb = cfg.batch_size * world
    step = start_step
    t0 = time.time()
    try:
        for batch in loader:
            frames = batch["frames"].to(device, non_blocking=True)  # (B, T, 3, H, W) uint8, or float (synthetic)
            if frames.dtype == torch.uint8:
                frames = frames.float().div_(255.0)  # in [0, 1]
            idx = batch["index"].tolist()
            T = frames.shape[1]
            x_s = augment_clips(frames, [_mix(cfg.seed, i, 1) for i in idx], cfg.augment, cfg.crop_flip)
            x_t = augment_clips(frames, [_mix(cfg.seed, i, 2) for i in idx], cfg.augment, cfg.crop_flip)
            noise_s = instance_noise(idx, 1, cfg.seed, (T, S, P, D)).to(device)
            noise_t = instance_noise(idx, 2, cfg.seed, (T, S, P, D)).to(device)

            l_sem, l_reg, obj_sum, v_s = forward_losses(
                model, teacher, x_s, x_t, noise_s, noise_t, amp_dtype, cfg.sinkhorn_eps, cfg.sinkhorn_iters,
                cfg.marginals, cfg.cost, cfg.obj_margin, cfg.obj_variant)
            # L_obj divides by the number of valid instances; reduce that count over ranks so a DDP step has the
            # gradient of the global batch (DDP averages gradients, hence the x world).
            denom = torch.stack([(v_s.float() + 1e-10).sum().detach()])
            if world > 1:
                dist.all_reduce(denom)
            l_obj = obj_sum / denom[0] * world
            loss = cfg.w_sem * l_sem + cfg.w_reg * l_reg + l_obj

            stats = torch.stack([loss.detach(), l_sem.detach(), l_reg.detach(), l_obj.detach(),
                                 v_s.mean(), torch.tensor(float(stop["signal"] is not None), device=device)]).float()
            stats = _all_reduce_mean(stats, world)
            if not torch.isfinite(stats[0]):
                msg = (f"loss is {stats[0].item()} at step {step}: stopping. The last good checkpoint "
                       f"({ckpt_path if os.path.exists(ckpt_path) else 'none written yet'}) is kept.")
                if is_main:
                    print(msg, file=sys.stderr)
                summary.update(exit_code=EXIT_NONFINITE, message=msg)
                break

            base_lr = set_lr(optimizer, cfg, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema_update(teacher, student, cfg.ema, cfg.ema_encoder)
            step += 1

            record = {"step": step, "lr": base_lr, "loss": stats[0].item(), "sem": stats[1].item(),
                      "reg": stats[2].item(), "obj": stats[3].item(), "valid_frac": stats[4].item(),
                      "clips": step * gb, "time": round(time.time() - t0, 3)}
            summary["last"] = record
            if is_main:
                if step % cfg.log_every == 0 or step == cfg.steps or step == start_step + 1:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                    if writer is not None:
                        for k in ("loss", "sem", "reg", "obj", "valid_frac", "lr"):
                            writer.add_scalar(k, record[k], step)
                bar.set_postfix(loss=f"{record['loss']:.4f}", sem=f"{record['sem']:.3f}",
                                reg=f"{record['reg']:.3f}", obj=f"{record['obj']:.3f}")
                bar.update(1)
            interrupted = stats[5].item() > 0 or (cfg.stop_at is not None and step >= cfg.stop_at)
            if is_main and (step % cfg.save_every == 0 or step == cfg.steps or interrupted):
                save_checkpoint(ckpt_path, student, teacher, optimizer, step, cfg, model_cfg)
            summary["step"] = step
            if interrupted:
                if is_main:
                    print(f"interrupted: checkpoint saved at step {step} to {ckpt_path}", file=sys.stderr)
                if stop["signal"] is not None:
                    summary["exit_code"] = EXIT_INTERRUPTED
                break
            if world > 1:
                dist.barrier()  # nobody starts the next step while rank 0 writes
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if writer is not None:
            writer.close()
    summary["student"], summary["teacher"] = student, teacher
    return summary


# ------------------------------------------------------------------------------------------------------------ CLI
_MODEL_HELP = {
    "backbone": "timm ViT name, or 'resnet50'",
    "patch_size": "override the ViT patch size (small test models)",
    "depth": "override the ViT depth",
    "img_size": "override the ViT pretraining image size (pos-embed grid)",
    "resolution": "training resolution H W (fixes transport_proj's in-dim)",
    "stage2_mask": "'logits' (official) | 'prob' (paper Eq. 7) | 'soft' (first release)",
    "tau": "stage-2 threshold (default 0.3 for logits, 0.5 for prob)",
    "slot_update": "'residual' (official) | 'gru' (paper Eq. 6)",
}


def _add_dataclass_args(parser, cls, prefix="", help_map=None):
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        default = f.default
        help_text = (help_map or {}).get(f.name, "")
        kind = str(f.type)
        if f.name == "resolution":
            parser.add_argument(flag, type=int, nargs=2, default=list(default), metavar=("H", "W"), help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif "int" in kind:
            parser.add_argument(flag, type=int, default=default, help=help_text)
        elif "float" in kind:
            parser.add_argument(flag, type=float, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=str, default=default, choices=_CHOICES.get(f.name), help=help_text)


_TRAIN_HELP = {
    "data": "'synthetic', a video file or folder of videos, or a JPEGImages/<video>/*.jpg root; several "
            "sources separated by commas are interleaved clip by clip",
    "output": "run folder: last.pt, metrics.jsonl, config.json",
    "steps": "total optimiser steps (the cosine schedule spans them)",
    "batch_size": "clips per process (official: 32 per GPU x 4 GPUs)",
    "num_frames": "frames per clip (T)",
    "gap": "frame spacing within a clip",
    "lr": "head lr (official script 2e-5); cosine to min_lr_ratio * lr, no warmup",
    "min_lr_ratio": "final lr / lr",
    "weight_decay": "AdamW decay on weight tensors (biases and 1-D tensors get 0)",
    "grad_iter": "encoder frozen (lr 0) before this step (official 3000)",
    "encoder_lr_mult": "encoder lr multiplier after grad_iter (official 0.01)",
    "ema": "teacher EMA momentum (constant)",
    "ema_encoder": "EMA the teacher's encoder too (paper Eq. 14); official: off",
    "w_sem": "weight of L_sem", "w_reg": "weight of L_reg",
    "sinkhorn_eps": "entropic regularisation of the L_sem transport",
    "sinkhorn_iters": "Sinkhorn iterations of the L_sem transport",
    "marginals": "L_sem marginals: 'norm' (official) or 'uniform' (paper Eq. 8)",
    "cost": "L_sem cost: 'one_minus_cos' (official) or 'neg_cos' (paper Eq. 8)",
    "obj_variant": "L_obj: 'cos' (official hinge) or 'l2' (paper Eq. 12)",
    "obj_margin": "L_obj margin lambda",
    "jpeg_draft": "decode a JPEG frame at least twice the training size at 1/2, 1/4 or 1/8 scale (libjpeg DCT "
                  "scaling), then resize as the official loader; --no-jpeg-draft decodes in full as it does",
    "augment": "official photometric augmentation",
    "crop_flip": "the paper's random resized crop + horizontal flip",
    "synthetic_objects": "objects per synthetic clip",
    "dino": "DINO ViT weights file for the encoder (dino_deitsmall16_pretrain.pth)",
    "backbone_weights": "weights file for the --backbone ViT, strict: official DINOv2 / DINOv3 .pth "
                        "(dinov2_vits14_reg4_pretrain.pth, dinov3_vits16_pretrain_lvd1689m-*.pth), a timm state "
                        "dict, or a DINO file",
    "moco": "MoCo ResNet-50 weights file (--backbone resnet50)",
    "init": "start from an SMTC checkpoint (released or ours)",
    "resume": "checkpoint to continue, or 'auto' (<output>/last.pt when present)",
    "stop_at": "end this run after this many steps with a checkpoint (resume later)",
    "seed": "seed: data, augmentation and instance noise are functions of (seed, clip index)",
    "workers": "data-loading worker processes",
    "device": "'auto', 'cpu' or 'cuda'",
    "amp": "bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX: "
           "smtc_fast.build_info()['cpu_bf16']); elsewhere, and with --no-amp, float32",
    "compile": "torch.compile the step's forward and losses as one graph (fullgraph): 'default' (inductor; the "
               "head step ~1.1x faster on a 2-core CPU after a ~1 min compile) or 'reduce-overhead' (inductor + CUDA "
               "graphs on a GPU, where the head's many small launches are launch-bound). Not run on a GPU yet",
    "keep_cpu_memory": "on the CPU, glibc keeps freed memory mapped (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GB) "
                       "instead of page-faulting the step's large tensors in again at every step (a 2-vCPU VM: the "
                       "float32 step at 8 clips 9.55 -> 7.11 s, the head step at 32 clips 1.35 -> 1.16 s); the "
                       "process keeps its peak RSS",
    "log_every": "steps between metrics.jsonl records",
    "save_every": "steps between checkpoints (also saved at the end and on SIGINT/SIGTERM)",
    "quiet": "no progress bar or start banner",
}
_MODEL_HELP.update({
    "drop_path_rate": "stochastic depth of the student ViT (DINO default 0.1)",
    "num_slots": "semantic slots S", "num_instances": "instance slots per semantic slot P (<= 6)",
    "iters": "slot-attention iterations (3 in training, 5 in the official discovery eval)",
    "mlp_slot_hidden": "hidden width of mlp_slot (default 2 * D)",
    "sigma_grad": "slots_sigma's gradient from the stage-2 sample: 'zero' (official: a zero tensor, so AdamW's "
                  "weight decay shrinks log sigma) or 'none' (no gradient: sigma stays at its initialisation)",
})
_CHOICES = {"marginals": ["norm", "uniform"], "cost": ["one_minus_cos", "neg_cos"], "obj_variant": ["cos", "l2"],
            "device": ["auto", "cpu", "cuda"], "stage2_mask": ["logits", "prob", "soft"],
            "slot_update": ["residual", "gru"], "sigma_grad": ["zero", "none"],
            "compile": ["none", "default", "reduce-overhead"]}


def add_arguments(parser):
    _add_dataclass_args(parser, TrainConfig, help_map=_TRAIN_HELP)
    model = parser.add_argument_group("model (SMTCConfig)")
    _add_dataclass_args(model, SMTCConfig, help_map=_MODEL_HELP)
    return parser


def configs_from_args(args):
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    model_cfg = SMTCConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SMTCConfig)})
    return cfg, model_cfg


def run(args):
    cfg, model_cfg = configs_from_args(args)
    summary = train(cfg, model_cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary["exit_code"]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="smtc train", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
