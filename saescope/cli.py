"""The ``saescope`` command: a thin layer over the library.

Each subcommand lives in ``saescope/commands/<name>.py`` and exposes ``add_parser(subparsers)``
(which registers its arguments and sets ``func``).  Heavy imports happen inside ``func``, so
``saescope --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("harvest", "train", "eval", "run", "features", "browse")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saescope",
        description="Train, evaluate and release JumpReLU SAEs on every site of a transformer.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"saescope.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"saescope.commands.{name}":
                continue  # not built yet
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Bad input: one clear line, no traceback.  Bugs (other exceptions) keep their traceback.
        print(f"saescope {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
