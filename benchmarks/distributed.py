"""Distributed training throughput: 2 CPU processes vs one process with 2 threads, and one
JumpReLU training step on a GPU as model-FLOPs utilisation (MFU).

CPU section (always): N JumpReLU SAEs on one site, fed random batches, stepped by
:class:`saescope.train.sae_trainer.SAETrainer` (loss, backward, decoder rule, Adam):

* ``1 process x 2 threads``   every SAE in one process (the baseline);
* ``site-parallel 2 x 1``     torchrun, 2 processes of 1 thread, each training its share of the
                              SAEs (:func:`~saescope.distributed.assign.assign_specs`); no communication;
* ``data-parallel 2 x 1``     every SAE on both ranks, half of each batch each, gradients averaged
                              (:class:`~saescope.distributed.collectives.GradAllReduce`);
* ``latent-parallel 2 x 1``   every SAE's latents split over the ranks
                              (:class:`~saescope.sae.sharded.ShardedJumpReLUSAE`).

Throughput is tokens/s of the data pass (each token goes through all N SAEs).  The
communication share is the time spent in collectives (every ``all_reduce`` is timed) over the
step time, on rank 0.

GPU section (when CUDA is available): one training step of a JumpReLU SAE with d_in 2,304 at
widths 16,384 and 131,072, batch 4,096, timed with CUDA events, in fp32 (TF32 off: the paper's
numerics), fp32 with TF32 matmuls, and bf16 autocast; MFU = 10·B·D·F model FLOPs per step (the
five B×D×F matrix products of a step with no input gradient; the 6·N·tokens convention would
count 12·B·D·F) over the device's dense peak for that precision (printed).

    python benchmarks/distributed.py                      # CPU section, then GPU if present
    python benchmarks/distributed.py --saes 4 --width 2048 --d-in 256 --batch 2048 --steps 10
    python benchmarks/distributed.py --gpu-only
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

# Dense peak TFLOP/s by device-name fragment: (fp32, tf32, bf16), from the vendors' data sheets.
PEAKS = {
    "H200": (67.0, 494.7, 989.4),
    "H100 PCIe": (51.2, 378.0, 756.0),
    "H100": (67.0, 494.7, 989.4),  # SXM
    "A100": (19.5, 156.0, 312.0),
    "L40S": (91.6, 183.0, 366.0),
    "L4": (30.3, 60.0, 121.0),
    "A10": (31.2, 62.5, 125.0),
}


# --- CPU section ---------------------------------------------------------------------------------


class CollectiveClock:
    """Times every all_reduce / all_to_all_single (the benchmark's view of communication)."""

    def __init__(self):
        self.seconds = 0.0
        for name in ("all_reduce", "all_to_all_single"):
            original = getattr(dist, name)

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - start

            setattr(dist, name, timed)


def make_trainers(mode: str, args, rank: int, world: int):
    from saescope.sae.base import SAEConfig
    from saescope.sae.jumprelu import JumpReLUSAE
    from saescope.sae.sharded import ShardedJumpReLUSAE
    from saescope.sites import Site
    from saescope.distributed.assign import assign_specs
    from saescope.distributed.collectives import GradAllReduce
    from saescope.train.recipe import Recipe
    from saescope.train.sae_trainer import SAETrainer
    from saescope.train.spec import sweep

    site = Site(0, "resid_post")
    specs = sweep([site], [args.width], sparsity_coefficients=[1e-3 * (i + 1) for i in range(args.saes)])
    if mode == "site":
        specs = assign_specs(specs, world, d_in={site: args.d_in}, split_sites="always")[rank]
    recipe = Recipe.for_steps(1000, batch_size=args.batch)
    cfg = SAEConfig(d_in=args.d_in, d_sae=args.width)
    trainers = []
    for spec in specs:
        torch.manual_seed(spec.seed)
        if mode == "latent":
            sae = ShardedJumpReLUSAE(cfg, rank=rank, world_size=world)
            reduce = sae.reduce_grads
        else:
            sae = JumpReLUSAE(cfg)
            reduce = GradAllReduce() if mode == "data" else None
        trainers.append(SAETrainer(sae, recipe, sparsity_coefficient=spec.sparsity_coefficient, n_steps=1000,
                                   reduce_grads=reduce))
    return trainers


def run_steps(mode: str, args, rank: int = 0, world: int = 1) -> dict:
    """Time ``args.steps`` steps (after ``args.warmup``) of this process's SAEs."""
    clock = CollectiveClock() if world > 1 else None
    trainers = make_trainers(mode, args, rank, world)
    rows = args.batch // world if mode == "data" else args.batch
    g = torch.Generator().manual_seed(rank if mode == "data" else 0)
    batches = [torch.randn(rows, args.d_in, generator=g) for _ in range(4)]
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if world > 1:
                dist.barrier()
                clock.seconds = 0.0
            start = time.perf_counter()
        for t in trainers:
            t.update(step, batches[step % len(batches)], return_metrics=False)
    if world > 1:
        dist.barrier()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": args.steps * args.batch / elapsed, "seconds_per_step": elapsed / args.steps,
            "comm_share": (clock.seconds / elapsed) if clock else 0.0, "saes_here": len(trainers)}


