"""Gemma Scope 2's training options on stored activations: target L0, the high-frequency latent
penalty, Matryoshka JumpReLU (and Matryoshka BatchTopK as the baseline).

On the embedded Gemma 3 270M's layer-6 store, every SAE is trained with saescope's own Trainer and
release path (the CPU target-L0 recipe, ``saescope.presets.CPU_TARGET_L0``) and all of them are
evaluated together with the SAE spliced into the model, on the same held-out wiki-vital tokens
(``saescope.evaluate.suite.evaluate``, as ``benchmarks/fidelity.py`` does).  Prints:

(a) target vs achieved held-out L0 for each target on each site (``layer_6/transcoder`` is in the
    default site list: a site the store lacks is skipped with a message);
(c) the frequency penalty's effect at one target: latents firing on more than τ of the held-out
    tokens, with and without it, and the cost in Δ loss at (about) the same L0;
(d) Matryoshka: each prefix's FVU and Δ loss, and Matryoshka vs plain at the same target.

    python benchmarks/gemma_scope_2.py --data /work/data/l6/store          # everything (~20 min, 2 cores)
    python benchmarks/gemma_scope_2.py --data STORE --parts a --sites layer_6/mlp_out --targets 60
    python benchmarks/gemma_scope_2.py --data STORE_WITH_MLP_IN --parts a --sites layer_6/mlp_out,layer_6/transcoder \
        --targets 60 --skip-transcoder      # (b): SAE vs transcoder vs skip transcoder at one L0

Never a timed test; seconds are wall time on this machine, comparable only within one quiet run.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity import DEFAULT_DATA, ensure_store  # noqa: E402  (the same store, harvested if missing)

SITES = ("layer_6/resid_post", "layer_6/mlp_out", "layer_6/transcoder")


def recipe_for(n_steps: int, **overrides):
    """The CPU target-L0 recipe (saescope.presets.CPU_TARGET_L0) for a run of ``n_steps``."""
    from saescope.presets import CPU_TARGET_L0
    from saescope.settings import RECIPE_FIELDS
    from saescope.train.recipe import Recipe

    fields = {k: v for k, v in CPU_TARGET_L0.items() if k in RECIPE_FIELDS}
    return Recipe.for_steps(n_steps, **{**fields, **overrides})


def train(store, site: str, specs, n_steps: int, out: Path, label: str, **overrides):
    """Train ``specs`` on ``site`` in one data pass; returns {spec name: (folder, release config)}."""
    from saescope.activations.store import StoreReader
    from saescope.jsonio import read_json
    from saescope.train.run import train_and_release
    from saescope.train.trainer import TrainOptions, Trainer

    t0 = time.perf_counter()
    trainer = Trainer(StoreReader(store, [specs[0].site]), specs, recipe_for(n_steps, **overrides), out,
                      n_steps=n_steps, options=TrainOptions(progress=False, checkpoint_every=10**9))
    folders = train_and_release(trainer)
    seconds = time.perf_counter() - t0
    print(f"  trained {label} on {site}: {len(specs)} SAEs, {n_steps} steps, {seconds:.0f} s", flush=True)
    summary = read_json(out / "train_summary.json")
    by_name = {e["sae"]: Path(e["folder"]) for e in summary["saes"] if e["status"] == "released"}
    return {name: (folder, read_json(folder / "config.json")) for name, folder in by_name.items()}, seconds


def fmt(value, spec=".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA / "store",
                   help="an activation store of layer 6 (harvested there if missing, as benchmarks/fidelity.py does)")
    p.add_argument("--sites", default=",".join(SITES), help="sites for (a); a site the store lacks is skipped")
    p.add_argument("--parts", default="a,c,d", help="which tables: a (target L0), c (frequency), d (Matryoshka)")
    p.add_argument("--targets", default="20,60,150")
    p.add_argument("--skip-transcoder", action="store_true",
                   help="(a) at a transcoder site: also train the skip (affine) transcoder at each target")
    p.add_argument("--tokens", type=int, default=262_144, help="training tokens per SAE")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--target", type=float, default=60, help="the target L0 of (c) and (d)")
    p.add_argument("--site", default="layer_6/resid_post", help="the site of (c) and (d)")
    p.add_argument("--max-frequency", type=float, default=0.1, help="τ of (c)")
    p.add_argument("--frequency-coefficients", default="1", help="β values of (c), each one more SAE")
    p.add_argument("--prefixes", default="128,512", help="Matryoshka prefix widths of (d)")
    p.add_argument("--no-batchtopk", action="store_true", help="skip (d)'s Matryoshka BatchTopK baseline")
    p.add_argument("--loss-tokens", type=int, default=2048, help="held-out tokens scored for delta loss")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for L0, FVU and frequencies")
    p.add_argument("--eval-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from saescope.activations.store import ActivationStore
    from saescope.evaluate.suite import EvalConfig, evaluate
    from saescope.models import load_model
    from saescope.release import load_sae
    from saescope.train.spec import SAESpec
    from saescope.tokens import load_corpus

    parts = set(args.parts.split(","))
    targets = [float(t) for t in args.targets.split(",")]
    prefixes = tuple(int(m) for m in args.prefixes.split(","))
    store_dir = args.data if (args.data / "manifest.json").exists() else ensure_store(args.data.parent, args.tokens)
    store = ActivationStore(store_dir)
    from saescope.sae.transcoder import transcoder_architecture
    from saescope.settings import PAIR_KINDS
    from saescope.sites import Site

    # a transcoder site is there when both of its halves (mlp_in, mlp_out) are
    available = {s.name for s in store.sites}
    available |= {f"layer_{L}/{kind}" for L in {s.layer for s in store.sites} for kind, halves in PAIR_KINDS.items()
                  if all(f"layer_{L}/{h}" in available for h in halves)}

    def jumprelu_at(site: str) -> str:  # transcoder sites train a JumpReLU transcoder
        return transcoder_architecture("jumprelu", False) if Site.parse(site).kind in PAIR_KINDS else "jumprelu"
    n_steps = args.tokens // 1024
    lam = recipe_lambda()

    def usable(site: str) -> bool:
        if site not in available:
            print(f"skipping {site}: the store at {store_dir} has no activations for it "
                  f"(it holds {', '.join(sorted(available))})", flush=True)
            return False
        return True

    saes: dict[str, tuple] = {}  # evaluation name -> (site name, folder, config, extra)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def add(trained, site, **extra):
            for name, (folder, config) in trained.items():
                saes[name] = (site, folder, config, {**extra, "training": _training(folder)})

        sites_a = [s for s in args.sites.split(",") if "a" in parts and usable(s)]
        for site in sites_a:
            wanted = targets + ([args.target] if site == args.site and args.target not in targets and parts & {"c", "d"}
                                else [])
            specs = [SAESpec(site, jumprelu_at(site), args.width, sparsity_coefficient=lam, target_l0=t)
                     for t in wanted]
            if args.skip_transcoder and Site.parse(site).kind in PAIR_KINDS:  # (b): the affine version beside it
                specs += [SAESpec(site, transcoder_architecture("jumprelu", True), args.width, sparsity_coefficient=lam,
                                  target_l0=t) for t in wanted]
            if site == args.site and "d" in parts:  # Matryoshka shares the data pass of (a)
                specs.append(SAESpec(site, "matryoshka_jumprelu", args.width, sparsity_coefficient=lam,
                                     target_l0=args.target, prefixes=prefixes))
                if not args.no_batchtopk:
                    specs.append(SAESpec(site, "matryoshka_batchtopk", args.width, k=int(args.target),
                                         prefixes=prefixes))
            trained, seconds[site] = train(store, site, specs, n_steps, tmp / site.replace("/", "."), "targets")
            add(trained, site)
        if ("c" in parts or "d" in parts) and args.site not in sites_a and usable(args.site):
            specs = [SAESpec(args.site, "jumprelu", args.width, sparsity_coefficient=lam, target_l0=args.target)]
            if "d" in parts:
                specs.append(SAESpec(args.site, "matryoshka_jumprelu", args.width, sparsity_coefficient=lam,
                                     target_l0=args.target, prefixes=prefixes))
                if not args.no_batchtopk:
                    specs.append(SAESpec(args.site, "matryoshka_batchtopk", args.width, k=int(args.target),
                                         prefixes=prefixes))
            trained, _ = train(store, args.site, specs, n_steps, tmp / "cd", "plain + Matryoshka")
            add(trained, args.site)
        betas = [float(b) for b in args.frequency_coefficients.split(",")] if "c" in parts else []
        if betas and args.site in available:
            for beta in betas:
                spec = SAESpec(args.site, "jumprelu", args.width, sparsity_coefficient=lam, target_l0=args.target)
                trained, _ = train(store, args.site, [spec], n_steps, tmp / f"freq{beta:g}", f"frequency β={beta:g}",
                                   max_frequency=args.max_frequency, frequency_coefficient=beta)
                add({f"{spec.name}+freq{beta:g}": v for v in trained.values()}, args.site, beta=beta)

        if not saes:
            print("nothing to evaluate")
            return
        model, tokenizer = load_model("gemma-3-270m")
        corpus = load_corpus("wiki-vital", tokenizer, seq_len=256, max_tokens=args.eval_tokens, split="heldout", seed=0)
        to_eval = {}
        for name, (site, folder, config, _) in saes.items():
            sae = load_sae(folder)
            to_eval[name] = (Site.parse(site), sae)
            for m in config.get("matryoshka_prefixes") or []:
                to_eval[f"{name}#{m}"] = (Site.parse(site), sae.prefix(m))
        t0 = time.perf_counter()
        result = evaluate(model, corpus, to_eval, EvalConfig(loss_tokens=args.loss_tokens, dtype=args.eval_dtype,
                                                             progress=False))
        print(f"  evaluated {len(to_eval)} SAEs in {time.perf_counter() - t0:.0f} s on "
              f"{result['info']['n_tokens']} held-out tokens ({result['info']['n_loss_tokens']} scored for Δ loss)")
    m = result["saes"]

    def row(name):
        return m[name]

    if sites_a:
        print(f"\n(a) target vs achieved L0 (JumpReLU, quadratic penalty λ = {lam:g}; width {args.width}, "
              f"{n_steps} steps × 1,024 tokens)")
        print(f"{'site':<20} {'architecture':<25} {'target':>7} {'train L0':>9} {'held-out L0':>12} {'miss':>7} {'FVU':>7} {'Δloss':>7} "
              f"{'CE rec':>7} {'>10%':>5}  warning")
        for name, (site, folder, config, extra) in saes.items():
            if config.get("trained_as") or "beta" in extra or config.get("target_l0") is None:
                continue
            e, t = row(name), config["target_l0"]
            training = extra["training"]
            warned = "yes" if training.get("l0_warnings") else ""
            print(f"{site:<20} {config['architecture']:<25} {t:>7g} {training['average_l0']:>9.1f} {e['l0']:>12.1f} {(e['l0'] - t) / t:>+7.0%} "
                  f"{e['fvu']:>7.4f} {e['delta_loss']:>7.3f} {e['ce_loss_score']:>7.3f} "
                  f"{round(e['frac_high_freq'] * e['d_sae']):>5}  {warned}")

    plain = next((n for n, (s, _, c, x) in saes.items() if s == args.site and "beta" not in x
                  and not c.get("trained_as") and c.get("target_l0") == args.target), None)
    if betas and plain is not None:
        print(f"\n(c) high-frequency latent penalty on {args.site}, target L0 {args.target:g}, τ = {args.max_frequency:g}"
              " (latents firing on more than 10% of the held-out tokens)")
        print(f"{'SAE':<16} {'held-out L0':>12} {'latents>10%':>12} {'FVU':>7} {'Δloss':>7} {'vs none':>8} "
              f"{'CE rec':>7} {'dead':>6}")
        for name, label in [(plain, "no penalty")] + [(n, f"β = {x['beta']:g}") for n, (_, _, _, x) in saes.items()
                                                      if "beta" in x]:
            e = row(name)
            print(f"{label:<16} {e['l0']:>12.1f} {round(e['frac_high_freq'] * e['d_sae']):>12} {e['fvu']:>7.4f} "
                  f"{e['delta_loss']:>7.3f} {e['delta_loss'] - row(plain)['delta_loss']:>+8.3f} "
                  f"{e['ce_loss_score']:>7.3f} {e['frac_dead']:>6.3f}")

    matryoshka = [n for n, (s, _, c, _) in saes.items() if s == args.site and c.get("matryoshka_prefixes")]
    if "d" in parts and matryoshka:
        print(f"\n(d) Matryoshka on {args.site} (prefixes {', '.join(map(str, prefixes))} of {args.width}): each "
              f"prefix alone, and the plain JumpReLU at the same target L0 {args.target:g} (BatchTopK: k = the target)")
        print(f"{'SAE':<26} {'width':>6} {'L0':>7} {'FVU':>7} {'Δloss':>7} {'CE rec':>7}")
        for name in matryoshka:
            arch = saes[name][2]["trained_as"]["architecture"]
            for m_ in saes[name][2]["matryoshka_prefixes"] + [args.width]:
                e = row(name if m_ == args.width else f"{name}#{m_}")
                print(f"{arch:<26} {m_:>6} {e['l0']:>7.1f} {e['fvu']:>7.4f} {e['delta_loss']:>7.3f} "
                      f"{e['ce_loss_score']:>7.3f}")
        if plain is not None:
            e = row(plain)
            print(f"{'jumprelu (plain)':<26} {args.width:>6} {e['l0']:>7.1f} {e['fvu']:>7.4f} {e['delta_loss']:>7.3f} "
                  f"{e['ce_loss_score']:>7.3f}")
    zero = result["sites"]
    print("\nzero ablation: " + ", ".join(f"{s} +{v['delta_loss_zero_ablation']:.3f} nats" for s, v in zero.items()))


def recipe_lambda() -> float:
    from saescope.presets import CPU_TARGET_L0

    (lam,) = CPU_TARGET_L0["sparsity_coefficients"]
    return lam


def _training(folder: Path) -> dict:
    from saescope.release.metrics import read_metrics

    return read_metrics(folder).get("training", {})


if __name__ == "__main__":
    main()
