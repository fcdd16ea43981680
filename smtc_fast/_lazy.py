"""Deferred imports for the command modules, so `smtc <cmd> --help` never loads torch, timm or the extension.

Importing torch takes 1.5-2 s and most of a command's import time; argparse only needs the options. A command
module writes `torch = lazy("torch")` where it would write `import torch`, and `open_clips = lazy("smtc_fast.data",
"open_clips")` for `from smtc_fast.data import open_clips`: the name resolves to the real module / object the
first time it is used (inside a function that runs: an attribute read or a call), at the cost of a dict lookup
after that. The names stay module globals, so tests can still monkeypatch them.
Module-level code must then not use them: no `@torch.no_grad()` decorators (use `@no_grad` below), no base
classes from torch, no `torch.cuda.is_available()` in an option default (`--device` takes default="auto",
type=resolve_device: argparse converts a string default through `type` only after parsing, and `--help` exits
before that).
"""
import functools
import importlib


class Lazy:
    """Stands for the module `module` (attr None) or for `module.attr`; imports it on first use."""

    def __init__(self, module, attr=None):
        self.__dict__.update(_module=module, _attr=attr)

    def _target(self):
        obj = importlib.import_module(self.__dict__["_module"])
        attr = self.__dict__["_attr"]
        return obj if attr is None else getattr(obj, attr)

    def __getattr__(self, name):  # only called for names not found on the proxy itself
        return getattr(self._target(), name)

    def __call__(self, *args, **kwargs):
        return self._target()(*args, **kwargs)

    def __repr__(self):
        d = self.__dict__
        return f"<lazy {d['_module']}{'' if d['_attr'] is None else '.' + d['_attr']}>"


def lazy(module, attr=None):
    return Lazy(module, attr)


def resolve_device(name):
    """--device values: 'auto' (cuda when a GPU is visible, else cpu), or any torch device string."""
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def no_grad(fn):
    """@torch.no_grad() for a plain (non-generator) function, without importing torch at decoration time."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
