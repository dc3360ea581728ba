"""The BatchTopK training step through ``SAETrainer.update``: the dense fused products against the
sparse code (saescope/sae/batchtopk_step.py), at the CPU presets' shapes, side by side.

    python benchmarks/batchtopk_step.py            # B, D, k of the default preset's kinds
    python benchmarks/batchtopk_step.py --rounds 5 --steps 9

Prints min / median / max ms per step over the rounds (each round: the median of ``--steps``),
fp32 unless ``--bf16``.  A step: the fused forward and backward, Adam, the decoder renorm."""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saescope.sae.base import SAEConfig
from saescope.sae.registry import build_sae
from saescope.train.recipe import Recipe
from saescope.train.sae_trainer import SAETrainer

p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--steps", type=int, default=7)
p.add_argument("--width", type=int, default=2048)
p.add_argument("--bf16", action="store_true")
a = p.parse_args()
torch.set_num_threads(2)
# (what, batch per Adam step, d_in, k): mlp_out and resid_post split their 1,024 in two
SHAPES = [("mlp_out", 512, 640, 140), ("resid_post", 512, 640, 100), ("attn_z", 1024, 1024, 85)]


def trainer(D, k, sparse, B):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(d_in=D, d_sae=a.width, architecture="batchtopk", k=k))
    sae.sparse_step = sparse
    recipe = Recipe.for_steps(10_000, lr=2e-3, batch_size=B, dtype="bfloat16" if a.bf16 else "float32")
    return SAETrainer(sae, recipe, sparsity_coefficient=0.0, n_steps=10_000)


print(f"{'site kind':<11} {'B':>5} {'D':>5} {'k':>4}  {'dense ms (min/med/max)':>24}  {'sparse ms':>20}  ratio")
for kind, B, D, k in SHAPES:
    x = torch.randn(B * (a.steps + 2), D, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.3, 2, D)
    per = {True: [], False: []}
    ts = {s: trainer(D, k, s, B) for s in (False, True)}
    for r in range(a.rounds):
        for sparse in (False, True):  # interleaved, so load falls on both alike
            t, times = ts[sparse], []
            for step, x_BD in enumerate(x.split(B)):
                start = time.perf_counter()
                t.update(r * 100 + step, x_BD, return_metrics=False)
                if step >= 2:
                    times.append(time.perf_counter() - start)
            per[sparse].append(statistics.median(times) * 1e3)
    d, s = sorted(per[False]), sorted(per[True])
    fmt = lambda v: f"{v[0]:.1f} / {statistics.median(v):.1f} / {v[-1]:.1f}"
    print(f"{kind:<11} {B:>5} {D:>5} {k:>4}  {fmt(d):>24}  {fmt(s):>20}  {statistics.median(d) / statistics.median(s):.2f}x",
          flush=True)