def worker(args) -> None:
    """One torchrun rank: time one mode, rank 0 prints a JSON line."""
    from saescope.distributed.env import init_distributed, shutdown

    torch.set_num_threads(1)
    env = init_distributed("cpu")
    result = run_steps(args.worker, args, env.rank, env.world_size)
    if env.is_main:
        print("RESULT " + json.dumps(result), flush=True)
    shutdown()


def launch(mode: str, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), __file__, "--worker", mode, *sys.argv[1:]]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"torchrun {mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def cpu_section(args) -> None:
    print(f"CPU: {args.saes} JumpReLU SAEs, d_in {args.d_in}, width {args.width}, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup}")
    torch.set_num_threads(2)
    rows = [("1 process x 2 threads", run_steps("single", args))]
    torch.set_num_threads(1)
    rows.append(("1 process x 1 thread", run_steps("single", args)))
    for mode in ("site", "data", "latent"):
        rows.append((f"{mode}-parallel 2 x 1", launch(mode, args)))
    base = rows[0][1]["tokens_per_s"]
    print(f"{'':26s} {'tokens/s':>10s} {'s/step':>8s} {'vs 1x2':>7s} {'comm share':>10s}")
    for name, r in rows:
        print(f"{name:26s} {r['tokens_per_s']:10.0f} {r['seconds_per_step']:8.3f} {r['tokens_per_s'] / base:6.2f}x "
              f"{100 * r['comm_share']:9.1f}%")


# --- GPU section ---------------------------------------------------------------------------------


def device_peaks(name: str) -> tuple[float, float, float] | None:
    for fragment, peaks in PEAKS.items():
        if fragment in name:
            return peaks
    return None


def gpu_step_time(width: int, precision: str, args) -> float:
    """Median milliseconds of one SAETrainer.update (loss, backward, decoder rule, Adam)."""
    from saescope.sae.base import SAEConfig
    from saescope.sae.jumprelu import JumpReLUSAE
    from saescope.train.recipe import Recipe
    from saescope.train.sae_trainer import SAETrainer

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    dtype = "bfloat16" if precision == "bf16" else "float32"
    torch.manual_seed(0)
    sae = JumpReLUSAE(SAEConfig(d_in=2304, d_sae=width), step_path="dense").to(device)
    recipe = Recipe.for_steps(1000, batch_size=4096, dtype=dtype)
    trainer = SAETrainer(sae, recipe, sparsity_coefficient=1e-3, n_steps=1000)
    x = torch.randn(4096, 2304, device=device)
    x /= x.pow(2).sum(-1).mean().sqrt()  # E‖x‖² = 1, the units the recipe assumes
    for step in range(args.gpu_warmup):
        trainer.update(step, x, return_metrics=False)
    times = []
    for step in range(args.gpu_steps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        trainer.update(args.gpu_warmup + step, x, return_metrics=False)
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    del trainer, sae
    torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def gpu_section(args) -> None:
    name = torch.cuda.get_device_name()
    peaks = device_peaks(name)
    print(f"\nGPU: {name}; one JumpReLU training step, d_in 2304, batch 4096 (CUDA events, median of {args.gpu_steps})")
    if peaks is None:
        print("  (device not in the peak table: MFU not computed; add it to PEAKS)")
    print(f"{'width':>8s} {'precision':>20s} {'ms/step':>9s} {'TFLOP/s':>9s} {'peak':>7s} {'MFU':>6s}")
    labels = {"fp32": ("fp32 (TF32 off)", 0), "tf32": ("fp32, TF32 matmuls", 1), "bf16": ("bf16 autocast", 2)}
    for width in args.gpu_widths:
        for precision in ("fp32", "tf32", "bf16"):
            ms = gpu_step_time(width, precision, args)
            tflops = 10 * 4096 * 2304 * width / (ms / 1e3) / 1e12
            label, i = labels[precision]
            peak = f"{peaks[i]:7.0f}" if peaks else "      ?"
            mfu = f"{100 * tflops / peaks[i]:5.1f}%" if peaks else "     ?"
            print(f"{width:8d} {label:>20s} {ms:9.2f} {tflops:9.1f} {peak} {mfu}")
    torch.backends.cuda.matmul.allow_tf32 = False
    print("Gemma Scope reported 45 ms/step for 131K latents on 8 TPUv3 chips (~50.8% MFU).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saes", type=int, default=4)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gpu-only", action="store_true")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--gpu-widths", type=lambda t: [int(v) for v in t.split(",")], default=[16384, 131072])
    p.add_argument("--gpu-steps", type=int, default=20)
    p.add_argument("--gpu-warmup", type=int, default=5)
    p.add_argument("--worker", choices=("site", "data", "latent"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not args.gpu_only:
        cpu_section(args)
    if not args.cpu_only:
        if torch.cuda.is_available():
            gpu_section(args)
        else:
            print("\nGPU section skipped: CUDA is not available")


if __name__ == "__main__":
    main()
