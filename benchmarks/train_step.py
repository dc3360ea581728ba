"""Tokens/s of JumpReLU training steps, against the dense bound and against SAELens.

A step is what :class:`saescope.train.sae_trainer.SAETrainer` does per batch: forward, backward,
remove the decoder gradient's parallel part, Adam (β = (0, 0.999)), renormalise decoder rows,
clamp θ.  The dense bound is 10·d_in·width FLOPs per token (forward 4, backward 6: no input
gradient) at this machine's fp32 matrix-multiply rate, measured here on a B×d_in @ d_in×width
product.  The SAE is calibrated to a realistic sparsity first (θ set so that L0 ≈ --target-l0;
a freshly initialised SAE fires half its latents, which no long run spends time at).

    python benchmarks/train_step.py                # full run (a few minutes on 2 threads)
    python benchmarks/train_step.py --quick        # small sizes, a smoke test
    python benchmarks/train_step.py --saelens-python /tmp/saelens/bin/python

SAELens is optional and runs in its own environment (``python -m venv --system-site-packages
/tmp/saelens && /tmp/saelens/bin/pip install sae-lens``): the script starts that interpreter on
the same data and the same initial weights and times its JumpReLU step, mirroring
``sae_lens.training.sae_trainer.SAETrainer._train_step`` (forward under autocast if asked,
firing statistics, backward, clip_grad_norm_, Adam).  Peak memory is each worker process's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LR, LAMBDA, BANDWIDTH = 7e-5, 1e-3, 0.001
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def matmul_rate(B: int, D: int, F: int, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """FLOP/s of a B×D @ D×F product into a reused output (the median of repeated products)."""
    x, W = torch.randn(B, D, dtype=dtype), torch.randn(D, F, dtype=dtype)
    out = torch.empty(B, F, dtype=dtype)
    torch.mm(x, W, out=out)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        torch.mm(x, W, out=out)
        times.append(time.perf_counter() - t)
    return 2 * B * D * F / float(np.median(times))


def synthetic_batch(B: int, D: int, seed: int) -> torch.Tensor:
    """Anisotropic Gaussian activations scaled so E‖x‖² = 1 (the recipe's normalisation)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g) * torch.linspace(0.2, 2.0, D) + 0.3 * torch.randn(D, generator=g)
    return x / x.pow(2).sum(1).mean().sqrt()


def calibrated_init(D: int, F: int, x: torch.Tensor, target_l0: float, seed: int) -> dict[str, torch.Tensor]:
    """Gemma Scope's initialisation, with θ (one value) set so the batch's L0 ≈ target_l0."""
    from saescope.sae.base import SAEConfig
    from saescope.sae.jumprelu import JumpReLUSAE

    torch.manual_seed(seed)
    sae = JumpReLUSAE(SAEConfig(d_in=D, d_sae=F, bandwidth=BANDWIDTH))
    with torch.no_grad():
        pre = sae.pre_activations(x[:512]).flatten()
        k = max(1, int(pre.numel() * (1 - target_l0 / F)))
        sae.threshold.fill_(float(pre.kthvalue(k).values))
    return {n: p.detach().clone() for n, p in sae.named_parameters()}


#: Adam's implementation: "fused" (one kernel per step) or "default" (what torch.optim.Adam picks)
ADAM = {"fused": True}


def build(init: dict[str, torch.Tensor], path: str):
    from saescope.sae.base import SAEConfig
    from saescope.sae.jumprelu import JumpReLUSAE

    D, F = init["W_enc"].shape
    sae = JumpReLUSAE(SAEConfig(d_in=D, d_sae=F, bandwidth=BANDWIDTH), step_path=path)
    with torch.no_grad():
        for n, p in sae.named_parameters():
            p.copy_(init[n])
    fused = {"fused": True} if ADAM["fused"] else {}
    return sae, torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.0, 0.999), eps=1e-8, **fused)


def train_step(sae, opt, x: torch.Tensor, dtype: str):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = sae.loss(x, LAMBDA)
    opt.zero_grad(set_to_none=True)
    out.total.backward()
    sae.remove_parallel_decoder_grad_()
    opt.step()
    sae.normalize_decoder_()
    sae.clamp_threshold_()
    return out


def time_saescope(init, x, path: str, dtype: str, steps: int, warmup: int) -> dict:
    """Median step time; and, load-robust, the median over steps of (five fp32 B×D @ D×F
    products timed just before the step) / (the step): the fraction of the dense bound."""
    sae, opt = build(init, path)
    D, F = init["W_enc"].shape
    W, out = torch.randn(D, F), torch.empty(x.shape[0], F)
    for _ in range(warmup):
        train_step(sae, opt, x, dtype)
    times, ratios, l0 = [], [], 0.0
    for _ in range(steps):
        start = time.perf_counter()
        torch.mm(x, W, out=out)
        reference = time.perf_counter() - start
        start = time.perf_counter()
        l0 += float(train_step(sae, opt, x, dtype).l0)
        times.append(time.perf_counter() - start)
        ratios.append(5 * reference / times[-1])
    seconds = float(np.median(times))  # the median step: robust to a busy machine's hiccups
    return {"tokens_per_s": x.shape[0] / seconds, "s_per_step": seconds, "l0": l0 / steps,
            "bound_fraction_adjacent": float(np.median(ratios))}


