"""``saescope train``: train a sweep of SAEs (sites × widths × λ or k) in one pass over the data.

Data come from an activation store (``--store RUN/store``) or online from the model
(``--model ... --corpus ... --tokens N``).  The run folder (``--out``; with ``--store RUN/store``
it defaults to ``RUN``) gets ``checkpoints/``, ``train_log.jsonl``, ``train_summary.json`` and
``release/<kind>/layer_L/width_W/average_l0_K/``.  Relaunching the same command resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _list(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}")

    return parse


def _width(text: str) -> int:
    """Widths as Gemma Scope names them: 16k = 16384, 1m = 2**20; or plain numbers."""
    t = text.strip().lower()
    for suffix, factor in (("k", 1024), ("m", 2**20)):
        if t.endswith(suffix) and t[:-1].isdigit():
            return int(t[:-1]) * factor
    return _int(t)


def _int(text: str) -> int:
    """Whole numbers written as 2000000, 2_000_000 or 2e6."""
    t = text.strip()
    try:
        value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(value)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train SAEs (many per data pass) from an activation store or online from a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = p.add_argument_group("data (one of)")
    data.add_argument("--store", type=Path, help="an activation store folder written by `saescope harvest`")
    data.add_argument("--model", help="online: model name, folder or hub id (e.g. gemma-3-270m)")
    data.add_argument("--corpus", default=None, help="online: corpus name or path (default: wiki-vital)")
    data.add_argument("--seq-len", type=int, default=1024, help="online: tokens per sequence (default 1024)")

    what = p.add_argument_group("what to train")
    what.add_argument("--sites", default="all", help="site selection, e.g. all, resid_post@6, layer_3/mlp_out (default all)")
    what.add_argument("--arch", default="jumprelu", help="architecture: jumprelu (default), relu, topk, batchtopk")
    what.add_argument("--widths", type=_list(_width), default=[16384], help="SAE widths, e.g. 4096,16k (default 16384)")
    what.add_argument("--l0-coefficients", type=_list(float), default=None,
                      help="sparsity coefficients λ to sweep, e.g. 1e-3,3e-3 (jumprelu, relu; default 1e-3)")
    what.add_argument("--k", type=_list(int), default=None, help="latents per token to sweep (topk, batchtopk)")
    what.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed (default 0)")

    how = p.add_argument_group("how")
    how.add_argument("--tokens", type=_int, default=None,
                     help="training tokens (default: the whole store once; required online)")
    how.add_argument("--batch-size", type=int, default=4096, help="activations per step (default 4096)")
    how.add_argument("--lr", type=float, default=None, help="learning rate (default 7e-5, the paper's)")
    how.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    how.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="float32 (default, the paper) or bfloat16 autocast with fp32 weights")
    how.add_argument("--out", type=Path, default=None, help="run folder (default: the store's parent folder)")
    how.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (default 1000)")
    how.add_argument("--log-every", type=int, default=100, help="steps between log records (default 100)")
    how.add_argument("--loggers", default="", help="also log to: tensorboard, wandb (comma-separated; must be installed)")
    how.add_argument("--no-progress", action="store_true", help="no progress bar")
    how.add_argument("--parallel", choices=("site", "data", "latent"), default="site",
                     help="under torchrun: site = each rank trains its share of the SAEs (default; no "
                          "communication), data = every rank trains every SAE on its slice of each batch "
                          "(gradient all-reduce), latent = every SAE's latents split over the ranks (for SAEs "
                          "too wide for one device; JumpReLU, from a store).  See docs/distributed.md")
    p.set_defaults(func=run)


def _sites_from(selection: str, available) -> list:
    """Select among the sites a source holds; a full site name that it lacks is an error."""
    from saescope.sites import Site, select_sites

    n_layers = max(s.layer for s in available) + 1
    chosen = select_sites(selection, n_layers)
    named = [Site.parse(t) for t in selection.split(",") if t.strip().startswith("layer_")]
    missing = [s.name for s in named if s not in available]
    if missing:
        raise ValueError(f"the data have no activations for {', '.join(missing)}")
    sites = [s for s in chosen if s in available]
    if not sites:
        raise ValueError(f"--sites {selection!r} selects none of the available sites")
    return sites


def run(args: argparse.Namespace) -> int:
    import torch

    from saescope.train.recipe import Recipe
    from saescope.train.spec import K_ARCHITECTURES, sweep
    from saescope.train.trainer import Trainer

    if (args.store is None) == (args.model is None):
        raise ValueError("give either --store (train from an activation store) or --model (train online)")
    if args.arch in K_ARCHITECTURES:
        if not args.k:
            raise ValueError(f"--arch {args.arch} needs --k (e.g. --k 32,64)")
        if args.l0_coefficients:
            raise ValueError(f"--arch {args.arch} takes --k, not --l0-coefficients")
    elif args.k:
        raise ValueError(f"--arch {args.arch} takes --l0-coefficients, not --k")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    from saescope.train.distributed import init_distributed, launched_by_torchrun

    env = init_distributed(args.device) if launched_by_torchrun() else None  # torchrun: one GPU per rank
    if env is not None:
        device = env.device

    if args.store is not None:
        from saescope.store import ActivationStore, StoreReader

        store = ActivationStore(args.store)
        sites = _sites_from(args.sites, store.sites)
        source = StoreReader(store, sites)
        model_name = store.manifest["config"].get("model")
        tokens = args.tokens if args.tokens is not None else store.n_tokens
        out = args.out if args.out is not None else args.store.resolve().parent
    else:
        if args.tokens is None:
            raise ValueError("online training needs --tokens (how many activations to train on)")
        if args.out is None:
            raise ValueError("online training needs --out (the run folder)")
        from saescope import defaults
        from saescope.models import load_model
        from saescope.sites import n_layers
        from saescope.stream import OnlineSource
        from saescope.tokens import load_corpus

        model, tokenizer = load_model(args.model, device=device)
        all_sites = _sites_from(args.sites, set(_every_site(n_layers(model))))
        corpus = load_corpus(args.corpus or defaults.DEFAULT_CORPUS, tokenizer, seq_len=args.seq_len,
                             max_tokens=args.tokens, seed=args.seed)
        if env is not None and args.parallel == "latent":
            raise ValueError("--parallel latent trains from an activation store: run saescope harvest first")
        if env is not None:  # each rank runs the model on its own share of the sequences
            from saescope.train.online_parallel import corpus_share

            corpus = corpus_share(corpus, env.rank, env.world_size)
        source = OnlineSource(model, corpus, all_sites, device=device)
        sites, model_name, tokens, out = all_sites, args.model, args.tokens, args.out

    n_steps = max(1, tokens // args.batch_size)
    overrides = {"batch_size": args.batch_size, "dtype": args.dtype}
    if args.lr is not None:
        overrides["lr"] = args.lr
    recipe = Recipe.for_steps(n_steps, **overrides)
    specs = sweep(sites, args.widths, architecture=args.arch,
                  sparsity_coefficients=args.l0_coefficients or [1e-3], ks=args.k or [], seed=args.seed)
    kwargs = dict(
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, device=device, data_seed=args.seed,
        model_name=model_name, loggers=tuple(x.strip() for x in args.loggers.split(",") if x.strip()),
        progress=not args.no_progress,
    )
    if env is not None:
        return _run_distributed(args, env, source, specs, recipe, out, n_steps, kwargs)
    from saescope.train.parallel import check_not_split

    check_not_split(out)
    trainer = Trainer(source, specs, recipe, out, n_steps=n_steps, **kwargs)
    print(f"training {len(specs)} SAEs on {len(sites)} sites for {n_steps} steps of {args.batch_size} "
          f"tokens on {device} -> {out}")
    folders = trainer.fit()
    stopped = [t for t in trainer.trainers if t.error is not None]
    for folder in folders:
        print(f"released {folder}")
    for t in stopped:
        print(f"stopped {t.name}: {t.error}")
    print(f"{len(folders)} SAEs released, {len(stopped)} stopped; log: {out / 'train_log.jsonl'}")
    return 1 if stopped else 0


def _run_distributed(args, env, source, specs, recipe, out, n_steps, kwargs) -> int:
    """Under torchrun: site- or data-parallel training (docs/distributed.md); rank 0 reports."""
    import json

    from saescope.train.distributed import shutdown
    from saescope.train.parallel import fit_distributed

    if env.is_main:
        print(f"training {len(specs)} SAEs, {args.parallel}-parallel over {env.world_size} ranks, for {n_steps} "
              f"steps of {args.batch_size} tokens -> {out}")
    try:
        folders = fit_distributed(args.parallel, source, specs, recipe, out, n_steps=n_steps,
                                  online=args.model is not None, env=env, **kwargs)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise RuntimeError(err if str(err).startswith(str(env)) else f"{env}: {err}") from err
    finally:
        shutdown()
    stopped = []
    if env.is_main:
        summary = json.loads((out / "train_summary.json").read_text())
        stopped = [s for s in summary["saes"] if s["status"] == "stopped"]
        for folder in folders:
            print(f"released {folder}")
        for s in stopped:
            print(f"stopped {s['sae']}: {s['error']}")
        print(f"{len(folders)} SAEs released, {len(stopped)} stopped; summary: {out / 'train_summary.json'}")
    return 1 if stopped else 0


def _every_site(n: int):
    from saescope.sites import SITE_KINDS, Site

    return [Site(layer, kind) for layer in range(n) for kind in SITE_KINDS]
