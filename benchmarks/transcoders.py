"""A layer's transcoder against its skip transcoder (and the mlp_out SAE, for scale) on the
embedded Gemma 3 270M, at the CPU presets' recipe, in one pass over the data.

    python benchmarks/transcoders.py                          # layer 6, 65,536 tokens, ~12 min on 2 busy cores
    python benchmarks/transcoders.py --layer 12 --tokens 262144 --out /tmp/tc12

The pair (mlp_in, mlp_out) is captured once into memory (:class:`InMemorySource`), then three
SAEs train on it together: BatchTopK k, width, diagonal maps σ^−0.5, batch 1,024, lr 2e-3, bf16
(released as JumpReLU).  Evaluation: held-out wiki-vital + python-docs, bf16 forwards.  Prints
each SAE's L0, FVU (of mlp_out), per-dimension FVU, Δ loss and CE recovered (docs/transcoders.md).
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--tokens", type=int, default=65_536, help="training tokens")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-loss-tokens", type=int, default=1024)
    p.add_argument("--out", default="/tmp/saescope-transcoders")
    args = p.parse_args()

    import torch

    from saescope.activations.capture import capture_kept
    from saescope.activations.source import InMemorySource
    from saescope.evaluate.suite import EvalConfig, evaluate_release
    from saescope.models import load_model
    from saescope.sites import Site, io_sites
    from saescope.tokens import load_corpus, model_context_length
    from saescope.train.recipe import Recipe
    from saescope.train.run import release_results
    from saescope.train.spec import sweep
    from saescope.train.trainer import Trainer, TrainOptions

    t0 = time.time()
    model, tok = load_model("gemma-3-270m", device="cpu")
    ctx = model_context_length(model)
    corpus = load_corpus("wiki-vital", tok, seq_len=256, max_tokens=args.tokens, split="train", seed=0, max_context=ctx)
    tc, y = Site(args.layer, "transcoder"), Site(args.layer, "mlp_out")
    halves = list(io_sites(tc))
    rows = {s: [] for s in halves}
    for i in range(0, len(corpus), 8):
        r, _ = capture_kept(model, halves, corpus.input_ids[i:i + 8], corpus.keep_mask[i:i + 8])
        for s in halves:
            rows[s].append(r[s])
    source = InMemorySource({s: torch.cat(v) for s, v in rows.items()})
    specs = (sweep([tc, y], [args.width], architecture="batchtopk", ks=[args.k])
             + sweep([tc], [args.width], architecture="batchtopk", ks=[args.k], skip_connection=True))
    n = args.tokens // 1024
    recipe = Recipe.for_steps(n, batch_size=1024, lr=2e-3, input_norm="diagonal", input_norm_power=0.5,
                              dtype="bfloat16", scale_estimate_tokens=min(131_072, args.tokens // 4))
    trainer = Trainer(source, specs, recipe, args.out, n_steps=n, model_name="gemma-3-270m",
                      options=TrainOptions(progress=False, checkpoint_every=10**6))
    release_results(trainer, trainer.fit())
    t1 = time.time()
    held_out = load_corpus("wiki-vital+python-docs", tok, seq_len=256, max_tokens=args.eval_tokens, split="heldout",
                           seed=0, max_context=ctx)
    summary = evaluate_release(f"{args.out}/release", model, held_out,
                               EvalConfig(loss_tokens=args.eval_loss_tokens, dtype="bfloat16", progress=False),
                               model_name="gemma-3-270m")
    for path, m in summary["saes"].items():
        arch = json.load(open(f"{args.out}/release/{path}/config.json"))["architecture"]
        print(f"{path:45s} {arch:26s} L0 {m['l0']:6.1f}  FVU {m['fvu']:.3f}  FVU per-dim {m['fvu_std']:.3f}  "
              f"Δ loss {m['delta_loss']:.4f}  CE recovered {m['ce_loss_score']:.3f}  dead {m['frac_dead']:.3f}")
    print(f"zero ablation of {y}: {summary['sites'][y.name]['delta_loss_zero_ablation']:.3f} nats; "
          f"train {t1 - t0:.0f} s, eval {time.time() - t1:.0f} s ({n} steps of 1,024)")


if __name__ == "__main__":
    main()
