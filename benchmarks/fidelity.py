"""Fidelity at equal budget: saescope's recipes against SAELens and sparsify on the same activations.

For ``layer_6`` resid_post, mlp_out and attn_z of the embedded Gemma 3 270M (262,144 stored
training tokens, width 2,048, L0 ≈ 50 by default), every choice tried for issue 9 is trained on
the same harvested store with saescope's own :class:`~saescope.train.trainer.Trainer` and release
path, the peers' SAEs are read from the ``.npz`` files their own training loops wrote
(``benchmarks/peers/``, run in their own virtual environments: ``bash scripts/peer-envs.sh``),
and all of them are evaluated together with the SAE spliced in, on the same held-out tokens.
Prints one table per site: tokens, steps, seconds, L0, FVU, FVU after per-dimension
standardisation (``fvu_std``), delta LM loss and CE loss recovered.  Never a timed test.

    python benchmarks/fidelity.py                                  # everything (~40 min, 2 cores)
    python benchmarks/fidelity.py --sites layer_6/mlp_out --variants paper,cpu --eval-dtype bfloat16
    python benchmarks/fidelity.py --run-peers                      # (re)train the peers first

Seconds are wall time on this machine and only comparable within one quiet run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path.home() / ".cache" / "saescope" / "bench-fidelity"
SITES = ("layer_6/resid_post", "layer_6/mlp_out", "layer_6/attn_z")

#: name -> (architecture, sparsity (λ or k), Recipe overrides, why)
VARIANTS: dict[str, tuple[str, float, dict, str]] = {
    "paper": ("jumprelu", 6e-4, {}, "the paper's recipe as is (lr 7e-5, b_dec 0, scalar C)"),
    "cpu-old": ("jumprelu", 1e-3, {"lr": 2e-3, "b_dec_init": "mean"}, "the CPU presets before issue 9"),
    "topk-scalar": ("topk", 50, {"lr": 2e-3, "b_dec_init": "mean", "batch_size": 1024}, "TopK, the paper's scalar C"),
    "topk-centred": ("topk", 50, {"lr": 2e-3, "input_norm": "centred", "batch_size": 1024}, "TopK, C about the mean"),
    "topk-diag": ("topk", 50, {"lr": 2e-3, "input_norm": "diagonal", "batch_size": 1024}, "TopK, per-dimension σ⁻¹"),
    "topk-diag-4k": ("topk", 50, {"lr": 2e-3, "input_norm": "diagonal"}, "TopK, σ⁻¹, batch 4096"),
    "topk-sqrt": ("topk", 50, {"lr": 2e-3, "input_norm": "diagonal", "input_norm_power": 0.5, "batch_size": 1024},
                  "TopK, per-dimension σ^-1/2"),
    "cpu": ("batchtopk", 50, {"lr": 2e-3, "input_norm": "diagonal", "input_norm_power": 0.5, "batch_size": 1024},
            "the CPU presets before the Fisher map: BatchTopK → JumpReLU, σ^-1/2, batch 1024"),
    "cpu-fisher": ("batchtopk", 50, {"lr": 2e-3, "input_norm": "fisher", "input_norm_power": 0.5, "fisher_weight": 0.5,
                                     "batch_size": 1024},
                   "BatchTopK → JumpReLU behind the Fisher map (half Fisher, half σ^-1/2) at every kind"),
    "cpu-now": ("batchtopk", 50, {"lr": 2e-3, "input_norm": "fisher", "input_norm_power": 0.5, "fisher_weight": 0.5,
                                  "fisher_kinds": ("resid_post", "mlp_out"), "batch_size": 1024, "lr_decay_fraction": 0.2},
                "the CPU presets now: cpu-fisher with attn_z behind the σ^-1/2 map, and the lr decay over the last 20%"),
    "cpu-decay": ("batchtopk", 50, {"lr": 2e-3, "input_norm": "diagonal", "input_norm_power": 0.5,
                                    "batch_size": 1024, "lr_decay_fraction": 0.8}, "the same with a cosine lr decay"),
}
#: variant + KL: the variant's released SAE, then the KL + MSE fine-tune (saescope/train/finetune.py)
KL_SUFFIX = "+kl"
PEERS = {  # label -> npz name pattern written by benchmarks/peers/*.py
    "sparsify TopK": "sparsify_topk_{site}.npz",
    "SAELens TopK": "saelens_topk_{site}.npz",
    "SAELens JumpReLU": "saelens_jumprelu_{site}.npz",
}


def ensure_store(data: Path, tokens: int) -> Path:
    store = data / "store"
    if not (store / "manifest.json").exists() or not json.loads((store / "manifest.json").read_text()).get("complete"):
        subprocess.run([sys.executable, "-m", "saescope", "harvest", "--sites", "all@6", "--tokens", str(tokens),
                        "--seq-len", "256", "--out", str(data), "--no-progress"], check=True)
    return store


def train_variant(store: Path, site: str, name: str, width: int, tokens: int, out: Path, fisher=None):
    from saescope.activations.store import StoreReader
    from saescope.train.recipe import Recipe
    from saescope.train.run import train_and_release
    from saescope.train.spec import K_ARCHITECTURES, SAESpec
    from saescope.train.trainer import TrainOptions, Trainer

    arch, sparsity, overrides, _ = VARIANTS[name]
    n_steps = tokens // overrides.get("batch_size", 4096)
    recipe = Recipe.for_steps(n_steps, **overrides)
    spec = (SAESpec(site, arch, width, k=int(sparsity)) if arch in K_ARCHITECTURES
            else SAESpec(site, arch, width, sparsity_coefficient=sparsity))
    t0 = time.perf_counter()
    folders = train_and_release(Trainer(StoreReader(store, [site]), [spec], recipe, out, n_steps=n_steps,
                                        options=TrainOptions(progress=False, checkpoint_every=10**9),
                                        fisher=fisher if recipe.input_norm == "fisher" else None))
    return folders[0], time.perf_counter() - t0, n_steps


def load_peer(path: Path):
    from saescope.sae.base import SAEConfig
    from saescope.sae.registry import build_sae

    z = np.load(path, allow_pickle=True)
    arch = str(z["architecture"])
    D, F = z["W_enc"].shape
    sae = build_sae(SAEConfig(d_in=D, d_sae=F, architecture=arch, k=int(z["k"]) if arch == "topk" else None,
                              centre_input=False))
    with torch.no_grad():
        for n in sae.array_names:
            getattr(sae, n).copy_(torch.from_numpy(np.asarray(z[n], dtype=np.float32)))
    return sae.eval(), float(z["seconds"]), int(z["steps"])


def finetuned(model, corpus, site, sae, row, args):
    """A copy of ``sae`` after the KL + MSE fine-tune; its row adds the fine-tune's tokens and time."""
    import copy

    from saescope.train.finetune import FinetuneConfig, finetune_kl

    sae = copy.deepcopy(sae)
    t0 = time.perf_counter()
    log = finetune_kl(model, corpus, site, sae, FinetuneConfig(tokens=args.finetune_tokens, lr=args.finetune_lr,
                                                               beta=args.finetune_beta))
    print(f"  KL fine-tune {site}: KL {log[0]['kl']:.4f} -> {log[-1]['kl']:.4f}, "
          f"L0 {log[0]['l0']:.1f} -> {log[-1]['l0']:.1f} over {len(log)} steps", flush=True)
    return (site, sae), {"seconds": row["seconds"] + time.perf_counter() - t0, "steps": row["steps"] + len(log),
                         "tokens": row["tokens"] + args.finetune_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="store (harvested if missing) and outputs")
    p.add_argument("--sites", default=",".join(SITES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tokens", type=int, default=262_144)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--loss-tokens", type=int, default=16_384, help="held-out tokens scored for delta loss")
    p.add_argument("--eval-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="precision of the model's forwards in the loss metrics")
    p.add_argument("--peers", type=Path, default=None, help="folder of peer .npz files (default DATA/peers)")
    p.add_argument("--run-peers", action="store_true", help="train the peers first (needs scripts/peer-envs.sh)")
    p.add_argument("--finetune-tokens", type=int, default=8192, help="KL fine-tune tokens of the '+kl' variants")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--finetune-beta", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from saescope.evaluate.suite import EvalConfig, evaluate
    from saescope.models import load_model
    from saescope.release import load_sae
    from saescope.sites import Site
    from saescope.tokens import load_corpus

    store = ensure_store(args.data, args.tokens)
    peers_dir = args.peers or args.data / "peers"
    if args.run_peers:
        subprocess.run(["bash", str(HERE / "peers" / "run_all.sh"), str(store), str(peers_dir)], check=True)
    model, tokenizer = load_model("gemma-3-270m")
    corpus = load_corpus("wiki-vital", tokenizer, seq_len=256, max_tokens=args.loss_tokens + 4096, split="heldout",
                         seed=0)
    train_corpus = None
    if any(v.endswith(KL_SUFFIX) for v in args.variants.split(",")):
        train_corpus = load_corpus("wiki-vital", tokenizer, seq_len=256, max_tokens=args.finetune_tokens * 2,
                                   split="train", seed=1)
    from saescope.activations.fisher import fisher_of_sites

    # the Fisher map's metric, on training text (a seed apart from the store's order)
    fisher = fisher_of_sites(model, load_corpus("wiki-vital", tokenizer, seq_len=256, max_tokens=8192, split="train",
                                                seed=2), n_tokens=4096)
    for site_name in args.sites.split(","):
        site = Site.parse(site_name)
        rows = {}
        saes = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.variants.split(","):
                base = name.removesuffix(KL_SUFFIX)
                if base not in saes:
                    folder, seconds, steps = train_variant(store, site_name, base, args.width, args.tokens,
                                                           Path(tmp) / base, fisher)
                    saes[base] = (site, load_sae(folder))
                    rows[base] = {"seconds": seconds, "steps": steps, "tokens": args.tokens}
                if name != base:
                    saes[name], rows[name] = finetuned(model, train_corpus, site, saes[base][1], rows[base], args)
                    print(f"{name}: fine-tuned in {rows[name]['seconds'] - rows[base]['seconds']:.0f} s", flush=True)
            saes = {n: saes[n] for n in args.variants.split(",")}
            rows = {n: rows[n] for n in args.variants.split(",")}
        for label, pattern in PEERS.items():
            path = peers_dir / pattern.format(site=site_name.replace("/", "."))
            if path.exists():
                sae, seconds, steps = load_peer(path)
                saes[label] = (site, sae)
                rows[label] = {"seconds": seconds, "steps": steps, "tokens": steps * 4096}
        result = evaluate(model, corpus, saes, EvalConfig(loss_tokens=args.loss_tokens, dtype=args.eval_dtype, progress=False))
        print(f"\n{site_name}  (zero ablation: +{result['sites'][site_name]['delta_loss_zero_ablation']:.3f} nats; "
              f"{result['info']['n_loss_tokens']} held-out loss tokens)")
        print(f"{'variant':<18} {'tokens':>8} {'steps':>6} {'sec':>6} {'L0':>7} {'FVU':>7} {'fvu_std':>8} "
              f"{'Δloss':>7} {'CE rec':>7} {'dead':>6}")
        for name, row in rows.items():
            m = result["saes"][name]
            print(f"{name:<18} {row['tokens']:>8} {row['steps']:>6} {row['seconds']:>6.0f} {m['l0']:>7.1f} "
                  f"{m['fvu']:>7.4f} {m['fvu_std']:>8.4f} {m['delta_loss']:>7.3f} {m['ce_loss_score']:>7.3f} "
                  f"{m['frac_dead']:>6.3f}", flush=True)


if __name__ == "__main__":
    main()
