"""`smtc --help` and `smtc <cmd> --help` load neither torch, timm nor the extension (issue 16 part 3): they are what
makes a help screen take seconds. Checked in a fresh interpreter through sys.modules, not with a clock."""
import json
import os
import subprocess
import sys

import pytest

from smtc_fast.cli import COMMANDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import contextlib, io, json, sys
from smtc_fast import cli
argv = json.loads(sys.argv[1])
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        cli.main(argv)
    except SystemExit as e:
        assert e.code == 0, e.code
heavy = sorted(m for m in ("torch", "timm", "smtc_fast._C", "smtc_fast._extension", "scipy.optimize")
               if m in sys.modules)
print(json.dumps({"heavy": heavy, "help": buf.getvalue()}))
"""


def _help(argv):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], capture_output=True, text=True, cwd=ROOT,
                         env=env, check=True).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"]] + [[cmd, "--help"] for cmd in COMMANDS])
def test_help_imports_nothing_heavy(argv):
    r = _help(argv)
    assert r["heavy"] == [], f"smtc {' '.join(argv)} imported {r['heavy']}"
    assert "usage: smtc" in r["help"]
    if argv[0] in ("train", "eval-prop", "eval-discovery", "visualize", "demo", "bench"):
        assert "--device" in r["help"] and "auto" in r["help"]


def test_device_auto_resolves_after_parsing():
    import argparse

    import torch

    from smtc_fast._lazy import resolve_device
    from smtc_fast.evaluate import discovery

    p = argparse.ArgumentParser()
    discovery.add_arguments(p)
    args = p.parse_args(["--root", "r", "--checkpoint", "c"])
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert p.parse_args(["--root", "r", "--checkpoint", "c", "--device", "cpu"]).device == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"


def test_lazy_names_stand_for_the_real_objects():
    import torch

    import smtc_fast
    from smtc_fast import _extension
    from smtc_fast import train as tr
    from smtc_fast.data import open_clips
    from smtc_fast.models import SMTCConfig
    from smtc_fast.models.smtc import SMTCConfig as SMTCConfig2

    assert smtc_fast.build_info is _extension.build_info
    assert SMTCConfig is SMTCConfig2
    assert tr.torch.zeros is torch.zeros
    assert tr.open_clips._target() is open_clips
    with pytest.raises(AttributeError):
        smtc_fast.no_such_name  # noqa: B018
