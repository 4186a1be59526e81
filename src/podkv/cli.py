"""The `podkv` command line. Thin: each subcommand parses its flags and calls one library function.

Subcommands live next to the code they drive (``podkv/<area>/cli.py`` with ``register(subparsers)``);
this file only dispatches and turns :class:`PodError` (from a flag's value or from the command) into a
one-line message and exit code 2. Flag values follow one convention: :mod:`podkv.cli_args`.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys

from podkv import __version__
from podkv.errors import PodError
from podkv.models.default_model import default_model_dir

# Each module defines register(subparsers) adding its commands with set_defaults(func=...).
COMMAND_MODULES = (
    "podkv.generate_cli",
    "podkv.analysis.cli",
    "podkv.training.cli",
    "podkv.eval.cli",
    "podkv.bench.cli",
    "podkv.serving.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="podkv",
        description="PoD: KV-cache compression by sharing distant-token keys across layers (arXiv 2412.02252).",
    )
    parser.add_argument("--version", action="version", version=f"podkv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)  # a module that fails to import fails the CLI, loudly
    sub.add_parser("reset", help="delete the cached default model (it is rebuilt on next use)").set_defaults(func=_reset)
    return parser


def _reset(args) -> int:
    path = default_model_dir()
    shutil.rmtree(path, ignore_errors=True)
    print(f"removed {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # a bad list flag raises PodError here (podkv.cli_args)
        if not getattr(args, "func", None):
            parser.print_help()
            return 1
        return int(args.func(args) or 0)
    except PodError as exc:
        print(f"podkv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("podkv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
