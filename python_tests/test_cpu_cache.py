"""The CPU kernels' output cache (csrc/common/alloc.h): reused blocks give the same results as fresh ones, the cap
holds, release gives memory back, and the cached tensors behave like any other CPU tensor."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import smtc_fast
from smtc_fast import _extension, ops
from smtc_fast.testing import assert_close_to_reference

pytestmark = pytest.mark.skipif(not _extension.extension_loaded(), reason="needs the compiled extension")

MB = 1 << 20


def sinkhorn_case(seed, B=16, N=256):
    """A (B, N, N) float32 problem: 4 MB, the size from which the kernels' outputs come from the cache."""
    g = torch.Generator().manual_seed(seed)
    fi = F.normalize(torch.randn(B, N, 32, generator=g), dim=-1)
    fj = F.normalize(torch.randn(B, N, 32, generator=g), dim=-1)
    cost = (1 - fi @ fj.transpose(1, 2)).contiguous()
    lmu = torch.log_softmax(torch.randn(B, N, generator=g), -1)
    lnu = torch.log_softmax(torch.randn(B, N, generator=g), -1)
    return cost, lmu, lnu


def test_info_defaults():
    info = smtc_fast.cpu_cache_info()
    assert set(info) == {"kept_bytes", "limit_bytes"}
    expected = int(os.environ.get("SMTC_FAST_CPU_CACHE_MB", "1024")) * MB
    assert info["limit_bytes"] == expected


def test_reused_block_gives_the_reference_result():
    smtc_fast.release_cpu_cache()
    assert smtc_fast.cpu_cache_info()["kept_bytes"] == 0
    cost_a, lmu_a, lnu_a = sinkhorn_case(0)
    plan_a = ops.sinkhorn(cost_a, lmu_a, lnu_a)
    ptr_a = plan_a.data_ptr()
    del plan_a  # back into the cache, still holding problem A's plan
    assert smtc_fast.cpu_cache_info()["kept_bytes"] >= 4 * MB
    cost_b, lmu_b, lnu_b = sinkhorn_case(1)
    plan_b = ops.sinkhorn(cost_b, lmu_b, lnu_b)
    assert plan_b.data_ptr() == ptr_a  # the same block, handed out again
    assert_close_to_reference(plan_b, ops.sinkhorn_reference(cost_b, lmu_b, lnu_b))
    assert smtc_fast.cpu_cache_info()["kept_bytes"] == 0


def test_backward_through_reused_blocks():
    # stage 1 at B=16, N=256, D=384: d_values is 6 MB, so both backward calls return cached blocks
    B, S, N, D = 16, 8, 256, 384
    smtc_fast.release_cpu_cache()
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(B, S, N, generator=g, requires_grad=True)
        values = torch.randn(B, N, D, generator=g, requires_grad=True)
        upd = torch.randn(B, S, D, generator=g)
        out = ops.slot_aggregate(logits, values)[0]
        got = torch.autograd.grad(out, (logits, values), upd)
        ref_out = ops.slot_aggregate_reference(logits, values)[0]
        want = torch.autograd.grad(ref_out, (logits, values), upd)
        assert_close_to_reference(out, ref_out)
        for a, b in zip(got, want):
            assert_close_to_reference(a, b)
        del out, got


def test_release_returns_the_bytes():
    cost, lmu, lnu = sinkhorn_case(2)
    plan = ops.sinkhorn(cost, lmu, lnu)
    del plan
    kept = smtc_fast.cpu_cache_info()["kept_bytes"]
    assert kept >= 4 * MB
    assert smtc_fast.release_cpu_cache() == kept
    assert smtc_fast.cpu_cache_info()["kept_bytes"] == 0


def test_cached_tensor_is_an_ordinary_tensor(tmp_path):
    cost, lmu, lnu = sinkhorn_case(3)
    plan = ops.sinkhorn(cost, lmu, lnu)
    ref = plan.clone()
    # resizable (the storage knows its allocator), picklable, shareable between processes
    plan.resize_(2 * plan.numel())
    torch.testing.assert_close(plan[: ref.numel()], ref.flatten())
    plan = ops.sinkhorn(cost, lmu, lnu)
    torch.save(plan, tmp_path / "plan.pt")
    torch.testing.assert_close(torch.load(tmp_path / "plan.pt"), ref)
    plan.share_memory_()
    assert plan.is_shared()
    torch.testing.assert_close(plan, ref)


def _run(code, **env):
    full_env = dict(os.environ, **env)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


CHILD = """
    import torch, torch.nn.functional as F
    import smtc_fast
    from smtc_fast import ops
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(16, 256, 256, generator=g)
    plans = [ops.sinkhorn(cost + i) for i in range(3)]  # three live 4 MB outputs
    del plans
    info = smtc_fast.cpu_cache_info()
    print(info["kept_bytes"] >> 20, info["limit_bytes"] >> 20)
"""


def test_cap_and_off_switch():
    assert _run(CHILD, SMTC_FAST_CPU_CACHE_MB="0") == "0 0"  # off: nothing kept
    assert _run(CHILD, SMTC_FAST_CPU_CACHE_MB="9") == "8 9"  # two 4 MB blocks fit under 9 MB, the third is freed
    assert _run(CHILD, SMTC_FAST_CPU_CACHE_MB="64") == "12 64"


def test_without_extension(monkeypatch):
    monkeypatch.setattr(_extension, "_C", None)
    assert smtc_fast.cpu_cache_info() == {"kept_bytes": 0, "limit_bytes": 0}
    assert smtc_fast.release_cpu_cache() == 0
