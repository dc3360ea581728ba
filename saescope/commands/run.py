"""``saescope run``: tokens → activations → train → eval → report → features, resumable."""

from __future__ import annotations

import argparse


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


# flag -> (RunConfig field, parser)
_OVERRIDES = {
    "model": ("model", str), "corpus": ("corpus", str), "eval_corpus": ("eval_corpus", str),
    "sites": ("sites", str), "arch": ("architecture", str), "widths": ("widths", _ints),
    "l0_coefficients": ("sparsity_coefficients", _floats), "k": ("ks", _ints),
    "tokens": ("train_tokens", int), "eval_tokens": ("eval_tokens", int), "eval_loss_tokens": ("eval_loss_tokens", int),
    "feature_tokens": ("feature_tokens", int), "seq_len": ("seq_len", int),
    "batch_size": ("batch_size", int), "source": ("source", str), "store_dtype": ("store_dtype", str),
    "dtype": ("dtype", str), "lr": ("lr", float), "canonical_l0": ("canonical_l0", float),
    "device": ("device", str), "seed": ("seed", int), "checkpoint_every": ("checkpoint_every", int),
}


def add_parser(sub) -> None:
    from saescope.presets import PRESETS

    p = sub.add_parser(
        "run",
        help="the whole pipeline on a model (default: the embedded Gemma 3 270M)",
        description=__doc__ + "\n\npresets:\n" + "\n".join(f"  {k}: {v.description}" for k, v in PRESETS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="default", help="named preset (listed above); flags below override it")
    p.add_argument("--out", required=True, help="run folder (created; an existing one is resumed)")
    p.add_argument("--model", help="'gemma-3-270m', a local model folder, a .gguf file or a hub id")
    p.add_argument("--corpus", help="training corpus: 'wiki-vital', 'python-docs', a path, 'hf:<name>'; '+' joins")
    p.add_argument("--eval-corpus", help="held-out evaluation corpus (subsets are reported separately)")
    p.add_argument("--sites", help="site selection, e.g. 'all', 'resid_post@0-5', 'layer_12/attn_z'")
    p.add_argument("--arch", help="jumprelu (default), topk, batchtopk, relu")
    p.add_argument("--widths", help="comma-separated SAE widths, e.g. 4096,16384")
    p.add_argument("--l0-coefficients", help="comma-separated λ sweep, e.g. 3e-4,1e-3")
    p.add_argument("--k", help="comma-separated k sweep for topk/batchtopk")
    p.add_argument("--tokens", type=int, help="training tokens per SAE")
    p.add_argument("--eval-tokens", type=int, help="held-out tokens for evaluation")
    p.add_argument("--eval-loss-tokens", type=int, help="held-out tokens scored for delta loss / CE recovered / KL")
    p.add_argument("--feature-tokens", type=int, help="tokens scanned for the feature browser")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, help="activations per training step")
    p.add_argument("--source", choices=["online", "store"], help="stream activations, or harvest to disk first")
    p.add_argument("--store-dtype", choices=["float32", "bfloat16"], help="on-disk activation dtype")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="training precision (autocast)")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--canonical-l0", type=float, help="canonical SAE per site: average L0 closest to this")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--no-features", action="store_true", help="skip the feature-browser data")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def main(args) -> int:
    from saescope.pipeline import run
    from saescope.presets import get_preset

    cfg = get_preset(args.preset)
    changes = {field: parse(getattr(args, flag)) for flag, (field, parse) in _OVERRIDES.items()
               if getattr(args, flag) is not None}
    if args.no_features:
        changes["features"] = False
    cfg = cfg.replace(**changes)
    run(cfg, args.out, progress=not args.no_progress)
    return 0
