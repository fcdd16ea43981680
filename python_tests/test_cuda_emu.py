"""The CPU execution tier of the CUDA kernels (csrc/common/cuda_emu.h): its own checks, each shown on a kernel with a
deliberate bug, and what it proves about our kernels: bitwise determinism under different thread schedules, the
launch limits of a real GPU, and loud validation of every tensor argument."""
import os

import pytest
import torch

import smtc_fast
from smtc_fast import _extension
from smtc_fast.ops import correlation, propagate_labels, sinkhorn, slot_aggregate, slot_aggregate_reference
from smtc_fast.ops._common import emulated_cuda

pytestmark = [
    pytest.mark.cuda_emu,
    pytest.mark.skipif(not smtc_fast.build_info()["cuda_emu"], reason="the CUDA execution tier is not built"),
]
EMU = torch.ops.smtc_fast_cuda_emu if smtc_fast.build_info()["cuda_emu"] else None


def selftest(name, schedule="forward", monkeypatch=None):
    os.environ["SMTC_FAST_EMU_SCHEDULE"] = schedule
    try:
        error, values = _extension._C.emu_selftest(name)
    finally:
        os.environ.pop("SMTC_FAST_EMU_SCHEDULE", None)
    return error, torch.tensor(values)


def test_build_info_says_the_tier_was_built():
    info = smtc_fast.build_info()
    assert info["cuda_emu"] is True and info["why_no_cuda_emu"] is None
    assert set(_extension._C.emu_selftest_names()) >= {"reverse", "deadlock", "divergent_barrier"}


# ---------------------------------------------------------------------------------------------- the tier's checks
@pytest.mark.parametrize("schedule", ["forward", "reverse", "random:1", "random:2"])
def test_barrier_makes_shared_memory_exchange_correct(schedule):
    error, out = selftest("reverse", schedule)
    assert error == ""
    expected = torch.cat([torch.arange(255, -1, -1), torch.arange(511, 255, -1)]).float()
    assert torch.equal(out, expected)


def test_missing_syncthreads_is_exposed_by_the_schedules():
    """The same kernel without its __syncthreads: threads read shared memory before the others wrote it. The
    forward schedule runs each thread up to its end before the next one starts, so the read sees stale data."""
    expected = torch.cat([torch.arange(255, -1, -1), torch.arange(511, 255, -1)]).float()
    results = [selftest("reverse_without_barrier", s)[1] for s in ("forward", "reverse", "random:1")]
    assert any(not torch.equal(r, expected) for r in results)
    assert not all(torch.equal(results[0], r) for r in results[1:])


def test_divergent_barrier_is_an_error_naming_kernel_and_lines():
    error, _ = selftest("divergent_barrier")
    assert "divergent __syncthreads" in error and "divergent_barrier_kernel" in error
    lines = [int(part.split(":")[1].split()[0]) for part in error.split("waits at ")[1:]]
    assert len(lines) == 2 and lines[0] != lines[1]


def test_deadlock_is_an_error_naming_the_waiting_threads():
    error, _ = selftest("deadlock")
    assert "deadlock" in error and "deadlock_kernel" in error
    assert "warp collective" in error and "lanes arrived 0xffff" in error


def test_warp_mask_errors():
    error, _ = selftest("mask_mismatch")
    assert "mask does not name the calling lane" in error and "lane 16" in error
    error, _ = selftest("partial_warp")
    assert "partial warp" in error


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random:3"])
def test_warp_collectives_are_real_exchanges(schedule):
    error, out = selftest("warp_ops", schedule)
    assert error == ""
    lane = torch.arange(32).float()
    out = out.view(7, 32)
    assert torch.equal(out[0], torch.full((32,), 496.0))                          # butterfly sum
    assert torch.equal(out[1], torch.where(lane + 3 < 32, lane + 3, lane))        # shfl_down
    assert torch.equal(out[2], torch.where(lane >= 2, lane - 2, lane))            # shfl_up
    assert torch.equal(out[3], torch.full((32,), 5.0))                            # shfl from lane 5
    assert torch.equal(out[4], (torch.arange(32) ^ 1).float())                    # xor within width 4
    assert torch.equal(out[5], torch.full((32,), 11.0))                           # popc(ballot)
    assert torch.equal(out[6], (torch.arange(32) ^ 8).float())                    # two half-warps apart


@pytest.mark.skipif(smtc_fast.build_info().get("sanitize") != "address",
                    reason="needs the AddressSanitizer build (make test-cuda-emu-asan)")
def test_out_of_bounds_read_in_a_kernel_is_caught_by_asan():
    """A kernel reading one element past its input: under ASan the tier's fibers run with the sanitizer, and the
    report names the kernel's source line."""
    import subprocess
    import sys

    code = "from smtc_fast import _extension; _extension._C.emu_selftest('out_of_bounds')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0:detect_odr_violation=0"))
    assert res.returncode != 0
    assert "heap-buffer-overflow" in res.stderr and "out_of_bounds_kernel" in res.stderr


