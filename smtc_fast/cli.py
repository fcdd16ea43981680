"""`smtc`: one command line for the whole package.

Each subcommand lives in the module that does the work; that module defines
    add_arguments(parser)   every option, with its default and where that default comes from
    run(args)               the job; returns an exit code (or None for 0)
and is imported only when its subcommand runs, so `smtc --help` stays fast.
"""
import argparse
import importlib
import importlib.util
import os
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "train": ("smtc_fast.train", "train SMTC (single process or torchrun DDP)"),
    "eval-prop": ("smtc_fast.evaluate.propagation", "label propagation (DAVIS-2017 / JHMDB / VIP)"),
    "eval-discovery": ("smtc_fast.evaluate.discovery", "object discovery (single and multiple objects)"),
    "eval-masks": ("smtc_fast.evaluate.davis", "score PNG masks with the official DAVIS J&F"),
    "visualize": ("smtc_fast.visualize", "render a checkpoint's semantic and instance masks on a clip"),
    "bench": ("smtc_fast.benchmark", "time the kernels against their references"),
    "demo": ("smtc_fast.demo", "the main job on an embedded default dataset"),
}


def _available(module):
    return importlib.util.find_spec(module) is not None


def build_parser(argv=None):
    parser = argparse.ArgumentParser(prog="smtc", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv else None
    for cmd, (module, help_text) in COMMANDS.items():
        if not _available(module):
            continue
        p = sub.add_parser(cmd, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(_module=module)
        if cmd == name or name is None:  # import only the module that runs
            importlib.import_module(module).add_arguments(p)
    return parser


def _is_user_error(exc):
    """Errors caused by the input (a wrong path, a bad file or option value, a checkpoint of another architecture):
    reported in one clear message instead of a traceback. Anything else is a bug and keeps its traceback."""
    import pickle

    from smtc_fast.evaluate.io import DataError

    if isinstance(exc, (DataError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                        IsADirectoryError, PermissionError, pickle.UnpicklingError, EOFError)):
        return True
    # SMTC.load_state_dict / load_dino: the message lists the missing and unexpected keys
    return isinstance(exc, RuntimeError) and ("does not fit" in str(exc) or "Error(s) in loading" in str(exc))


def main(argv=None):
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    module = importlib.import_module(args._module)
    try:
        return module.run(args) or 0
    except Exception as exc:  # noqa: BLE001 (re-raised unless it is the user's input; SMTC_DEBUG=1 always re-raises)
        if os.environ.get("SMTC_DEBUG") == "1" or not _is_user_error(exc):
            raise
        print(f"smtc {args.command}: error: {exc}\n(SMTC_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
