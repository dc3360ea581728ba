"""``saescope eval``: evaluate every SAE in a release folder on held-out tokens.

Each SAE folder at or under ``--release`` (ours, or Gemma Scope's) gets a ``metrics.json``:
L0, FVU, MSE, cosine, L2 ratio, delta LM loss, CE loss score, KL, dead and high-frequency
latents, a firing-frequency histogram, and everything again per corpus subset and per token
position; its ``saebench`` block holds SAEBench's core metrics under SAEBench's names
(ce_loss_score, kl_div_score, explained_variance, relative_reconstruction_bias, frac_alive, ...).
``<release>/eval.json`` summarises the run.  The clean forward is shared by all SAEs and each
spliced forward starts at its site's layer.

The model is the one named in the SAEs' config.json unless ``--model`` is given; the site comes
from config.json or the folder path (``--kind`` for folders that name only the layer).
"""

from __future__ import annotations

import argparse

from pathlib import Path

from saescope.commands import at_least, positive_int as _int


def add_parser(subparsers) -> None:
    from saescope.settings import KNOWN_KINDS

    p = subparsers.add_parser(
        "eval",
        help="evaluate released SAEs: fidelity (delta loss, FVU), sparsity, per subset and position",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--release", type=Path, required=True, help="a release folder (RUN/release) or one SAE folder")
    p.add_argument("--model", help="model name, folder or hub id (default: from the SAEs' config.json)")
    p.add_argument("--corpus", default=None, help="held-out corpus, '+' joins (default: wiki-vital)")
    p.add_argument("--tokens", type=_int, default=16384, help="evaluation tokens (default 16384)")
    p.add_argument("--seq-len", type=at_least(2), default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--kind", choices=KNOWN_KINDS, help="site kind, for folders whose config and path do not say it")
    p.add_argument("--batch-seqs", type=_int, default=None, help="sequences per forward (default: automatic)")
    p.add_argument("--loss-tokens", type=_int, default=None,
                   help="next-token-loss metrics (delta loss, KL) on sequences holding about this many "
                        "tokens (default: all); reconstruction metrics always use every token")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="precision of the model's forwards for the loss metrics (SAEs stay float32; default float32)")
    p.add_argument("--no-zero-ablation", action="store_true", help="skip zero ablation (no ce_loss_score)")
    p.add_argument("--splice-bos", action="store_true", help="also splice the BOS position (default: left clean)")
    p.add_argument("--zero-ablate-bos", action="store_true",
                   help="zero ablation zeroes the BOS position too, as SAELens/SAEBench's core eval does "
                        "(ce_loss_score, kl_div_score; splicing unchanged)")
    p.add_argument("--seed", type=at_least(0), default=0, help="held-out split and loss-position sampling seed (default 0)")
    p.add_argument("--report", type=Path, default=None, help="also write the HTML report into this folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _model_name(release: Path, given: str | None) -> str:
    from saescope.release.layout import find_sae_folders, folder_model

    if given:
        return given
    names = {folder_model(f) for f in find_sae_folders(release)}
    names.discard(None)
    if len(names) > 1:
        raise ValueError(f"the SAEs under {release} name different models ({', '.join(sorted(names))}); pass --model")
    if not names:
        raise ValueError(f"no config.json under {release} names a model; pass --model")
    return names.pop()


def run(args: argparse.Namespace) -> int:
    from saescope.outputs import writable_folder

    if not args.release.exists():  # checked before torch is imported
        raise FileNotFoundError(f"release folder {args.release} does not exist")
    writable_folder(args.release if args.release.is_dir() else args.release.parent, "--release")  # metrics.json
    if args.report is not None:
        writable_folder(args.report, "--report")

    from saescope.distributed.env import resolve_device
    from saescope import defaults
    from saescope.evaluate.suite import EvalConfig, evaluate_release
    from saescope.models import load_model
    from saescope.tokens import load_corpus, model_context_length

    model_name = _model_name(args.release, args.model)
    device = str(resolve_device(args.device))
    cfg = EvalConfig(batch_seqs=args.batch_seqs, loss_tokens=args.loss_tokens, seed=args.seed, dtype=args.dtype,
                     zero_ablation=not args.no_zero_ablation, splice_bos=args.splice_bos,
                     zero_ablate_bos=args.zero_ablate_bos,
                     progress=not args.no_progress)
    model, tokenizer = load_model(model_name, device=device)
    corpus = load_corpus(args.corpus or defaults.DEFAULT_CORPUS, tokenizer, seq_len=args.seq_len,
                         max_tokens=args.tokens, split="heldout", seed=args.seed,
                         max_context=model_context_length(model))
    summary = evaluate_release(args.release, model, corpus, cfg, kind=args.kind, model_name=model_name)

    print(f"evaluated {len(summary['saes'])} SAEs on {corpus.n_tokens} tokens of {corpus.name} "
          f"in {summary['info']['seconds']:.0f}s")
    print(f"{'SAE':60s} {'L0':>8s} {'FVU':>8s} {'Δ loss':>8s}")
    for path, m in summary["saes"].items():
        print(f"{path:60s} {_num(m['l0'], '.1f')} {_num(m['fvu'], '.4f')} {_num(m['delta_loss'], '.4f')}")
    print(f"metrics: metrics.json in each SAE folder; summary: {args.release / 'eval.json'}")
    if args.report is not None:
        from saescope.report.html import write_report

        print(f"report: {write_report(args.release, args.report)}")
    return 0


def _num(value, fmt: str) -> str:
    return f"{value:>8{fmt}}" if isinstance(value, (int, float)) else f"{'–':>8s}"
