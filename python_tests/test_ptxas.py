"""ptxas resource use of every CUDA kernel (csrc/tests/ptxas_report.py): no spills, registers within the reviewed
budget (csrc/tests/ptxas_budget.json). Runs wherever nvcc is found (CI compiles the CUDA kernels anyway)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "csrc", "tests"))
import ptxas_report  # noqa: E402


@pytest.mark.skipif(ptxas_report.find_nvcc() is None, reason="nvcc not found")
def test_no_kernel_spills_or_outgrows_its_register_budget():
    res = subprocess.run([sys.executable, os.path.join(ROOT, "csrc", "tests", "ptxas_report.py")],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sinkhorn_forward_kernel<float>@sm_90" in res.stdout  # the report parsed every kernel


def test_budget_check_catches_a_spill_and_a_register_increase():
    report = {"k@sm_90": {"registers": 40, "spill_stores": 8, "spill_loads": 8},
              "j@sm_90": {"registers": 80, "spill_stores": 0, "spill_loads": 0}}
    problems = ptxas_report.check(report, {"k@sm_90": {"registers": 40}, "j@sm_90": {"registers": 64}})
    assert any("k@sm_90 spills" in p for p in problems)
    assert any("j@sm_90 uses 80 registers, budget 64" in p for p in problems)
