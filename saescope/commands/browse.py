"""``saescope browse RUN``: a local web page over the features of a run.

Pick model → site → layer → SAE, look a latent up by id or find the latents that fire on a
token, and read its card: highlighted contexts, frequency, histogram, promoted and suppressed
tokens.  A text box runs the model live on your own sentence.  Needs ``saescope features`` first.
Everything is served locally; the page loads nothing from the internet.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.commands import port


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "browse",
        help="serve a local web page to explore every latent (after `saescope features`)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, help="a run folder (or its features folder, or a features.sqlite file)")
    p.add_argument("--port", type=port, default=8000, help="port (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saescope.features.server import serve

    serve(args.run, host=args.host, port=args.port)
    return 0
