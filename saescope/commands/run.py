"""``saescope run``: tokens → activations → train → eval → report → features, resumable.

Every setting is a field of :class:`saescope.presets.RunConfig` (its flag and help come from it)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from saescope.presets import PRESETS, RunConfig
    from saescope.settings import add_flags

    p = sub.add_parser(
        "run",
        help="the whole pipeline on a model (default: the embedded Gemma 3 270M)",
        description=__doc__ + "\n\npresets:\n" + "\n".join(f"  {k}: {v.description}" for k, v in PRESETS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="default", help="named preset (listed above); flags below override it")
    p.add_argument("--out", required=True, help="run folder (created; an existing one is resumed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_flags(p.add_argument_group("settings (each overrides the preset's)"), RunConfig)
    p.set_defaults(func=main)


def main(args) -> int:
    from saescope.pipeline import run
    from saescope.presets import RunConfig, get_preset
    from saescope.settings import overrides

    from saescope.outputs import writable_folder

    cfg = get_preset(args.preset).overridden(**overrides(RunConfig, args))
    writable_folder(args.out)
    run(cfg, args.out, progress=not args.no_progress)
    return 0
