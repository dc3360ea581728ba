"""``saescope train``: train a sweep of SAEs (sites × widths × λ or k) in one pass over the data.

Data come from an activation store (``--store RUN/store``) or online from the model
(``--model ... --corpus ... --tokens N``).  The run folder (``--out``; with ``--store RUN/store``
it defaults to ``RUN``) gets ``checkpoints/``, ``train_log.jsonl``, ``train_summary.json`` and
``release/<kind>/layer_L/width_W/average_l0_K/``.  Relaunching the same command resumes.

Transcoders: ``--sites transcoder@6`` (or ``layer_6/transcoder``) trains a transcoder that reads
layer 6's MLP input (``mlp_in``) and predicts its output (``mlp_out``), as a jumprelu_transcoder
(``--arch jumprelu``) or batchtopk_transcoder (``--arch batchtopk``, released as a JumpReLU
transcoder); ``--skip-connection`` adds the affine skip path x·W_skip.  A store must hold both
halves (``saescope harvest --sites transcoder@6`` stores them).  See docs/transcoders.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from saescope.commands import positive_int


def add_parser(subparsers) -> None:
    from saescope.settings import TrainSettings, add_flags

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

    add_flags(p.add_argument_group("what to train, and how (shared with saescope run)"), TrainSettings,
              shown=TrainSettings())
    how = p.add_argument_group("run")
    how.add_argument("--out", type=Path, default=None, help="run folder (default: the store's parent folder)")
    how.add_argument("--log-every", type=positive_int, default=100, help="steps between log records (default 100)")
    how.add_argument("--loggers", default="", help="also log to: tensorboard, wandb (comma-separated; must be installed)")
    how.add_argument("--no-progress", action="store_true", help="no progress bar")
    how.add_argument("--parallel", choices=("site", "data", "latent"), default="site",
                     help="under torchrun: site = each rank trains its share of the SAEs (default; no "
                          "communication), data = every rank trains every SAE on its slice of each batch "
                          "(gradient all-reduce), latent = every SAE's latents split over the ranks (for SAEs "
                          "too wide for one device; JumpReLU, from a store).  See docs/distributed.md")
    p.set_defaults(func=run)


def _sites_from(selection: str, available) -> list:
    """Select among the sites a source holds (a transcoder site where it holds both halves); a
    full site name that it lacks is an error."""
    from saescope.settings import PAIR_KINDS
    from saescope.sites import Site, io_sites, select_sites

    available = set(available)
    n_layers = max(s.layer for s in available) + 1
    pairs = {Site(layer, kind) for layer in range(n_layers) for kind in PAIR_KINDS}
    available |= {p for p in pairs if set(io_sites(p)) <= available}
    chosen = select_sites(selection, n_layers)
    named = [Site.parse(t) for t in selection.split(",") if t.strip().startswith("layer_")]
    missing = [s.name for s in named if s not in available]
    if missing:
        halves = sorted({h.name for s in named if s.kind in PAIR_KINDS for h in io_sites(s) if h not in available})
        raise ValueError(f"the data have no activations for {', '.join(missing)}"
                         + (f" (missing {', '.join(halves)}; harvest with --sites including transcoder)" if halves else ""))
    sites = [s for s in chosen if s in available]
    if not sites:
        raise ValueError(f"--sites {selection!r} selects none of the available sites")
    return sites


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from saescope.outputs import writable_folder
    from saescope.settings import TrainSettings, overrides

    # Flags and folders are checked before any data is read or model loaded.
    given = overrides(TrainSettings, args)
    s = replace(TrainSettings(), **given)
    if (args.store is None) == (args.model is None):
        raise ValueError("give either --store (train from an activation store) or --model (train online)")
    if args.store is None and s.train_tokens is None:
        raise ValueError("online training needs --tokens (how many activations to train on)")
    if args.store is None and args.out is None:
        raise ValueError("online training needs --out (the run folder)")

    from saescope.distributed.env import init_distributed, launched_by_torchrun, resolve_device
    from saescope.train.recipe import Recipe
    from saescope.train.run import release_results
    from saescope.train.spec import K_ARCHITECTURES, sweep
    from saescope.train.trainer import Trainer, TrainOptions

    if s.architecture in K_ARCHITECTURES:
        if not s.ks and not s.kind_ks:
            raise ValueError(f"--arch {s.architecture} needs --k (e.g. --k 32,64)")
        if "sparsity_coefficients" in given:
            raise ValueError(f"--arch {s.architecture} takes --k, not --l0-coefficients")
    elif s.ks or s.kind_ks:
        raise ValueError(f"--arch {s.architecture} takes --l0-coefficients, not --k or --kind-k")
    if s.architecture in K_ARCHITECTURES and s.target_l0s:
        raise ValueError(f"--target-l0 is for jumprelu and matryoshka_jumprelu; --arch {s.architecture} takes --k "
                         "(k is its L0)")
    if "transcoder" in s.sites:  # before any model loads: transcoders train as jumprelu or batchtopk
        from saescope.sae.transcoder import transcoder_architecture

        transcoder_architecture(s.architecture, s.skip_connection)
    if args.store is not None and not args.store.is_dir():
        raise FileNotFoundError(f"no activation store at {args.store}: it does not exist (run saescope harvest first)")
    writable_folder(args.out if args.out is not None else args.store.resolve().parent)
    env = init_distributed(s.device) if launched_by_torchrun() else None  # torchrun: one GPU per rank
    device = env.device if env is not None else resolve_device(s.device)

    fisher = None  # input_norm "fisher": the model's Fisher metric per site (online only)
    if args.store is not None:
        from saescope.activations.store import ActivationStore, StoreReader

        store = ActivationStore(args.store)
        sites = _sites_from(s.sites, store.sites)
        source = StoreReader(store, sites)
        model_name = store.manifest["config"].get("model")
        tokens = s.train_tokens if s.train_tokens is not None else store.n_tokens
        out = args.out if args.out is not None else args.store.resolve().parent
    else:
        from saescope import defaults
        from saescope.activations.online import OnlineSource
        from saescope.models import load_model
        from saescope.sites import n_layers
        from saescope.tokens import load_corpus

        model, tokenizer = load_model(args.model, device=device)
        all_sites = _sites_from(s.sites, set(_every_site(n_layers(model))))
        corpus = load_corpus(args.corpus or defaults.DEFAULT_CORPUS, tokenizer, seq_len=s.seq_len,
                             max_tokens=s.train_tokens, seed=s.seed)
        if env is not None and args.parallel == "latent":
            raise ValueError("--parallel latent trains from an activation store: run saescope harvest first")
        if env is not None:  # each rank runs the model on its own share of the sequences
            from saescope.distributed.exchange import corpus_share

            corpus = corpus_share(corpus, env.rank, env.world_size)
        source = OnlineSource(model, corpus, all_sites, device=device, cache_dir=args.out,
                              site_rows=s.site_rows(all_sites, max(1, s.train_tokens // s.batch_size)))
        sites, model_name, tokens, out = all_sites, args.model, s.train_tokens, args.out
        if s.input_norm == "fisher":
            from saescope.activations.fisher import fisher_of_sites

            fisher = fisher_of_sites(model, corpus, n_tokens=s.fisher_tokens, seed=s.seed,
                                     progress=not args.no_progress)

    n_steps = max(1, tokens // s.batch_size)
    recipe = Recipe.for_steps(n_steps, **s.recipe_overrides())
    specs = sweep(sites, s.widths, architecture=s.architecture, sparsity_coefficients=s.sparsity_coefficients,
                  ks=s.ks, kind_ks=s.kind_ks, target_l0s=s.target_l0s, prefixes=s.prefixes, seed=s.seed,
                  skip_connection=s.skip_connection)
    options = TrainOptions(device=str(device), checkpoint_every=s.checkpoint_every, log_every=args.log_every,
                           loggers=tuple(x.strip() for x in args.loggers.split(",") if x.strip()),
                           progress=not args.no_progress, release_layout=s.layout)
    kwargs = dict(data_seed=s.seed, model_name=model_name, options=options, fisher=fisher)
    if env is not None:
        return _run_distributed(args, env, source, specs, recipe, out, n_steps, kwargs)
    from saescope.distributed.layout import check_not_split

    check_not_split(out)
    trainer = Trainer(source, specs, recipe, out, n_steps=n_steps, **kwargs)
    print(f"training {len(specs)} SAEs on {len(sites)} sites for {n_steps} steps of {s.batch_size} "
          f"tokens on {device} -> {out}")
    results = trainer.fit()
    folders = release_results(trainer, results)
    stopped = [r for r in results if r.error is not None]
    for folder in folders:
        print(f"released {folder}")
    for r in stopped:
        print(f"stopped {r.spec.name}: {r.error}")
    print(f"{len(folders)} SAEs released, {len(stopped)} stopped; log: {out / 'train_log.jsonl'}")
    return 1 if stopped else 0


def _run_distributed(args, env, source, specs, recipe, out, n_steps, kwargs) -> int:
    """Under torchrun: site- or data-parallel training (docs/distributed.md); rank 0 reports."""
    from saescope.jsonio import read_json

    from saescope.distributed.env import shutdown
    from saescope.distributed.modes import fit_distributed

    if env.is_main:
        print(f"training {len(specs)} SAEs, {args.parallel}-parallel over {env.world_size} ranks, for {n_steps} "
              f"steps of {recipe.batch_size} tokens -> {out}")
    try:
        folders = fit_distributed(args.parallel, source, specs, recipe, out, n_steps=n_steps,
                                  online=args.model is not None, env=env, **kwargs)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise RuntimeError(err if str(err).startswith(str(env)) else f"{env}: {err}") from err
    finally:
        shutdown()
    stopped = []
    if env.is_main:
        summary = read_json(out / "train_summary.json")
        stopped = [s for s in summary["saes"] if s["status"] == "stopped"]
        for folder in folders:
            print(f"released {folder}")
        for s in stopped:
            print(f"stopped {s['sae']}: {s['error']}")
        print(f"{len(folders)} SAEs released, {len(stopped)} stopped; summary: {out / 'train_summary.json'}")
    return 1 if stopped else 0


def _every_site(n: int):
    from saescope.sites import KNOWN_KINDS, Site

    return [Site(layer, kind) for layer in range(n) for kind in KNOWN_KINDS]
