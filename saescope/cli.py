"""The ``saescope`` command: a thin layer over the library.

Each subcommand lives in ``saescope/commands/<name>.py`` and exposes ``add_parser(subparsers)``
(which registers its arguments and sets ``func``).  Heavy imports happen inside ``func``, so
``saescope --help`` stays quick.

:func:`main` is the one error boundary.  What a user can act on (bad input, a missing or corrupt
file, a full or read-only disk, a device that is not there, Ctrl-C) becomes one line
``saescope <cmd>: error: ...`` and exit code 1 (argparse's usage errors: 2).  Anything else is a
bug: its traceback is printed, with a line asking to report it.  ``--debug`` (or
``SAESCOPE_DEBUG=1``) shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

COMMANDS = ("harvest", "train", "eval", "run", "features", "browse", "export")
PACKAGE = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saescope",
        description="Train, evaluate and release JumpReLU SAEs on every site of a transformer.",
    )
    debug = dict(action="store_true", help="show the full traceback of any error (also: SAESCOPE_DEBUG=1)")
    parser.add_argument("--debug", **debug)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"saescope.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"saescope.commands.{name}":
                continue  # not built yet
            raise
        module.add_parser(sub)
    for p in sub.choices.values():  # also accepted after the command: saescope train ... --debug
        p.add_argument("--debug", **dict(debug, default=argparse.SUPPRESS))
    return parser


def user_message(err: BaseException) -> str | None:
    """The one line to show for an error the user can act on, or None for a bug."""
    from saescope.errors import UserError, describe_os_error

    if isinstance(err, KeyboardInterrupt):
        return "interrupted; rerun the same command to resume from its last checkpoint or shard"
    if isinstance(err, UnicodeDecodeError):
        return f"a binary file where text was expected ({err.reason} at byte {err.start})"
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):
        return describe_os_error(err)
    if isinstance(err, MemoryError):
        return "out of memory: lower --batch-size / --batch-seqs / --tokens"
    if type(err).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return "out of GPU memory: lower --batch-size / --batch-seqs, or use --device cpu"
    if isinstance(err, ValueError):
        return str(err)
    if isinstance(err, RuntimeError) and _raised_by_saescope(err):
        # saescope raises RuntimeError for states a user fixes (a corrupt store, a missing
        # package, no CUDA); one raised inside torch is a mismatch saescope failed to check: a bug.
        return str(err)
    return None


def _raised_by_saescope(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return last is not None and Path(last).resolve().is_relative_to(PACKAGE)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("SAESCOPE_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as err:  # the boundary: every error ends here
        message = user_message(err)
        if debug:
            traceback.print_exc()
        if message is not None:
            print(f"saescope {args.command}: error: {message}", file=sys.stderr)
            return 130 if isinstance(err, KeyboardInterrupt) else 1
        if not debug:
            traceback.print_exc()
        print(f"saescope {args.command}: internal error ({type(err).__name__}): this is a bug in saescope; "
              "please report it with the command you ran and the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
