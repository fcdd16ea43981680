"""Backbones beyond DINO ViT-S/16 (issue 16 part 1): DeiT / AugReg, DINOv2 with and without registers, DINOv3
(RoPE), random-init with depth 2. Forward shapes at two resolutions, the keys against an independent computation
(pre-RoPE for DINOv3), the tokens against timm's own forward, a training step, propagation on the real blackswan
frames, and loading state dicts written with the names the projects publish (official DINOv2 / DINOv3 .pth)."""
import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smtc_fast.models import SMTC, SMTCConfig, create_vit, load_backbone, load_checkpoint, vit_forward

pytestmark = pytest.mark.usefixtures("one_thread")

# name -> (patch, family, prefix tokens)
FAMILIES = {
    "vit_small_patch16_224": (16, "dino", 1),              # DINO ViT-S/16 (and AugReg's name)
    "vit_small_patch16_224.augreg_in21k": (16, "dino", 1), # AugReg, named with its pretrained tag
    "deit_small_patch16_224": (16, "dino", 1),             # DeiT
    "deit_small_distilled_patch16_224": (16, "dino", 2),   # DeiT with its distillation token
    "deit3_small_patch16_224": (16, "noembed", 1),         # DeiT-3: table without the CLS entry
    "vit_small_patch14_dinov2": (14, "dino", 1),
    "vit_small_patch14_reg4_dinov2": (14, "noembed", 5),
    "vit_small_patch16_dinov3": (16, "eva", 5),
    "vit_small_patch16_dinov3_qkvb": (16, "eva", 5),
}
DATA = os.path.join(os.path.dirname(__file__), "data", "davis2016")
FRAMES = sorted(glob.glob(os.path.join(DATA, "JPEGImages/480p/blackswan/*.jpg")))
ANNS = sorted(glob.glob(os.path.join(DATA, "Annotations/480p/blackswan/*.png")))[:len(FRAMES)]


def config(name, **kw):
    p = FAMILIES[name][0]
    base = dict(backbone=name, depth=2, resolution=(4 * p, 4 * p), num_slots=4, num_instances=2, drop_path_rate=0.0)
    base.update(kw)
    return SMTCConfig(**base)


