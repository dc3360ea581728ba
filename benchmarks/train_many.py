"""How fast the trainer steps many SAEs fed from shared batches, and what its bookkeeping costs.

Prints, for N SAEs of one site (same width, λ swept) trained by :class:`saescope.train.Trainer`
from one in-memory source:

* tokens/s of the data pass through ``SAETrainer.update`` (each batch feeds all N SAEs) and
  SAE-tokens/s (N × that);
* the same N SAEs stepped by a bare loop (loss, backward, decoder rule, Adam) on the same
  batches — the trainer's overhead (NaN/Inf checks, metrics, schedules) is the difference;
* ``Trainer.fit`` end to end (scale estimate, source reads, one checkpoint);
* the peak memory of ``Trainer.fit`` (CUDA: max allocated; CPU: peak resident set size, measured
  before anything else runs).

Example (the issue's figure: 54 SAEs at d_in 640; use a GPU or expect minutes per step on a CPU):

    python benchmarks/train_many.py --saes 54 --width 16384 --d-in 640 --steps 5 --device cuda
    python benchmarks/train_many.py --saes 6 --width 4096 --d-in 640 --steps 3 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time

import torch

from saescope.sae.base import SAEConfig
from saescope.sae.registry import build_sae
from saescope.sites import Site
from saescope.train.recipe import Recipe
from saescope.train.sae_trainer import SAETrainer
from saescope.activations.source import InMemorySource
from saescope.train.spec import SAESpec
from saescope.train.trainer import Trainer, TrainOptions


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA max allocated)"
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"{rss_kib / 2**20:.2f} GiB (peak RSS)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saes", type=int, default=6)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=640)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (allocator, thread pool)")
    p.add_argument("--arch", default="jumprelu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    site = Site(0, "resid_post")
    n_steps = args.warmup + args.steps
    # unit mean squared norm, as the trainer's inputs are after dividing by C
    data = {site: torch.randn(args.batch * n_steps, args.d_in) / args.d_in**0.5}
    source = InMemorySource(data)
    recipe = Recipe.for_steps(n_steps, batch_size=args.batch, dtype=args.dtype, scale_estimate_tokens=args.batch)
    coefficients = [1e-4 * 1.2**i for i in range(args.saes)]
    specs = [SAESpec(site, args.arch, args.width, sparsity_coefficient=c) for c in coefficients]
    print(f"{args.saes} {args.arch} SAEs, d_in {args.d_in}, width {args.width}, batch {args.batch}, "
          f"{args.dtype}, device {device}, {torch.get_num_threads()} threads", flush=True)

    # --- Trainer.fit end to end first (so the CPU's peak RSS so far is its own): source reads,
    # scale estimate, all steps, one checkpoint, no release ---
    with tempfile.TemporaryDirectory() as out:
        options = TrainOptions(device=str(device), checkpoint_every=10**9, log_every=10**9, progress=False)
        fit = Trainer(source, specs, recipe, out, n_steps=n_steps, options=options)
        start = time.perf_counter()
        fit.fit()
        sync(device)
        fit_s = time.perf_counter() - start
        fit_memory = peak_memory(device)
        del fit

    # --- SAETrainer.update against a bare loop doing the same maths without the trainer's checks
    # and metrics; steps interleaved so machine noise hits both alike ---
    batches = [b[site].to(device) for _, b in zip(range(n_steps), source.iter_batches(args.batch))]
    trainers, saes, optimizers = [], [], []
    for spec, c in zip(specs, coefficients):
        torch.manual_seed(0)
        sae = build_sae(SAEConfig(args.d_in, args.width, args.arch)).to(device)
        trainers.append(SAETrainer(sae, recipe, sparsity_coefficient=c, n_steps=n_steps, name=spec.name, site=site))
        torch.manual_seed(0)
        sae = build_sae(SAEConfig(args.d_in, args.width, args.arch)).to(device)
        saes.append(sae)
        optimizers.append(torch.optim.Adam(sae.parameters(), lr=recipe.lr, betas=(0.0, 0.999)))

    def trainer_step(step: int) -> None:
        for t in trainers:
            t.update(step, batches[step], return_metrics=False)

    def bare_step(step: int) -> None:
        for sae, opt, c in zip(saes, optimizers, coefficients):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
                out = sae.loss(batches[step], c)
            opt.zero_grad(set_to_none=True)
            out.total.backward()
            sae.remove_parallel_decoder_grad_()
            opt.step()
            sae.normalize_decoder_()
            if hasattr(sae, "clamp_threshold_"):
                sae.clamp_threshold_()

    trainer_s = bare_s = 0.0
    for step in range(n_steps):
        for fn in (trainer_step, bare_step):
            sync(device)
            start = time.perf_counter()
            fn(step)
            sync(device)
            if step >= args.warmup:
                elapsed = time.perf_counter() - start
                if fn is trainer_step:
                    trainer_s += elapsed / args.steps
                else:
                    bare_s += elapsed / args.steps

    tok = args.batch
    print(f"SAETrainer: {trainer_s * 1e3:9.1f} ms/step  {tok / trainer_s:12,.0f} tokens/s  "
          f"{args.saes * tok / trainer_s:14,.0f} SAE-tokens/s")
    print(f"bare loop:  {bare_s * 1e3:9.1f} ms/step  {tok / bare_s:12,.0f} tokens/s  "
          f"{args.saes * tok / bare_s:14,.0f} SAE-tokens/s")
    print(f"SAETrainer overhead over the bare loop: {100 * (trainer_s / bare_s - 1):+.1f}%")
    print(f"Trainer.fit, {n_steps} steps incl. warm-up, setup and final checkpoint: {fit_s:.2f} s "
          f"({n_steps * tok / fit_s:,.0f} tokens/s)")
    print(f"peak memory of Trainer.fit: {fit_memory}")


if __name__ == "__main__":
    sys.exit(main())
