"""The SMTC model against spec §1: shapes, checkpoint names, the keys, the fusion, the slot attention (vs an
independent loop implementation), gradient flow (§1.5), reproducible instance noise and the paper variants."""
import math

import pytest
import torch
import torch.nn.functional as F

from smtc_fast.losses import object_loss, overlap_loss, semantic_loss
from smtc_fast.models import SMTC, SMTCConfig, interpolate_pos_embed, load_checkpoint, vit_forward
from smtc_fast.testing import dispatched_ops, kernel_namespace, kernel_ran

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    base = dict(backbone="vit_tiny_patch16_224", patch_size=8, depth=2, img_size=64, resolution=(64, 64), num_slots=4,
                num_instances=3, drop_path_rate=0.0)
    base.update(kw)
    return SMTCConfig(**base)


def official_state_dict(S=16, D=384, depth=12, n_train=256):
    """A synthetic checkpoint with exactly the names and shapes spec §6 lists (written out independently)."""
    sd = {"encoder.cls_token": (1, 1, D), "encoder.pos_embed": (1, 197, D), "encoder.patch_embed.proj.weight": (D, 3, 16, 16),
          "encoder.patch_embed.proj.bias": (D,), "encoder.norm.weight": (D,), "encoder.norm.bias": (D,)}
    for i in range(depth):
        b = f"encoder.blocks.{i}."
        sd.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                   b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                   b + "norm2.weight": (D,), b + "norm2.bias": (D,), b + "mlp.fc1.weight": (4 * D, D),
                   b + "mlp.fc1.bias": (4 * D,), b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,)})
    sd.update({"transport_proj.weight": (D, n_train, 1), "transport_proj.bias": (D,),
               "mlp_slot.0.weight": (2 * D, D), "mlp_slot.0.bias": (2 * D,), "mlp_slot.2.weight": (D, 2 * D),
               "mlp_slot.2.bias": (D,), "slot_attention.slots_mu": (1, S, 1, D),
               "slot_attention.slots_sigma": (1, S, 1, D)})
    for n in ("norm_input", "norm_slots", "norm_pre_ff"):
        sd.update({f"slot_attention.{n}.weight": (D,), f"slot_attention.{n}.bias": (D,)})
    for n in ("project_q", "project_k", "project_v", "mlp.0", "mlp.2"):
        sd.update({f"slot_attention.{n}.weight": (D, D), f"slot_attention.{n}.bias": (D,)})
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v, generator=g) * 0.02 for k, v in sd.items()}


@pytest.fixture(scope="module")
def default_model():
    return SMTC(SMTCConfig())


def test_official_checkpoint_loads_strict(default_model, tmp_path):
    sd = official_state_dict()
    assert set(default_model.state_dict()) == set(sd)
    default_model.load_state_dict(sd, strict=True)
    for k, v in default_model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    path = tmp_path / "released.pth"
    torch.save({"iteration": 7000, "model_state_dict": sd, "optimizer_state_dict": {}, "loss": torch.tensor(1.0)}, path)
    model, kind = load_checkpoint(str(path))
    assert kind == "official" and model.config.num_slots == 16 and model.config.resolution == (256, 256)
    assert torch.equal(model.slot_attention.slots_mu, sd["slot_attention.slots_mu"])


def test_dino_file_and_bad_keys(tmp_path):
    sd = official_state_dict()
    dino = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    torch.save(dino, tmp_path / "dino_deitsmall16_pretrain.pth")
    model, kind = load_checkpoint(str(tmp_path / "dino_deitsmall16_pretrain.pth"))
    assert kind == "dino"
    assert torch.equal(model.encoder.pos_embed, sd["encoder.pos_embed"])
    bad = dict(sd)
    bad["slot_attention.gru.weight"] = bad.pop("slot_attention.project_v.weight")
    with pytest.raises(RuntimeError, match=r"(?s)missing keys \(1\).*project_v.weight.*unexpected keys \(1\).*gru"):
        model.load_state_dict(bad, strict=True)


def test_pos_embed_interpolation_is_dino_scale_factor_call():
    pe = torch.randn(1, 197, 384, generator=torch.Generator().manual_seed(1))
    out = interpolate_pos_embed(pe, 16, 16)
    grid = pe[:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(16.1 / 14, 16.1 / 14), mode="bicubic")
    assert torch.equal(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 256, 384))
    assert torch.equal(out[:, :1], pe[:, :1])
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, 384)
    assert (out[:, 1:] - by_size).abs().max() > 0.1  # spec §1.1: a size-resize is not the same thing
    assert interpolate_pos_embed(pe, 30, 50).shape == (1, 1 + 1500, 384)


