"""bf16 autocast on the CPU (issue 15 part 3): detection, the kernels under autocast, bf16 vs float32 agreement.

CPU autocast runs on any CPU (bf16 is emulated without AVX512-BF16 / AMX), so these tests run everywhere; where
the trainer's choice matters they pretend the CPU has native bf16 (monkeypatched smtc_fast.precision.cpu_bf16).
"""
import json

import pytest
import torch

import smtc_fast
from smtc_fast import precision
from smtc_fast.models import SMTC, SMTCConfig
from smtc_fast.ops import correlation, slot_aggregate
from smtc_fast.ops._common import use_kernel


def small_model(**kw):
    # ViT-S width (384) with 2 blocks: the GEMM shapes of the real model, at test speed
    base = dict(backbone="vit_small_patch16_224", depth=2, resolution=(64, 64), num_slots=4, num_instances=3,
                drop_path_rate=0.0)
    base.update(kw)
    return SMTCConfig(**base)


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def test_build_info_reports_native_bf16():
    info = smtc_fast.build_info()
    assert info["cpu_bf16"] in (None, "amx_bf16", "avx512_bf16")
    try:
        flags = open("/proc/cpuinfo").read().split()
        assert (info["cpu_bf16"] is not None) == ("amx_bf16" in flags or "avx512_bf16" in flags)
    except OSError:
        pass
    assert precision.autocast_dtype("cpu", amp=False) is None
    assert precision.autocast_dtype("cpu", amp=True) == (torch.bfloat16 if info["cpu_bf16"] else None)
    assert precision.autocast_dtype("cuda", amp=True) == torch.bfloat16
    assert precision.describe("cpu", amp=False) == "float32 (--no-amp)"


def test_cpu_without_native_bf16_stays_float32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16", lambda: None)
    assert precision.autocast_dtype("cpu", amp=True) is None
    with precision.autocast("cpu", amp=True):
        assert not torch.is_autocast_enabled("cpu")
    assert "no native bf16" in precision.describe("cpu", amp=True)


@pytest.mark.skipif(not use_kernel(torch.zeros(1)), reason="needs the compiled CPU kernels")
def test_ops_run_their_float32_kernels_under_cpu_autocast(monkeypatch):
    """Inside torch.autocast('cpu'), bf16 inputs reach the CPU kernels (never the reference) and gradients flow
    back to the bf16 inputs. slot_aggregate runs its float32 kernel on the up-cast inputs (float32 results);
    correlation is one of autocast's bf16 GEMMs, as its reference torch.bmm is: bf16 result, equal to bmm's."""
    import sys

    corr_mod = sys.modules["smtc_fast.ops.correlation"]  # smtc_fast.ops.correlation is also the function's name
    agg_mod = sys.modules["smtc_fast.ops.slot_aggregate"]

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran: the kernel should serve autocast inputs")

    monkeypatch.setattr(corr_mod, "correlation_reference", no_reference)
    monkeypatch.setattr(agg_mod, "slot_aggregate_reference", no_reference)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 20, 16, generator=g).bfloat16().requires_grad_()
    b = torch.randn(3, 24, 16, generator=g).bfloat16().requires_grad_()
    logits = torch.randn(3, 4, 2, 24, generator=g).bfloat16().requires_grad_()
    values = torch.randn(3, 24, 16, generator=g).bfloat16().requires_grad_()
    mask = (torch.rand(3, 4, 24, generator=g) > 0.3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = correlation(a, b)
        upd, attn = slot_aggregate(logits, values, mask=mask)
        upd1, _ = slot_aggregate(logits[:, :, 0], values)  # stage 1
    assert upd.dtype == attn.dtype == upd1.dtype == torch.float32
    assert c.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c_bmm = torch.bmm(a.float(), b.float().transpose(1, 2))  # autocast casts float32 inputs to bf16 too
    torch.testing.assert_close(c, c_bmm, rtol=0, atol=0)
    ref_upd, ref_attn = torch.ops.smtc_fast.slot_aggregate(logits.float(), values.float(), mask.float(), 1e-8)
    torch.testing.assert_close(upd, ref_upd, rtol=0, atol=0)
    (c.sum() + upd.square().sum() + upd1.sum()).backward()
    for t in (a, b, logits, values):
        assert t.grad is not None and t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad.float()).all()
    # outside autocast a bf16 call is the caller's choice: it stays bf16
    assert correlation(a.detach(), b.detach()).dtype == torch.bfloat16


def test_smtc_forward_bf16_agrees_with_float32():
    """Eval-mode forward of a ViT-S-width model, bf16 autocast vs float32, same weights, input and noise.
    Measured relative errors (L2): keys 0.004, semantic logits 0.009, slots 0.004-0.005, proj 0.006; the
    bound is 3x that. Semantic masks (softmax over slots) agree to 0.002."""
    torch.manual_seed(0)
    model = SMTC(small_model()).eval()
    x = torch.randn(1, 2, 3, 64, 64)
    noise = torch.randn(2, 4, 3, 384)
    with torch.no_grad():
        ref = model(x, noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, noise)
    assert out.keys.dtype == torch.bfloat16 and out.semantic_slots.dtype == torch.float32  # slots: float32 kernel
    bounds = {"keys": 0.015, "semantic_logits": 0.03, "semantic_slots": 0.015, "instance_slots": 0.015,
              "proj": 0.02, "instance_logits": 0.03}
    for name, bound in bounds.items():
        err = rel_err(getattr(out, name), getattr(ref, name))
        assert err < bound, (name, err)
    sem = (out.semantic_logits.float().softmax(2) - ref.semantic_logits.softmax(2)).abs().max().item()
    assert sem < 0.01


def test_vit_tokens_amp_are_float32_and_close():
    from smtc_fast.evaluate.propagation import ViTTokens

    torch.manual_seed(0)
    model = SMTC(small_model())
    img = torch.randn(2, 3, 64, 96)
    ref = ViTTokens(model)(img)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(precision, "cpu_bf16", lambda: "avx512_bf16")
        got = ViTTokens(model, amp=True)(img)
    assert got.dtype == torch.float32 and got.shape == ref.shape == (2, 384, 4, 6)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert cos.min() > 0.999 and rel_err(got, ref) < 0.015


def test_train_amp_on_cpu_tracks_float32(tmp_path, monkeypatch, capsys):
    """`--amp` on a (pretend) native-bf16 CPU: the banner says so, and 4 steps follow the float32 losses
    (measured: within 1% per step)."""
    from smtc_fast.train import TrainConfig, train

    monkeypatch.setattr(precision, "cpu_bf16", lambda: "avx512_bf16")
    curves = {}
    for amp in (False, True):
        cfg = TrainConfig(output=str(tmp_path / f"amp{int(amp)}"), steps=4, batch_size=2, lr=1e-3, grad_iter=0,
                          encoder_lr_mult=1.0, workers=0, log_every=1, quiet=False, amp=amp, device="cpu")
        summary = train(cfg, small_model(depth=1, num_slots=4, num_instances=2))
        assert summary["exit_code"] == 0
        with open(tmp_path / f"amp{int(amp)}" / "metrics.jsonl") as f:
            curves[amp] = [json.loads(line)["loss"] for line in f]
    out = capsys.readouterr().out
    assert "precision float32 (--no-amp)" in out and "precision bf16 autocast (CPU avx512_bf16)" in out
    print("float32:", curves[False], "\nbf16:   ", curves[True])
    for f, b in zip(curves[False], curves[True]):
        assert b == pytest.approx(f, rel=0.03)
