"""The package imports without its extension and says what was built."""
import json
import os
import subprocess
import sys

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
