"""The `splitnet` command line. Each subcommand lives in its own module and registers itself.

A command module exposes `register(subparsers)`, which adds its parser and sets `func` (called with
the parsed args; returns an exit code). Errors that users cause (bad config, missing file, missing
device) print one clear line and exit 2, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .config import ConfigError
from .model.layout import LayoutError
from .model.placement import DeviceError
from .train.distributed import DistributedError
from .train.errors import RunError
from .train.loop import TrainingError
from .train.memory import keep_freed_memory

# Modules that contribute subcommands, in the order `splitnet --help` lists them.
COMMAND_MODULES = ("splitnet.model.cli", "splitnet.data.cli", "splitnet.train.loop", "splitnet.train.evaluate",
                   "splitnet.experiments.report", "splitnet.experiments.ablate", "splitnet.pretrained.cli",
                   "splitnet.bench.cli")

USER_ERRORS = (ConfigError, LayoutError, DeviceError, FileNotFoundError, NotADirectoryError)


def _user_errors() -> tuple:
    """Errors printed as one line: the user's input or a run that cannot go on, not a bug."""
    return USER_ERRORS + (TrainingError, DistributedError, RunError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitnet",
        description="The two-GPU AlexNet of Krizhevsky, Sutskever & Hinton (NIPS 2012), as the paper laid it out.")
    parser.add_argument("-v", "--verbose", action="store_true", help="splitnet's debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # -v: splitnet's own debug lines; other libraries' loggers stay at INFO (matplotlib's font search
    # alone prints hundreds of debug lines when a figure is drawn).
    logging.getLogger("splitnet").setLevel(logging.DEBUG if args.verbose else logging.NOTSET)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    keep_freed_memory()  # large activations reuse freed memory instead of fresh pages every step
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"splitnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"splitnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