def randomise(vit, seed=0):
    """Random values in every parameter (timm inits LayerScale at 1e-5 and biases at 0, which would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in name and "weight" in name else 0.0))
    return vit


@pytest.mark.parametrize("name", list(FAMILIES))
def test_forward_shapes_at_two_resolutions(name):
    p, family, prefix = FAMILIES[name]
    model = SMTC(config(name)).eval()
    assert model.encoder.family == family and model.encoder.num_prefix_tokens == prefix and model.encoder.stride == p
    for h, w in ((4, 4), (3, 5)):
        frames = torch.randn(1, 2, 3, h * p, w * p)
        out = model(frames)
        assert out.grid == (h, w) and out.keys.shape == (1, 2, h * w, 384)
        assert out.instance_logits.shape == (1, 2, 4, 2, h * w)
        tokens, grid = model.tokens(frames)
        assert grid == (h, w) and tokens.shape == (2, h * w, 384)
        pred = model.predict(frames)  # discovery's entry point
        assert pred.instance_mask.shape == (1, 2, 4, 2, h, w)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        vit_forward(model.encoder, torch.randn(1, 3, 4 * p + 1, 4 * p))


@pytest.mark.parametrize("name,dim", [("vit_base_patch14_reg4_dinov2", 768), ("vit_large_patch14_dinov2", 1024),
                                      ("vit_base_patch16_dinov3", 768), ("vit_large_patch16_dinov3", 1024)])
def test_base_and_large_sizes(name, dim):
    p = 14 if "patch14" in name else 16
    model = SMTC(SMTCConfig(backbone=name, depth=1, resolution=(3 * p, 3 * p), num_slots=2, num_instances=2)).eval()
    keys, tokens, grid = model.encode(torch.randn(1, 1, 3, 3 * p, 2 * p), return_tokens=True)
    assert grid == (3, 2) and keys.shape == (1, 6, dim) and tokens.shape == (1, 6, dim)


def _last_attention_input(vit, images):
    """What the last block's attention receives (norm1 of its input), captured with a hook on timm's own forward."""
    seen = {}
    handle = vit.blocks[-1].attn.register_forward_pre_hook(lambda mod, args, kw=None: seen.setdefault("x", args[0]))
    vit.forward_features(images)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3_qkvb",
                                  "vit_small_patch14_dinov2"])
def test_keys_and_tokens_match_timm_forward(name):
    """At the model's own grid, our tokens + the final norm are timm's forward_features, and our keys are
    x_in @ W_k^T + b_k of the input timm's last attention receives, prefix tokens dropped: for DINOv3 the
    un-rotated key (its k bias is fixed at zero), which differs from the rotated one."""
    p, family, P = FAMILIES[name]
    vit = randomise(create_vit(name, depth=2, drop_path_rate=0.0, img_size=4 * p)).eval()
    images = torch.randn(2, 3, 4 * p, 4 * p)
    with torch.no_grad():
        keys, tokens, grid = vit_forward(vit, images, return_tokens=True)
        ref = vit.forward_features(images)[:, P:]
        assert torch.allclose(vit.norm(tokens), ref, atol=1e-5, rtol=1e-5)
        x_in = _last_attention_input(vit, images)
        W = vit.blocks[-1].attn.qkv.weight
        D = W.shape[1]
        b = vit.blocks[-1].attn.qkv.bias if family != "eva" else None  # Eva: q/v bias only, k bias is zero
        k_ref = F.linear(x_in, W[D:2 * D], None if b is None else b[D:2 * D])[:, P:]
        assert torch.allclose(keys, k_ref, atol=1e-5, rtol=1e-5)
        if family == "eva":
            from timm.layers import apply_rot_embed_cat

            rope = vit.rope.get_embed(shape=grid)
            k_heads = k_ref.reshape(2, 16, 6, 64).transpose(1, 2)
            rotated = apply_rot_embed_cat(k_heads, rope, half=True).transpose(1, 2).reshape(2, 16, D)
            assert (rotated - keys).abs().max() > 1e-2  # the choice matters: keys are taken before the rotation


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"])
def test_other_grids_resize_the_models_own_way(name):
    """Off the pretraining grid: DINOv2-reg resizes its patch table with bicubic antialias to size (the official
    hub's interpolate_offset=0, antialias=True = timm's dynamic_img_size); DINOv3 computes RoPE on the new grid.
    Both equal timm's own dynamic-size forward."""
    import timm

    p = FAMILIES[name][0]
    ours = randomise(create_vit(name, depth=2, drop_path_rate=0.0, img_size=4 * p)).eval()
    theirs = timm.create_model(name, pretrained=False, num_classes=0, depth=2, img_size=4 * p,
                               dynamic_img_size=True).eval()
    theirs.load_state_dict(ours.state_dict())
    images = torch.randn(1, 3, 3 * p, 6 * p)
    with torch.no_grad():
        _, tokens, _ = vit_forward(ours, images, return_tokens=True)
        ref = theirs.forward_features(images)[:, ours.num_prefix_tokens:]
    assert torch.allclose(ours.norm(tokens), ref, atol=1e-5, rtol=1e-5)


def test_dinov2_without_registers_keeps_the_dino_rule():
    """DINOv2 (no registers) resizes as DINO does (its interpolate_offset=0.1, antialias off): written out here as
    the official DINOv2 call, independently of interpolate_pos_embed."""
    vit = randomise(create_vit("vit_small_patch14_dinov2", depth=1, drop_path_rate=0.0, img_size=4 * 14)).eval()
    images = torch.randn(1, 3, 3 * 14, 5 * 14)
    pe = vit.pos_embed.float()
    M = 4
    patch = F.interpolate(pe[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
                          scale_factor=((3 + 0.1) / M, (5 + 0.1) / M))
    table = torch.cat([pe[:, :1], patch.permute(0, 2, 3, 1).reshape(1, 15, -1)], 1)
    with torch.no_grad():
        x = torch.cat([vit.cls_token, vit.patch_embed.proj(images).flatten(2).transpose(1, 2)], 1) + table
        x = vit.blocks[0](x)
        _, tokens, _ = vit_forward(vit, images, return_tokens=True)
    assert torch.equal(tokens, x[:, 1:])


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "deit3_small_patch16_224",
                                  "vit_small_patch16_dinov3_qkvb"])