# --- SAELens, in its own interpreter --------------------------------------------------------


def saelens_worker(args) -> None:
    """Runs under the SAELens environment: time its JumpReLU training step on our data."""
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    torch.set_num_threads(args.threads)
    data = np.load(args.saelens_worker, allow_pickle=False)
    x = torch.from_numpy(data["x"])
    D, F = data["W_enc"].shape
    saes, opts = [], []
    for _ in range(args.n_saes):
        cfg = JumpReLUTrainingSAEConfig(d_in=D, d_sae=F, dtype="float32", device="cpu",
                                        jumprelu_bandwidth=BANDWIDTH, jumprelu_init_threshold=0.001, l0_coefficient=LAMBDA)
        sae = JumpReLUTrainingSAE(cfg)
        with torch.no_grad():
            for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
                getattr(sae, name).copy_(torch.from_numpy(data[name]))
        saes.append(sae)
        opts.append(torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.0, 0.999)))
    since_fired = [torch.zeros(F) for _ in saes]

    def step(i: int, n: int):  # mirrors SAETrainer._train_step (sae_lens 6.x)
        sae, opt = saes[i], opts[i]
        sae.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"l0": LAMBDA},
                                                           dead_neuron_mask=since_fired[i] > 1000,
                                                           n_training_steps=n, is_logging_step=False))
            with torch.no_grad():
                did_fire = out.feature_acts.bool().float().sum(-2).bool()
                since_fired[i] += 1
                since_fired[i][did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        return out

    for n in range(args.warmup):
        for i in range(len(saes)):
            step(i, n)
    times, l0 = [], 0.0
    for n in range(args.steps):
        start = time.perf_counter()
        for i in range(len(saes)):
            out = step(i, n)
        l0 += float((out.feature_acts > 0).float().sum(-1).mean())
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    print(json.dumps({"tokens_per_s": x.shape[0] / seconds, "s_per_step": seconds, "l0": l0 / args.steps,
                      "peak_rss_gib": peak_rss_gib()}))


def time_saelens(python: str, init, x, dtype: str, steps: int, warmup: int, threads: int, n_saes: int = 1) -> dict | str:
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "init.npz"
        np.savez(file, x=x.numpy(), **{n: t.numpy() for n, t in init.items()})
        cmd = [python, __file__, "--saelens-worker", str(file), "--dtype", dtype, "--steps", str(steps),
               "--warmup", str(warmup), "--threads", str(threads), "--n-saes", str(n_saes)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- many SAEs on shared batches, in a fresh process (its own peak memory) -------------------


def multi_worker(args) -> None:
    torch.set_num_threads(args.threads)
    x = synthetic_batch(args.batch, args.d_in, seed=0)
    trainers = [build(calibrated_init(args.d_in, args.multi_width, x, args.target_l0[0], seed=i), "auto") for i in range(args.n_saes)]
    for sae, opt in trainers:  # warm-up round
        train_step(sae, opt, x, args.dtype)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        for sae, opt in trainers:
            train_step(sae, opt, x, args.dtype)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    print(json.dumps({"rounds_per_s": 1 / seconds, "batch_tokens_per_s": args.batch / seconds,
                      "sae_tokens_per_s": args.batch * args.n_saes / seconds, "peak_rss_gib": peak_rss_gib()}))


def run_multi(args, dtype: str) -> dict | str:
    cmd = [sys.executable, __file__, "--multi-worker", "--n-saes", str(args.multi), "--multi-width", str(args.multi_width),
           "--dtype", dtype, "--steps", str(args.multi_rounds), "--threads", str(args.threads), "--batch", str(args.batch),
           "--d-in", str(args.d_in), "--target-l0", str(args.target_l0[0]), "--adam", args.adam]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--d-in", type=int, default=640)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--target-l0", type=float, nargs="+", default=[75.0],
                   help="L0s to calibrate to (several: a sweep showing where the sparse path pays; SAELens runs at the first)")
    p.add_argument("--configs", nargs="+", default=["dense/fp32", "auto/fp32", "dense/bf16", "auto/bf16"],
                   help="path/dtype pairs to time (paths: dense, sparse, auto)")
    default_peer = "/tmp/saelens/bin/python" if Path("/tmp/saelens/bin/python").exists() else ""
    p.add_argument("--saelens-python", default=default_peer, help="interpreter with sae-lens installed ('' to skip)")
    p.add_argument("--multi", type=int, default=54, help="SAEs fed from shared batches (0 to skip)")
    p.add_argument("--multi-width", type=int, default=4096)
    p.add_argument("--multi-rounds", type=int, default=2)
    p.add_argument("--multi-saelens", action="store_true", help="also time SAELens on the many-SAE setting")
    p.add_argument("--adam", choices=["fused", "default"], default="fused",
                   help="saescope's Adam: fused=True (~4x faster step on CPU) or torch's default implementation")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script")
    p.add_argument("--json", type=Path, help="also write the results here")
    # internal: worker modes
    p.add_argument("--saelens-worker", help=argparse.SUPPRESS)
    p.add_argument("--multi-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n-saes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    ADAM["fused"] = args.adam == "fused"
    if args.saelens_worker:
        return saelens_worker(args)
    if args.multi_worker:
        return multi_worker(args)
    if args.quick:
        args.widths, args.d_in, args.batch, args.steps, args.warmup = [1024, 4096], 128, 1024, 2, 1
        args.multi, args.multi_width, args.multi_rounds = 4, 1024, 1

    torch.set_num_threads(args.threads)
    B, D = args.batch, args.d_in
    results: dict = {"threads": args.threads, "d_in": D, "batch": B, "target_l0": args.target_l0, "widths": {}}
    print(f"torch {torch.__version__}, {args.threads} threads, d_in {D}, batch {B}, target L0 {args.target_l0}, "
          f"{args.adam} Adam (SAELens: its trainer's Adam)")
    x = synthetic_batch(B, D, seed=0)
    for F in args.widths:
        fp32_rate = matmul_rate(B, D, F, torch.float32)
        bf16_rate = matmul_rate(B, D, F, torch.bfloat16)
        bound = fp32_rate / (10 * D * F)
        row = {"fp32_gflops": fp32_rate / 1e9, "bf16_gflops": bf16_rate / 1e9, "dense_bound_tokens_per_s": bound}
        print(f"\nwidth {F}: matmul {fp32_rate / 1e9:.0f} GFLOP/s fp32, {bf16_rate / 1e9:.0f} bf16 → dense bound {bound:,.0f} tokens/s")
        for target_l0 in args.target_l0:
            init = calibrated_init(D, F, x, target_l0, seed=0)
            suffix = "" if target_l0 == args.target_l0[0] else f" L0={target_l0:g}"
            for config in args.configs:
                path, dtype = config.split("/")
                r = time_saescope(init, x, path, dtype, args.steps, args.warmup)
                row[f"saescope {config}{suffix}"] = r
                print(f"  saescope {config:11s} {r['tokens_per_s']:9,.0f} tokens/s  {r['tokens_per_s'] / bound:5.2f}× bound  "
                      f"({r['bound_fraction_adjacent']:.2f}× against products timed beside each step; "
                      f"{r['s_per_step']:.3f} s/step, L0 {r['l0']:.0f})")
        init = calibrated_init(D, F, x, args.target_l0[0], seed=0)
        if args.saelens_python:
            for dtype in ("fp32", "bf16"):
                r = time_saelens(args.saelens_python, init, x, dtype, args.steps, args.warmup, args.threads)
                row[f"saelens {dtype}"] = r
                if isinstance(r, str):
                    print(f"  sae-lens {dtype}: {r}")
                    continue
                best = max((v["tokens_per_s"] for k, v in row.items() if k.startswith("saescope") and k.endswith(dtype)), default=0)
                # (keys of the first L0 end with the dtype; sweep entries carry an "L0=" suffix)
                print(f"  sae-lens {dtype:16s} {r['tokens_per_s']:9,.0f} tokens/s  {r['tokens_per_s'] / bound:5.2f}× bound  "
                      f"(L0 {r['l0']:.0f}); saescope's best {dtype} is {best / r['tokens_per_s']:.2f}× it")
        else:
            print("  sae-lens: skipped (no --saelens-python)")
        results["widths"][F] = row

    if args.multi:
        print(f"\n{args.multi} SAEs of width {args.multi_width}, one shared batch of {B} per round (fresh process each):")
        for dtype in ("fp32", "bf16"):
            r = run_multi(args, dtype)
            results[f"multi {dtype}"] = r
            if isinstance(r, str):
                print(f"  saescope {dtype}: {r}")
                continue
            print(f"  saescope {dtype}: {r['batch_tokens_per_s']:,.0f} batch tokens/s = {r['sae_tokens_per_s']:,.0f} "
                  f"SAE-tokens/s, peak RSS {r['peak_rss_gib']:.2f} GiB")
            if args.multi_saelens and args.saelens_python:
                x_multi = synthetic_batch(B, D, seed=0)
                init = calibrated_init(D, args.multi_width, x_multi, args.target_l0[0], seed=0)
                s = time_saelens(args.saelens_python, init, x_multi, dtype, args.multi_rounds, 1, args.threads, n_saes=args.multi)
                results[f"multi saelens {dtype}"] = s
                if isinstance(s, str):
                    print(f"  sae-lens {dtype}: {s}")
                else:
                    print(f"  sae-lens {dtype}: {B / s['s_per_step']:,.0f} batch tokens/s, peak RSS {s['peak_rss_gib']:.2f} GiB "
                          f"→ saescope {r['batch_tokens_per_s'] * s['s_per_step'] / B:.2f}×")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