def test_keys_are_the_last_blocks_attention_keys():
    model = SMTC(tiny()).eval()
    vit = model.encoder
    x = torch.randn(2, 3, 64, 64)
    captured = {}
    h1 = vit.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: captured.__setitem__("qkv", o))
    h2 = vit.blocks[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    vit.forward_features(x)  # timm's own forward (64x64 = the pretrained grid: no pos-embed resize)
    h1.remove(), h2.remove()
    keys, tokens, grid = vit_forward(vit, x, return_tokens=True)
    D, heads = vit.embed_dim, vit.blocks[-1].attn.num_heads
    qkv = captured["qkv"].reshape(2, 65, 3, heads, D // heads)  # timm's layout: (which, head, d)
    want = qkv[:, 1:, 1].reshape(2, 64, D)  # keys, heads concatenated (channel = head*hd + d), CLS dropped
    assert grid == (8, 8)
    torch.testing.assert_close(keys, want)
    torch.testing.assert_close(tokens, captured["out"][:, 1:])  # last block output, before the final norm


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (96, 64)])
def test_shapes_at_several_resolutions(size):
    cfg = tiny()
    model = SMTC(cfg)
    B, T, S, P = 2, 3, cfg.num_slots, cfg.num_instances
    H, W = size
    n = (H // 8) * (W // 8)
    out = model(torch.randn(B, T, 3, H, W))
    D = 192
    assert out.semantic_logits.shape == (B, T, S, n)
    assert out.keys.shape == (B, T, n, D)
    assert out.semantic_slots.shape == (B, T, S, D)
    assert out.instance_slots.shape == (B, T, S, P, D)
    assert out.proj.shape == (B, T, S, P, D)
    torch.testing.assert_close(out.proj.norm(dim=-1), torch.ones(B, T, S, P))
    pred = model.predict(torch.randn(1, 2, 3, H, W))
    assert pred.semantic_mask.shape == (1, 2, S, H // 8, W // 8)
    assert pred.instance_mask.shape == (1, 2, S, P, H // 8, W // 8)
    assert pred.similarity.shape == pred.valid.shape == (1, 2, S, P)
    torch.testing.assert_close(pred.semantic_mask.sum(2), torch.ones(1, 2, H // 8, W // 8))
    torch.testing.assert_close(pred.instance_mask.sum(3), pred.semantic_mask)


def test_fusion_uses_previous_frame_cyclically_and_resizes_only_the_reference():
    model = SMTC(tiny())
    B, T, D = 1, 3, 192
    for (h, w) in [(8, 8), (6, 10)]:
        keys = torch.randn(B * T, h * w, D)
        x = model.fuse(keys, B, T, (h, w))
        for t in range(T):
            ref = keys[(t - 1) % T].T.reshape(1, D, h, w)
            ref = F.interpolate(ref, size=(8, 8), mode="bilinear", align_corners=False)[0].reshape(D, 64)
            C = ref.T @ keys[t].T  # (n_train, n): raw dot products
            want = keys[t] + (model.transport_proj.weight[:, :, 0] @ C + model.transport_proj.bias[:, None]).T
            torch.testing.assert_close(x[t], want, atol=1e-4, rtol=1e-4)


def naive_slot_attention(sa, x, noise):
    """Spec §1.3 written as plain loops over slots, in float64 (no shared code with the model)."""
    x = sa.norm_input(x)
    k, v = sa.project_k(x), sa.project_v(x)
    B, N, D = x.shape
    mu = sa.slots_mu[0, :, 0]
    slots = mu[None].repeat(B, 1, 1)
    for _ in range(sa.iters):
        q = sa.project_q(sa.norm_slots(slots))
        logits = q @ k.transpose(1, 2) / math.sqrt(D)
        a = torch.exp(logits - logits.max(1, keepdim=True).values)
        a = a / a.sum(1, keepdim=True) + 1e-8
        a = a / a.sum(-1, keepdim=True)
        slots = slots + a @ v
        slots = slots + sa.mlp(sa.norm_pre_ff(slots))
    sem_logits, sem_slots = logits, slots
    mask = (sem_logits > sa.tau).double()
    inst = sa.slots_mu[0, :, 0][None, :, None] + sa.slots_sigma[0, :, 0].exp()[None, :, None] * noise
    for _ in range(sa.iters):
        q = sa.project_q(sa.norm_slots(inst))
        logits = torch.einsum("bspd,bnd->bspn", q, k) / math.sqrt(D)
        a = logits.softmax(dim=2) + 1e-8
        a = a * mask[:, :, None]
        a = a / (a.sum(-1, keepdim=True) + 1e-8)
        inst = inst + torch.einsum("bspn,bnd->bspd", a, v)
        inst = inst + sa.mlp(sa.norm_pre_ff(inst))
    return sem_logits, sem_slots, logits, inst


def test_slot_attention_matches_naive_loops():
    torch.manual_seed(0)
    model = SMTC(tiny()).double()
    sa = model.slot_attention
    x = torch.randn(3, 20, 192, dtype=torch.float64) * 3
    noise = torch.randn(3, 4, 3, 192, dtype=torch.float64)
    out = sa(x, instance_noise=noise)
    sem_logits, sem_slots, ins_logits, inst = naive_slot_attention(sa, x, noise)
    assert 0 < (sem_logits > sa.tau).double().mean() < 1  # the mask is neither empty nor full here
    # float64 rounding only (<= 2e-15 here): float64's default rtol 1e-7 could not see the eps = 1e-8 terms
    tol = dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(out["semantic_logits"], sem_logits, **tol)
    torch.testing.assert_close(out["semantic_slots"], sem_slots, **tol)
    torch.testing.assert_close(out["instance_logits"], ins_logits, **tol)
    torch.testing.assert_close(out["instance_slots"], inst, **tol)


def test_instance_noise_makes_runs_reproducible():
    model = SMTC(tiny()).eval()
    x = torch.randn(1, 2, 3, 64, 64)
    noise = torch.randn(2, 4, 3, 192)
    a, b = model(x, noise), model(x, noise)
    assert torch.equal(a.instance_slots, b.instance_slots)
    c = model(x, torch.randn(2, 4, 3, 192))
    assert torch.equal(a.semantic_slots, c.semantic_slots)  # stage 1 is deterministic
    assert not torch.allclose(a.instance_slots, c.instance_slots)
    with pytest.raises(ValueError, match="instance_noise must have shape"):
        model(x, torch.randn(2, 4, 192))


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: (p.grad is not None and p.grad.abs().sum().item() > 0) for n, p in model.named_parameters()}


def test_gradient_flow_matches_spec_1_5():
    torch.manual_seed(0)
    model = SMTC(tiny(stage2_mask="soft"))
    x = torch.randn(2, 2, 3, 64, 64)
    out_s, out_t = model(x), model(x)
    l_semreg = semantic_loss(out_s.semantic_logits, out_t.semantic_logits.detach(), out_t.keys.detach()) \
        + overlap_loss(out_s.semantic_logits)
    g = _grads(model, l_semreg)
    assert g["slot_attention.slots_mu"] and g["slot_attention.project_q.weight"] and g["transport_proj.weight"]
    assert g["encoder.blocks.0.attn.qkv.weight"]
    assert not g["slot_attention.project_v.weight"] and not g["slot_attention.mlp.0.weight"]
    assert not g["slot_attention.norm_pre_ff.weight"] and not g["mlp_slot.0.weight"]
    assert not g["slot_attention.slots_sigma"]
    ones = torch.ones(out_s.proj.shape[:-1])
    l_obj = object_loss(out_s.proj, out_t.proj.detach(), ones, ones)
    g = _grads(model, l_obj)
    assert g["slot_attention.project_v.weight"] and g["slot_attention.mlp.0.weight"] and g["mlp_slot.0.weight"]
    assert not g["slot_attention.slots_sigma"] and not g["slot_attention.slots_mu"]  # torch.normal: no reparam
    assert not g["encoder.blocks.1.attn.proj.weight"] and not g["encoder.norm.weight"]


def test_paper_variants_run():
    for kw in (dict(slot_update="gru"), dict(stage2_mask="prob"), dict(stage2_mask="soft")):
        model = SMTC(tiny(**kw))
        out = model(torch.randn(1, 2, 3, 64, 64))
        assert out.instance_slots.shape == (1, 2, 4, 3, 192)
    assert "slot_attention.gru.weight_ih" in SMTC(tiny(slot_update="gru")).state_dict()
    assert SMTC(tiny(stage2_mask="prob")).slot_attention.tau == 0.5
    with pytest.raises(ValueError, match="stage2_mask"):
        SMTC(tiny(stage2_mask="hard"))


def test_resnet50_backbone_is_stride_8():
    model = SMTC(SMTCConfig(backbone="resnet50", resolution=(64, 64), num_slots=4, num_instances=2))
    assert model.transport_proj.in_channels == 64
    out = model(torch.randn(1, 2, 3, 64, 64))
    assert out.semantic_logits.shape == (1, 2, 4, 64) and out.keys.shape == (1, 2, 64, 384)


def test_bad_frames_raise():
    model = SMTC(tiny())
    with pytest.raises(ValueError, match=r"frames must be \(B, T, 3, H, W\)"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model(torch.randn(1, 2, 3, 60, 64))


def test_resnet50_loads_moco_weights(tmp_path):
    import torchvision

    ref = torchvision.models.resnet50(weights=None)
    sd = {"module.encoder_q." + k: v for k, v in ref.state_dict().items()}
    sd["module.encoder_q.fc.0.weight"] = torch.zeros(2048, 2048)  # MoCo v2's MLP head: ignored
    torch.save({"state_dict": sd, "epoch": 200}, tmp_path / "moco_v2_800ep_pretrain.pth.tar")
    model = SMTC(SMTCConfig(backbone="resnet50", resolution=(64, 64), num_slots=4, num_instances=2))
    model.encoder.load_moco(str(tmp_path / "moco_v2_800ep_pretrain.pth.tar"))
    assert torch.equal(model.encoder.body[0].weight, ref.conv1.weight)
    assert torch.equal(model.encoder.body[7][2].conv3.weight, ref.layer4[2].conv3.weight)


def test_kernels_and_references_give_the_same_training_step(monkeypatch):
    """The model and losses through the compiled ops (when built) and through SMTC_FAST_FORCE_REFERENCE=1."""
    torch.manual_seed(0)
    model = SMTC(tiny(stage2_mask="soft"))
    x = torch.randn(2, 3, 3, 64, 64)
    noise = torch.randn(6, 4, 3, 192)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x, noise)
        ones = torch.ones(out.proj.shape[:-1])
        loss = semantic_loss(out.semantic_logits, out.semantic_logits.detach(), out.keys.detach()) \
            + overlap_loss(out.semantic_logits) + object_loss(out.proj, out.proj.detach(), ones, ones)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setenv("SMTC_FAST_FORCE_REFERENCE", "0")
    # L_sem runs the fused transport_loss op (its Sinkhorn iterations inside; issue 15), not the sinkhorn op
    ops = ("correlation", "slot_aggregate", "transport_loss", "_correlation_backward", "_slot_aggregate_backward",
           "_transport_loss_backward")
    with kernel_ran("cpu", *ops):  # otherwise this would compare the references with themselves
        loss_k, grads_k = run()
    monkeypatch.setenv("SMTC_FAST_FORCE_REFERENCE", "1")
    with dispatched_ops(kernel_namespace("cpu")) as calls:
        loss_r, grads_r = run()
    assert not calls, f"SMTC_FAST_FORCE_REFERENCE=1 still called {dict(calls)}"
    torch.testing.assert_close(loss_k, loss_r, atol=1e-5, rtol=1e-5)
    assert grads_k.keys() == grads_r.keys()
    for n in grads_k:
        torch.testing.assert_close(grads_k[n], grads_r[n], atol=1e-4, rtol=1e-3, msg=n)


def test_bf16_autocast_forward_and_losses():
    """The trainer's CUDA path runs under bf16 autocast; the same dtype plumbing is checked here on the CPU."""
    from smtc_fast.losses import smtc_losses

    torch.manual_seed(0)
    model = SMTC(tiny())
    x = torch.randn(1, 2, 3, 64, 64)
    noise = torch.randn(2, 4, 3, 192)  # the same instance noise in both precisions

    def step(bf16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            s = model(x, noise)
            with torch.no_grad():
                t = model(x, noise)
        losses = smtc_losses(s, t)
        losses["total"].backward()
        return s, losses, model.slot_attention.project_q.weight.grad.clone()

    s, losses, grad = step(True)
    assert s.semantic_logits.dtype == torch.bfloat16 and losses["total"].dtype == torch.float32
    s32, losses32, grad32 = step(False)
    # bf16 keeps 8 significant bits (relative rounding 2^-9): measured here, |logits - fp32| <= 0.01 (logits up to
    # 0.9), losses within 4e-3, the q-projection gradient 1.6% off in norm; the bounds below leave ~3x room.
    torch.testing.assert_close(s.semantic_logits.float(), s32.semantic_logits, atol=3e-2, rtol=0)
    assert losses["valid_frac"] == losses32["valid_frac"]  # the same instances pass the validity filter
    for k in ("total", "sem", "reg", "obj"):
        assert losses[k].item() == pytest.approx(losses32[k].item(), abs=1e-2), k
    assert (grad - grad32).norm() <= 0.05 * grad32.norm()


def test_model_defaults_are_the_official_model():
    """Spec §1.3: S = 16 semantic x P = 4 instance slots, 3 iterations in training, eps 1e-8, the stage-2 mask
    (semantic logits > 0.3), the residual slot update. Pinned: tests build small models with explicit values."""
    cfg = SMTCConfig()
    assert (cfg.num_slots, cfg.num_instances, cfg.iters) == (16, 4, 3)
    assert (cfg.stage2_mask, cfg.tau, cfg.slot_update) == ("logits", None, "residual")
    sa = SMTC(tiny()).slot_attention  # tiny() keeps the defaults below
    assert (sa.eps, sa.tau, sa.stage2_mask, sa.iters) == (1e-8, 0.3, "logits", 3)