def test_order_dependent_float_atomic_shows_as_a_difference():
    sums = {float(selftest("float_atomic", s)[1][0]) for s in ("forward", "reverse", "random:1", "random:2")}
    assert len(sums) > 1


@pytest.mark.parametrize("name, match", [
    ("too_many_threads", "more than 1024 threads"),
    ("grid_y_too_large", "grid dimension over its limit"),
    ("zero_grid", "zero-size grid"),
    ("smem_without_opt_in", "must opt in"),
])
def test_launch_limits_of_a_real_gpu(name, match):
    error, _ = selftest(name)
    assert match in error


def test_dynamic_shared_memory_above_48k_with_opt_in_and_3d_grids():
    error, out = selftest("smem_with_opt_in")
    assert error == "" and torch.equal(out, torch.arange(63, -1, -1).float())
    error, out = selftest("grid_3d")
    assert error == ""
    assert out.tolist() == [x + 10 * y + 100 * z for z in range(2) for y in range(2) for x in range(3)]


def test_bad_schedule_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SMTC_FAST_EMU_SCHEDULE", "sideways")
    with pytest.raises(RuntimeError, match="SMTC_FAST_EMU_SCHEDULE='sideways'"):
        EMU.sinkhorn(torch.rand(1, 4, 4), torch.zeros(1, 4), torch.zeros(1, 4), 0.1, 2, None)


# ---------------------------------------------------------------------------------------------- our kernels
def _run_all_ops(dtype):
    """Every emulated op forward and backward on one fixed input; returns every output tensor."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, 300, generator=g).to(dtype)  # N > 256 threads: two tokens for some threads
    values = torch.randn(2, 300, 8, generator=g).to(dtype)
    mask = (torch.rand(2, 3, 300, generator=g) < 0.5).to(dtype)
    u, a = EMU.slot_aggregate(logits, values, mask, 1e-8)
    gl, gv = EMU._slot_aggregate_backward(torch.randn(u.shape, generator=g).to(dtype), torch.randn(a.shape, generator=g).to(dtype),
                                          logits, values, mask, a, 1e-8)
    outs = [u, a, gl, gv]
    if dtype in (torch.float32, torch.float64):
        cost = torch.rand(3, 40, 70, generator=g).to(dtype)
        lm, ln = torch.full((3, 40), -torch.log(torch.tensor(40.0))).to(dtype), torch.full((3, 70), -torch.log(torch.tensor(70.0))).to(dtype)
        plan, f, gg = EMU.sinkhorn(cost, lm, ln, 0.05, 3, None)
        gc = EMU._sinkhorn_backward(torch.randn(plan.shape, generator=g).to(dtype), torch.zeros_like(f),
                                    torch.zeros_like(gg), cost, lm, ln, 0.05, 3, None)
        outs += [plan, f, gg, gc]
    if dtype == torch.float32:
        q = torch.nn.functional.normalize(torch.randn(6 * 7, 16, generator=g), dim=1)
        ctx = torch.nn.functional.normalize(torch.randn(3, 6 * 7, 16, generator=g), dim=2)
        lab = torch.rand(6 * 7, 4, generator=g)
        outs.append(EMU.propagate_labels(q, q, lab, ctx, torch.rand(3, 6 * 7, 4, generator=g), [6, 7], 5, 2.5, 0.1))
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_kernel_is_bitwise_deterministic_across_schedules(dtype, monkeypatch):
    """Fixed-order reductions only: the same bits under every thread order (a float atomicAdd would differ)."""
    results = {}
    for schedule in ("forward", "reverse", "random:11", "random:12"):
        monkeypatch.setenv("SMTC_FAST_EMU_SCHEDULE", schedule)
        before = _extension._C.emu_launch_count()
        results[schedule] = _run_all_ops(dtype)
        assert _extension._C.emu_launch_count() > before  # the emulated kernels ran
    first = results["forward"]
    for schedule, outs in results.items():
        for x, y in zip(first, outs):
            assert torch.equal(x, y), f"{schedule} differs from forward"


def test_blocks_on_several_os_threads_give_the_same_bits(monkeypatch):
    """SMTC_FAST_EMU_THREADS runs a launch's blocks concurrently (what ThreadSanitizer watches)."""
    single = _run_all_ops(torch.float32)
    monkeypatch.setenv("SMTC_FAST_EMU_THREADS", "3")
    multi = _run_all_ops(torch.float32)
    for x, y in zip(single, multi):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slot_aggregate_large_p_needs_no_shared_memory_opt_in(dtype):
    """Per-slot sums go through a global workspace: P = 4096 slots (once 2*P*8 bytes of dynamic shared memory)."""
    logits = torch.randn(1, 1, 4096, 20, dtype=dtype)
    values = torch.randn(1, 20, 3, dtype=dtype)
    u, a = EMU.slot_aggregate(logits, values, None, 1e-8)
    ru, ra = slot_aggregate_reference(logits[:, 0], values)
    torch.testing.assert_close(a[:, 0], ra)
    torch.testing.assert_close(u[:, 0], ru)


