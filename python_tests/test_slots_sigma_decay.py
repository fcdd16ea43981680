"""slots_sigma under AdamW (issue 16 part 2): the official stage-2 init is torch.normal(mu, exp(log_sigma)) (spec
§1.3), whose derivative is a zero tensor, so AdamW's decoupled weight decay moves log sigma every step although no
loss reaches it. sigma_grad="zero" (default) reproduces that; sigma_grad="none" (ours) leaves sigma untouched."""
import pytest
import torch

from smtc_fast.losses import object_loss
from smtc_fast.models import SMTC, SMTCConfig
from smtc_fast.train import param_groups

pytestmark = pytest.mark.usefixtures("one_thread")

LR, WD = 2e-5, 0.1  # the official recipe (spec §1.6)


def tiny(**kw):
    return SMTCConfig(backbone="vit_tiny_patch16_224", patch_size=8, depth=2, img_size=64, resolution=(64, 64),
                      num_slots=4, num_instances=3, drop_path_rate=0.0, **kw)


def test_torch_normal_gives_zero_gradient_tensors():
    """The oracle: what the official code's torch.normal gives its parameters in backward."""
    mu = torch.randn(1, 4, 1, 8, requires_grad=True)
    log_sigma = torch.randn(1, 4, 1, 8, requires_grad=True)
    sample = torch.normal(mu.expand(2, 4, 3, 8), log_sigma.exp().expand(2, 4, 3, 8))
    (sample * torch.randn_like(sample)).sum().backward()
    assert mu.grad is not None and log_sigma.grad is not None
    assert torch.equal(log_sigma.grad, torch.zeros_like(log_sigma)) and torch.equal(mu.grad, torch.zeros_like(mu))


def _one_adamw_step(sigma_grad):
    torch.manual_seed(0)
    model = SMTC(tiny(sigma_grad=sigma_grad))
    optimizer = torch.optim.AdamW(param_groups(model, WD), lr=LR)
    x = torch.randn(1, 2, 3, 64, 64)
    out_s = model(x)
    with torch.no_grad():
        out_t = model(x)
    ones = torch.ones(out_s.proj.shape[:-1])
    loss = object_loss(out_s.proj, out_t.proj, ones, ones)  # L_obj: the loss that reads the instance slots
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sigma = model.slot_attention.slots_sigma
    before = sigma.detach().clone()
    grad = None if sigma.grad is None else sigma.grad.clone()
    optimizer.step()
    return model, before, grad, sigma.detach().clone()


def test_official_sigma_gets_a_zero_grad_and_decays():
    model, before, grad, after = _one_adamw_step("zero")
    sigma = model.slot_attention.slots_sigma
    group = [g for g in param_groups(model, WD) if any(p is sigma for p in g["params"])][0]
    assert group["name"] == "head" and group["weight_decay"] == WD  # a 4-D weight tensor: decayed (spec §1.6)
    assert grad is not None and torch.equal(grad, torch.zeros_like(grad))
    # AdamW with a zero gradient: moments stay 0, the Adam update is 0/(0+eps) = 0; only p *= 1 - lr*wd remains.
    expected = before * (1 - LR * WD)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-12)
    assert not torch.equal(after, before)
    step = (before - after).abs().max().item()
    assert 0.5 * LR * WD * before.abs().max().item() < step <= LR * WD * before.abs().max().item() * 1.0001
    # mu also gets the zero tensor from stage 2 but its real gradient comes from stage 1 (L_sem); here L_obj only.
    assert torch.equal(model.slot_attention.slots_mu.grad, torch.zeros_like(model.slot_attention.slots_mu))


def test_ours_sigma_has_no_grad_and_stays():
    _, before, grad, after = _one_adamw_step("none")
    assert grad is None
    assert torch.equal(after, before)


def test_same_forward_either_way():
    torch.manual_seed(0)
    a = SMTC(tiny(sigma_grad="zero"))
    b = SMTC(tiny(sigma_grad="none"))
    b.load_state_dict(a.state_dict())
    x, noise = torch.randn(1, 2, 3, 64, 64), torch.randn(2, 4, 3, 192)
    assert torch.equal(a(x, noise).instance_slots, b(x, noise).instance_slots)
    with pytest.raises(ValueError, match="sigma_grad"):
        SMTC(tiny(sigma_grad="learned"))