def test_training_step(name, tmp_path):
    from smtc_fast.train import TrainConfig, train

    summary = train(TrainConfig(output=str(tmp_path), steps=2, batch_size=2, lr=1e-3, grad_iter=0, workers=0,
                                log_every=1, save_every=1000, quiet=True, encoder_lr_mult=1.0), config(name))
    assert summary["step"] == 2
    start = SMTC(config(name))  # same seed as the trainer's student (TrainConfig.seed = 0)
    moved = [k for k, v in summary["student"].encoder.state_dict().items()
             if not torch.equal(v, start.encoder.state_dict()[k])]
    assert any("blocks.1" in k for k in moved)  # the encoder trains (grad_iter 0)
    model, kind = load_checkpoint(str(tmp_path / "last.pt"))
    assert kind == "smtc_fast" and model.config.backbone == name


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
                                  "vit_small_patch16_dinov3"])
def test_propagation_on_the_real_fixture(name):
    """Random-weight features on blackswan, frames 0-3, on the backbone's own grid (the patch-14 preset for
    DINOv2): the whole path runs; label maps at the frame's size, with the frame-0 labels (no score: random weights)."""
    from smtc_fast.evaluate import io as eio
    from smtc_fast.evaluate import propagation as P

    p = FAMILIES[name][0]
    vit = create_vit(name, depth=2, drop_path_rate=0.0)
    preset = P.PRESETS["smtc-patch14" if p == 14 else "smtc-stride16"]
    first = (eio.read_label(ANNS[0]) > 0).astype(np.uint8)
    out = list(P.propagate_label_video(FRAMES[:4], first, P.ViTTokens(vit, batch_size=4), preset, crop_size=240,
                                       chunk=4096))
    assert [t for t, _ in out] == [0, 1, 2, 3] and all(lab.shape == (480, 854) for _, lab in out)
    preds = np.stack([lab for _, lab in out])
    assert set(np.unique(preds)) <= {0, 1} and all(lab.any() for lab in preds)  # the swan is still labelled


def test_patch14_presets_scale_the_stride16_protocol():
    from smtc_fast.evaluate.propagation import PRESETS

    s16, s8, p14, p7 = (PRESETS[k] for k in ("smtc-stride16", "smtc-stride8", "smtc-patch14", "smtc-patch14-stride7"))
    assert p14.map_scale == 14 and p7.map_scale == 7
    assert p14.radius * 14 == s16.radius * 16 and p7.radius * 7 == s8.radius * 8  # the same reach in pixels
    assert (p14.topk, p14.n_context, p14.temperature) == (s16.topk, s16.n_context, s16.temperature)


# ---------------------------------------------------------------------------------------------------------------
# state dicts with the published names, written out here from the projects' own model definitions

def dinov2_official(vit, g):
    """facebookresearch/dinov2 DinoVisionTransformer names: pos_embed holds the CLS entry, registers are
    `register_tokens`, plus the pretraining `mask_token`. timm's converter folds the CLS position into cls_token."""
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    D = vit.embed_dim
    sd["mask_token"] = torch.zeros(1, D)
    if "reg_token" in sd:
        cls_pos = torch.randn(1, 1, D, generator=g) * 0.02
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - cls_pos
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], 1)
    return sd


def dinov3_official(vit, g):
    """facebookresearch/dinov3 DinoVisionTransformer names: `storage_tokens`, `mask_token`, `rope_embed.periods`,
    LayerScale as `ls1.gamma` / `ls2.gamma`, one `qkv.bias` with its `bias_mask` (1 for q and v, 0 for k; the k
    part is masked out, so any value there is inert)."""
    out = {"mask_token": torch.zeros(1, vit.embed_dim), "rope_embed.periods": vit.rope.periods.clone()}
    for k, v in vit.state_dict().items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if k.endswith("attn.q_bias") or k.endswith("attn.v_bias"):
            continue
        out[k] = v.clone()
    for i, blk in enumerate(vit.blocks):
        D = blk.attn.qkv.in_features
        q = blk.attn.q_bias.detach() if blk.attn.q_bias is not None else torch.zeros(D)
        v = blk.attn.v_bias.detach() if blk.attn.v_bias is not None else torch.zeros(D)
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.randn(D, generator=g), v])
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
    return out


