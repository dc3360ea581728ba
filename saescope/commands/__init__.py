"""One module per ``saescope`` subcommand; shared argument parsers live here."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """Whole numbers written as 20000, 20_000 or 2e4 (argparse ``type=``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(value)
