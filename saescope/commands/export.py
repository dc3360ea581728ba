"""``saescope export``: write released SAEs, or their feature data, in another tool's format.

    saescope export --format saelens RUN/release OUT       # one SAELens folder per SAE
    saescope export --format neuronpedia RUN OUT           # Neuronpedia feature batches per SAE

``saelens``: per SAE, ``cfg.json`` + ``sae_weights.safetensors`` that SAELens 6.x's
``SAE.load_from_disk(folder)`` loads (JumpReLU, TopK and ReLU SAEs as its jumprelu, topk and
standard architectures, transcoders as jumprelu_transcoder / jumprelu_skip_transcoder;
TransformerLens hook names; saescope's provenance in its metadata).
The folders keep the release's layout under OUT, and ``saescope.load_sae`` reads them back.

``circuit-tracer``: a release's transcoders, one per layer from layer 0, as circuit-tracer's
transcoder set (``config.yaml`` + ``layer_<i>.safetensors``; saescope/release/circuit_tracer.py):
``load_transcoder_from_hub("/absolute/path/to/OUT")`` in circuit-tracer loads it.  A layer with
several transcoders contributes its canonical one, or with ``--l0`` the one closest to that L0.

``neuronpedia``: from the feature database ``saescope features`` wrote (RUN, RUN/features or the
.sqlite file), per SAE a folder of ``batch-<i>.json`` files in the layout SAE-Dashboard's
Neuronpedia exporter writes: top and per-octave activation examples, activation and logit
histograms, top and bottom logit tokens, firing fraction (saescope/features/neuronpedia.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.commands import positive_int

FORMATS = ("saelens", "neuronpedia", "circuit-tracer")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write released SAEs (SAELens, circuit-tracer) or feature data (Neuronpedia) for other tools",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="saelens: a run, its release or one SAE folder; "
                                             "neuronpedia: a run, its features folder or features.sqlite")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--format", choices=FORMATS, default="saelens", help="target format (default saelens)")
    p.add_argument("--sae", action="append", default=None, metavar="NAME",
                   help="neuronpedia: only this SAE (its path under the release, e.g. "
                        "resid_post/layer_6/width_2k/average_l0_97); repeat for several")
    p.add_argument("--l0", type=float, default=None, help="circuit-tracer: per layer, the transcoder whose L0 is closest "
                                                          "to this (default: the release's canonical one)")
    p.add_argument("--model-name", default=None, help="circuit-tracer: the model its config.yaml names (default: "
                                                      "the release's model; the embedded default's local folder)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="neuronpedia: features per batch file")
    p.add_argument("--no-logit-histograms", action="store_true",
                   help="neuronpedia: leave the logit histograms empty (no model is loaded)")
    p.set_defaults(func=run)


def run(args) -> int:
    from saescope.outputs import writable_folder

    if not args.source.exists():
        raise FileNotFoundError(f"{args.source} does not exist")
    writable_folder(args.out, "OUT")
    if args.format == "saelens":
        from saescope.release.export import export_saelens

        written = export_saelens(args.source, args.out)
        print(f"wrote {len(written)} SAELens folder(s) under {args.out}")
        return 0
    if args.format == "circuit-tracer":
        from saescope.release.export import export_circuit_tracer

        out = export_circuit_tracer(args.source, args.out, target_l0=args.l0, model_name=args.model_name)
        print(f"wrote a circuit-tracer transcoder set to {out} (config.yaml + layer_<i>.safetensors)")
        return 0
    from saescope.features.neuronpedia import NeuronpediaConfig, export_neuronpedia

    cfg = NeuronpediaConfig(batch_size=args.batch_size, logit_bins=0 if args.no_logit_histograms else 40)
    written = export_neuronpedia(args.source, args.out, cfg, sae_names=args.sae)
    print(f"wrote {len(written)} Neuronpedia batch file(s) under {args.out}")
    return 0