def _roundtrip(name, to_file, tmp_path, exact=True):
    """Model A (random values) -> a file in the published layout -> a fresh model B through --backbone-weights'
    loader and through load_checkpoint: B computes what A computes."""
    p = FAMILIES[name][0]
    g = torch.Generator().manual_seed(1)
    a = SMTC(config(name)).eval()
    randomise(a.encoder)
    path = tmp_path / "backbone.pth"
    torch.save(to_file(a.encoder, g), path)
    b = load_backbone(SMTC(config(name)).eval(), str(path))
    c, kind = load_checkpoint(str(path), config(name))
    assert kind in ("backbone", "dino")  # "dino": a file with the DINO layout, loaded as DINO files always were
    frames = torch.randn(1, 1, 3, 3 * p, 5 * p)
    with torch.no_grad():
        ka, ta, _ = a.encode(frames, return_tokens=True)
        for m in (b, c.eval()):
            kb, tb, _ = m.encode(frames, return_tokens=True)
            if exact:
                assert torch.equal(ka, kb) and torch.equal(ta, tb)
            else:
                assert torch.allclose(ka, kb, atol=1e-5) and torch.allclose(ta, tb, atol=1e-5)
    return path


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_official_dinov2_names_load(name, tmp_path):
    _roundtrip(name, dinov2_official, tmp_path, exact="reg4" not in name)  # reg: cls - pos + pos in float


@pytest.mark.parametrize("name", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb"])
def test_official_dinov3_names_load(name, tmp_path):
    if name.endswith("_qkvb"):
        _roundtrip(name, dinov3_official, tmp_path)
    else:  # the bias-free model takes a file whose (masked) q / v biases are zero
        def zero_bias(vit, g):
            sd = dinov3_official(vit, g)
            for k in [k for k in sd if k.endswith("qkv.bias")]:
                sd[k] = sd[k] * (1 - sd[k + "_mask"])  # only the inert k part is non-zero
            return sd
        _roundtrip(name, zero_bias, tmp_path)


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_small_patch14_reg4_dinov2",
                                  "vit_small_patch16_dinov3_qkvb"])
def test_timm_state_dicts_load(name, tmp_path):
    _roundtrip(name, lambda vit, g: {k: v.clone() for k, v in vit.state_dict().items()}, tmp_path)


def test_dino_files_still_load_as_dino(tmp_path):
    vit = create_vit("vit_small_patch16_224", depth=2)
    sd = {f"backbone.{k}": v for k, v in vit.state_dict().items()}  # DINO's full checkpoint layout
    sd.update({"head.mlp.0.weight": torch.zeros(2, 384)})
    torch.save({"teacher": sd}, tmp_path / "dino.pth")
    model, kind = load_checkpoint(str(tmp_path / "dino.pth"), config("vit_small_patch16_224"))
    assert kind == "dino" and torch.equal(model.encoder.pos_embed, vit.pos_embed)
    load_backbone(SMTC(config("vit_small_patch16_224")), str(tmp_path / "dino.pth"))  # --backbone-weights too


def test_wrong_files_fail_loudly(tmp_path):
    g = torch.Generator().manual_seed(0)
    v3 = randomise(create_vit("vit_small_patch16_dinov3_qkvb", depth=2))
    sd = dinov3_official(v3, g)
    torch.save(sd, tmp_path / "v3.pth")
    with pytest.raises(ValueError, match="_qkvb"):  # non-zero biases into the bias-free variant
        load_backbone(SMTC(config("vit_small_patch16_dinov3")), str(tmp_path / "v3.pth"))
    bad = dict(sd)
    del bad["blocks.1.ls2.gamma"]
    bad["blocks.1.extra.weight"] = torch.zeros(3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match=r"(?s)does not fit.*missing keys \(1\).*blocks\.1\.gamma_2.*"
                                           r"unexpected keys \(1\).*blocks\.1\.extra\.weight"):
        load_backbone(SMTC(config("vit_small_patch16_dinov3_qkvb")), str(tmp_path / "bad.pth"))
    v2 = dinov2_official(create_vit("vit_small_patch14_dinov2", depth=2), g)  # 37 x 37 table (img_size 518)
    torch.save(v2, tmp_path / "v2.pth")
    with pytest.raises(ValueError, match="img_size"):
        load_backbone(SMTC(config("vit_small_patch14_dinov2", img_size=224)), str(tmp_path / "v2.pth"))
    with pytest.raises(ValueError, match="patch"):  # a patch-14 file for a patch-16 model
        load_backbone(SMTC(config("vit_small_patch16_224")), str(tmp_path / "v2.pth"))


