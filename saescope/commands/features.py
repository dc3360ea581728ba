"""``saescope features``: what every latent of a release does, for the feature browser.

Reads every SAE under ``--release RUN/release`` (every folder ``saescope eval`` reads: ours,
``<kind>/layer_L/width_W/average_l0_K``, and Gemma Scope's),
runs ``--tokens`` tokens of ``--corpus`` through the model once, and writes
``RUN/features/features.sqlite`` (schema: ``saescope.features.store``, docs/features.md):
per latent the top activating contexts, random contexts per activation octave, firing
frequency, an activation histogram and the tokens its decoder direction promotes and suppresses.
Then look at it with ``saescope browse RUN``.
"""

from __future__ import annotations

import argparse

import time
from pathlib import Path

from saescope.commands import at_least, positive_int as _int


def add_parser(subparsers) -> None:
    from saescope.settings import KNOWN_KINDS

    p = subparsers.add_parser(
        "features",
        help="collect top contexts, frequencies and logit effects of every latent, for `saescope browse`",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--release", type=Path, required=True, help="a release folder, e.g. RUN/release")
    p.add_argument("--model", default=None, help="model name, folder or hub id (default: the one in the SAEs' config.json)")
    p.add_argument("--corpus", default=None, help="corpus name or path (default: wiki-vital)")
    p.add_argument("--split", choices=("train", "heldout"), default="heldout",
                   help="corpus split (default heldout: text the SAEs were not trained on)")
    p.add_argument("--tokens", type=_int, default=65_536, help="tokens to read (default 65536; raise it on a GPU)")
    p.add_argument("--seq-len", type=at_least(2), default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--kind", choices=KNOWN_KINDS, help="site kind, for folders whose config and path do not say it")
    p.add_argument("--sites", default=None, help="only SAEs at these sites, e.g. resid_post or resid_post@3-5")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/features beside the release)")
    p.add_argument("--top-k", type=_int, default=16, help="top contexts per latent (default 16)")
    p.add_argument("--batch-tokens", type=_int, default=4096, help="tokens per model forward (default 4096)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from saescope.outputs import writable_folder

    if not args.release.is_dir():  # checked before torch is imported
        raise FileNotFoundError(f"release folder {args.release} does not exist")
    out = writable_folder(args.out or args.release.resolve().parent / "features")

    from saescope.distributed.env import resolve_device
    from saescope import defaults
    from saescope.jsonio import write_json
    from saescope.features.collect import (
        FeatureConfig,
        collect_features,
        load_release_saes,
    )
    from saescope.models import load_model
    from saescope.sites import n_layers, select_sites
    from saescope.tokens import load_corpus, model_context_length
    device = str(resolve_device(args.device))
    saes, model_names = load_release_saes(args.release, device=device, kind=args.kind)
    model_name = args.model or (model_names.pop() if len(model_names) == 1 else None)
    if model_name is None:
        named = ", ".join(sorted(model_names)) or "none"
        raise ValueError(f"the SAEs' config.json files name models: {named}; pass --model")
    model, tokenizer = load_model(model_name, device=device)
    if args.sites:
        keep = set(select_sites(args.sites, n_layers(model)))
        saes = {name: (site, sae) for name, (site, sae) in saes.items() if site in keep}
        if not saes:
            raise ValueError(f"--sites {args.sites!r} selects none of the SAEs in {args.release}")
    corpus = load_corpus(args.corpus or defaults.DEFAULT_CORPUS, tokenizer, seq_len=args.seq_len,
                         max_tokens=args.tokens, split=args.split, max_context=model_context_length(model))
    cfg = FeatureConfig(top_k=args.top_k, batch_tokens=args.batch_tokens, progress=not args.no_progress,
                        model_name=model_name, release_root=str(args.release.resolve()))
    print(f"collecting features of {len(saes)} SAEs over {corpus.n_tokens} tokens of {corpus.name} on {device}")
    t0 = time.time()
    path = collect_features(model, tokenizer, corpus, saes, out, cfg)
    seconds = time.time() - t0
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**20:.1f} MiB) in {seconds:.1f}s; browse with: saescope browse {out.parent}")
    write_json(out / "features_summary.json",
               {"seconds": round(seconds, 2), "bytes": size, "n_saes": len(saes), "n_tokens": corpus.n_tokens})
    return 0
