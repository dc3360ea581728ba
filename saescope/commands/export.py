"""``saescope export``: write released SAEs in another library's format.

    saescope export --format saelens RUN/release OUT     # one SAELens folder per SAE

``saelens``: per SAE, ``cfg.json`` + ``sae_weights.safetensors`` that SAELens 6.x's
``SAE.load_from_disk(folder)`` loads (JumpReLU, TopK and ReLU SAEs as its jumprelu, topk and
standard architectures; TransformerLens hook names; saescope's provenance in its metadata).
The folders keep the release's layout under OUT, and ``saescope.load_sae`` reads them back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("saelens",)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write released SAEs in another library's format (SAELens)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("release", type=Path, help="a run folder, its release folder, or one SAE folder")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--format", choices=FORMATS, default="saelens", help="target format (default saelens)")
    p.set_defaults(func=run)


def run(args) -> int:
    from saescope.outputs import writable_folder

    if not args.release.exists():
        raise FileNotFoundError(f"{args.release} does not exist: give a run folder, RUN/release or one SAE folder")
    writable_folder(args.out, "OUT")
    from saescope.release.saelens import export_saelens

    written = export_saelens(args.release, args.out)
    print(f"wrote {len(written)} SAELens folder(s) under {args.out}")
    return 0
