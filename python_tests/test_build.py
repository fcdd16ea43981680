"""The package imports without its extension and says what was built."""
import json
import os
import subprocess
import sys

import pytest

import smtc_fast


def test_build_info_fields():
    info = smtc_fast.build_info()
    for key in ("extension", "cpu_kernels", "cuda_kernels", "cuda_archs", "torch_version", "torch_cuda_version",
                "force_reference", "why_no_extension", "why_no_cuda", "ops"):
        assert key in info
    json.dumps(info)  # plain data
    if info["extension"]:
        assert {"correlation", "slot_aggregate", "sinkhorn"} <= set(info["ops"])
    else:
        assert info["why_no_extension"]
    if not info["cuda_kernels"] or not info["cuda_available"]:
        assert info["why_no_cuda"]


def test_import_without_extension_falls_back(tmp_path):
    # Hide smtc_fast._C: import must still work and every op must run its reference.
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'smtc_fast._C': raise ImportError('hidden by test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, smtc_fast, smtc_fast.ops as O\n"
        "info = smtc_fast.build_info(); assert not info['extension'] and 'hidden by test' in info['why_no_extension']\n"
        "a = torch.randn(2, 3, 4, requires_grad=True); O.correlation(a, a).sum().backward()\n"
        "O.slot_aggregate(torch.randn(2, 3, 5), torch.randn(2, 5, 4)); O.sinkhorn(torch.rand(2, 3, 3))\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_built_kernels_are_loaded():
    """The kernels the build record says were built must be loaded: a build whose smtc_fast._C does not import
    would otherwise pass every kernel test on the references (`make test` runs the same check first)."""
    from smtc_fast.testing import check_build_loaded

    try:
        check_build_loaded()
    except SystemExit as exc:
        pytest.fail(str(exc), pytrace=False)


def test_require_kernel_skips_unbuilt_and_fails_unloaded(monkeypatch):
    from smtc_fast import _extension
    from smtc_fast.testing import check_build_loaded, require_kernel

    monkeypatch.setattr(_extension, "_C", None)  # as if smtc_fast._C had not imported
    monkeypatch.setattr(_extension, "_LOAD_ERROR", "ImportError: hidden by test")
    monkeypatch.setattr(_extension, "_read_record", lambda: {"extension": True, "cuda": False})
    with pytest.raises(pytest.fail.Exception, match="says the cpu kernels were built.*hidden by test"):
        require_kernel("cpu")
    with pytest.raises(SystemExit, match="hidden by test"):
        check_build_loaded()
    monkeypatch.setattr(_extension, "_read_record",
                        lambda: {"extension": False, "why_no_extension": "SMTC_FAST_NO_EXTENSION=1 at build time"})
    with pytest.raises(pytest.skip.Exception, match="SMTC_FAST_NO_EXTENSION=1"):
        require_kernel("cpu")
    check_build_loaded()  # nothing was built, nothing is missing


def test_kernel_ran_sees_the_fallback(monkeypatch):
    import torch

    from smtc_fast.ops import correlation
    from smtc_fast.testing import kernel_namespace, kernel_ran

    assert kernel_namespace("cpu") == kernel_namespace(torch.device("cuda", 0)) == "smtc_fast"
    assert kernel_namespace("cuda_emu") == "smtc_fast_cuda_emu"
    a = torch.randn(2, 3, 4)
    with kernel_ran("cpu", "correlation") as calls:
        correlation(a, a)
    assert calls["correlation"] == 1
    monkeypatch.setenv("SMTC_FAST_FORCE_REFERENCE", "1")
    with pytest.raises(AssertionError, match="smtc_fast::correlation did not run"):
        with kernel_ran("cpu", "correlation"):
            correlation(a, a)