def test_many_frames_run_past_the_old_grid_limits():
    """65536+ frames: the old GEMM kernel launched B blocks along gridDim.z (<= 65535)."""
    B = 65537
    a, b = torch.randn(B, 2, 3), torch.randn(B, 2, 3)
    torch.testing.assert_close(EMU.correlation(a, b), torch.bmm(a, b.transpose(1, 2)))


@pytest.mark.slow  # 65537 blocks of 256 emulated threads: ~50 s
def test_many_frames_slot_aggregate_runs_past_the_old_grid_limits():
    B = 65537
    logits, values = torch.randn(B, 1, 2, 2), torch.randn(B, 2, 1)
    u, _ = EMU.slot_aggregate(logits, values, None, 1e-8)
    torch.testing.assert_close(u[:, 0], slot_aggregate_reference(logits[:, 0], values)[0])


# ---------------------------------------------------------------------------------------------- validation
def _sa_args():
    logits = torch.randn(2, 3, 4, 10)
    values = torch.randn(2, 10, 5)
    mask = (torch.rand(2, 3, 10) > 0.5).float()
    u, a = torch.ops.smtc_fast.slot_aggregate(logits, values, mask, 1e-8)
    return logits, values, mask, u, a


@pytest.mark.parametrize("ns", ["smtc_fast", "smtc_fast_cuda_emu"])
def test_slot_aggregate_backward_checks_attn_dtype_and_device(ns):
    """A float64 attn with float32 logits was read as garbage by the CUDA kernel; a CPU attn with CUDA logits would
    dereference a host pointer. Both backends now refuse it, naming the argument."""
    ops = getattr(torch.ops, ns)
    logits, values, mask, u, a = _sa_args()
    with pytest.raises(RuntimeError, match="attn and logits must have the same dtype"):
        ops._slot_aggregate_backward(torch.ones_like(u), None, logits, values, mask, a.double(), 1e-8)
    with pytest.raises((RuntimeError, ValueError), match="attn and logits must be on the same device"):
        ops._slot_aggregate_backward(torch.ones_like(u), None, logits, values, mask, a.to("meta"), 1e-8)
    with pytest.raises(RuntimeError, match="grad_updates and logits must have the same dtype"):
        ops._slot_aggregate_backward(torch.ones_like(u).double(), None, logits, values, mask, a, 1e-8)


@pytest.mark.parametrize("call, match", [
    (lambda: EMU.correlation(torch.randn(1, 2, 3), torch.randn(1, 2, 3).double()), "same dtype"),
    (lambda: EMU._correlation_backward(torch.randn(1, 2, 2).double(), torch.randn(1, 2, 3), torch.randn(1, 2, 3)), "same dtype"),
    (lambda: EMU.sinkhorn(torch.rand(1, 3, 3), torch.zeros(1, 3).double(), torch.zeros(1, 3), 0.1, 2, None), "same dtype"),
    (lambda: EMU._sinkhorn_backward(torch.rand(1, 3, 3), torch.zeros(1, 3).double(), torch.zeros(1, 3), torch.rand(1, 3, 3),
                                    torch.zeros(1, 3), torch.zeros(1, 3), 0.1, 2, None), "same dtype"),
    (lambda: EMU.sinkhorn(torch.rand(1, 3, 3).half(), torch.zeros(1, 3).half(), torch.zeros(1, 3).half(), 0.1, 2, None), "float32/float64"),
    (lambda: EMU.propagate_labels(torch.randn(4, 2), torch.randn(4, 2), torch.rand(4, 1).double(), torch.randn(1, 4, 2),
                                  torch.rand(1, 4, 1), [2, 2], 1, 1.0, 1.0), "same dtype"),
    (lambda: EMU.slot_aggregate(torch.randn(1, 1, 2, 3), torch.randn(1, 3, 2), torch.ones(1, 1, 3).double(), 1e-8), "same dtype"),
])
def test_every_emulated_op_validates_dtypes(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_public_ops_route_to_the_emulated_kernels():
    a, b = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    before = _extension._C.emu_launch_count()
    with emulated_cuda():
        logits = torch.randn(2, 3, 4, 10, requires_grad=True)
        u, _ = slot_aggregate(logits, torch.randn(2, 10, 5), (torch.rand(2, 3, 10) > 0.5).float())
        u.sum().backward()
        sinkhorn(torch.rand(2, 5, 5))
        correlation(a, b)
        q = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
        propagate_labels(q, q, torch.rand(4, 2), q[None], torch.rand(1, 4, 2), (2, 2), 2, 1.5, 0.1)
    assert _extension._C.emu_launch_count() >= before + 4  # forward, backward, sinkhorn, propagation kernels
