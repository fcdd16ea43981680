import os

import pytest
import torch

import smtc_fast
from smtc_fast.ops import _common

# The tests must see the machine's kernels, never an inherited forced-reference setting.
os.environ.pop("SMTC_FAST_FORCE_REFERENCE", None)

HAS_CUDA_EMU = smtc_fast.build_info()["cuda_emu"]

# The CPU execution tier runs every CUDA-device test a second time on the CPU, under these thread schedules
# (csrc/common/cuda_emu.h): in order, and a seeded shuffle that is re-drawn after every barrier. A race or an
# order-dependent float atomic shows up as a difference between them.
EMU_SCHEDULES = ("forward", "random:7")


class EmuDevice(str):
    """A test device that is the CPU for torch, and the CUDA kernels run by the execution tier for smtc_fast's ops.
    The value is "cpu", so tests create their tensors as usual."""

    def __new__(cls, schedule):
        self = super().__new__(cls, "cpu")
        self.schedule = schedule
        return self


def _emu_params():
    return [pytest.param(EmuDevice(s), marks=pytest.mark.cuda_emu, id=f"cuda_emu[{s}]") for s in EMU_SCHEDULES]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)] + _emu_params()
# Tests of the CUDA kernels alone (low precision, CUDA-only behaviour): a real GPU, and the execution tier.
CUDA_DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda)] + _emu_params()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_emu = pytest.mark.skip(reason="the CUDA execution tier is not built: "
                                       f"{smtc_fast.build_info()['why_no_cuda_emu']}")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
        if "cuda_emu" in item.keywords and not HAS_CUDA_EMU:
            item.add_marker(skip_emu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _emulated_device(request, monkeypatch):
    """A test whose `device` is an EmuDevice runs with smtc_fast's ops sent to the emulated CUDA kernels, under the
    device's schedule."""
    device = request.node.callspec.params.get("device") if hasattr(request.node, "callspec") else None
    if not isinstance(device, EmuDevice):
        yield
        return
    monkeypatch.setenv("SMTC_FAST_EMU_SCHEDULE", device.schedule)
    with _common.emulated_cuda():
        yield


@pytest.fixture
def one_thread():
    """One intra-op thread: stable timings on a shared 2-core machine (OpenMP spin-waits degrade badly under
    contention); restored afterwards so other test modules are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