# ---------------------------------------------------------------------------------------------------------------
# the command line: --backbone-weights in training, the trained checkpoint in eval-prop and eval-discovery

def _davis_root(tmp_path, n_frames):
    """A DAVIS-2017-layout root holding the first frames of the real blackswan fixture."""
    import shutil

    from smtc_fast.evaluate import io as eio

    root = tmp_path / "DAVIS"
    for sub in ("JPEGImages/480p/blackswan", "Annotations/480p/blackswan", "Annotations_unsupervised/480p/blackswan",
                "ImageSets/2017"):
        (root / sub).mkdir(parents=True)
    for i in range(n_frames):
        shutil.copy(FRAMES[i], root / "JPEGImages/480p/blackswan")
        lab = (eio.read_label(ANNS[i]) > 0).astype(np.uint8)
        for sub in ("Annotations", "Annotations_unsupervised"):
            eio.write_indexed_png(str(root / sub / "480p/blackswan" / f"{i:05d}.png"), lab)
    (root / "ImageSets/2017/val.txt").write_text("blackswan\n")
    return root


def test_cli_train_from_official_dinov3_then_evaluate(tmp_path):
    import json

    from smtc_fast.cli import main

    name = "vit_small_patch16_dinov3_qkvb"
    vit = randomise(create_vit(name, depth=2))
    sd = dinov3_official(vit, torch.Generator().manual_seed(0))
    torch.save(sd, tmp_path / "dinov3_vits16_pretrain.pth")
    run = tmp_path / "run"
    assert main(["train", "--backbone", name, "--depth", "2", "--backbone-weights",
                 str(tmp_path / "dinov3_vits16_pretrain.pth"), "--resolution", "64", "64", "--num-slots", "4",
                 "--num-instances", "2", "--steps", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu",
                 "--output", str(run), "--quiet"]) == 0
    teacher = torch.load(run / "last.pt", weights_only=True)["teacher"]  # official: the teacher keeps the start
    assert torch.equal(teacher["encoder.blocks.1.gamma_2"], sd["blocks.1.ls2.gamma"])
    assert torch.equal(teacher["encoder.reg_token"], sd["storage_tokens"])
    root = _davis_root(tmp_path, n_frames=3)
    assert main(["eval-prop", "--root", str(root), "--out", str(tmp_path / "prop"), "--features", "smtc",
                 "--checkpoint", str(run / "last.pt"), "--device", "cpu", "--no-overlays"]) == 0
    summary = json.load(open(tmp_path / "prop" / "eval_prop-davis.json"))
    assert 0.0 <= summary["global"]["J&F-Mean"] <= 1.0
    assert main(["eval-discovery", "--root", str(root), "--checkpoint", str(run / "last.pt"), "--out",
                 str(tmp_path / "disc"), "--resolution", "64", "96", "--device", "cpu"]) == 0


def test_cli_eval_prop_timm_features_from_official_dinov2(tmp_path, capsys):
    """`--features timm` with a full-size DINOv2-reg file under its published names and the patch-14 preset."""
    import json

    from smtc_fast.cli import main

    vit = create_vit("vit_small_patch14_reg4_dinov2", drop_path_rate=0.0)
    torch.save(dinov2_official(vit, torch.Generator().manual_seed(0)), tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    root = _davis_root(tmp_path, n_frames=3)  # frames 1 .. T-2 are scored
    assert main(["eval-prop", "--root", str(root), "--out", str(tmp_path / "prop"), "--features", "timm",
                 "--backbone", "vit_small_patch14_reg4_dinov2", "--checkpoint",
                 str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"), "--preset", "smtc-patch14", "--device", "cpu",
                 "--no-overlays"]) == 0
    summary = json.load(open(tmp_path / "prop" / "eval_prop-davis.json"))
    assert summary["settings"]["radius"] == 8 and summary["settings"]["map_scale"] == 14
    assert "note:" not in capsys.readouterr().err  # the preset matches the backbone's grid
