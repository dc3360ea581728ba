"""Train a SAELens SAE (JumpReLU or TopK) on stored activations, with SAELens's own defaults.

Runs in the SAELens virtual environment (``bash scripts/peer-envs.sh``)::

    /work/peers/saelens/bin/python benchmarks/peers/train_saelens.py --acts ACTS.npy \
        --arch {jumprelu,topk} --width 2048 --k 50 [--l0-coefficient L] \
        --batch-size 4096 --tokens 262144 --out OUT.npz [--seed 0] [--threads 2]

``ACTS.npy`` is a float32 (N, d_in) array whose rows are already shuffled (see dump_acts.py); its
first ``--tokens`` rows are fed in order, batch after batch, to SAELens's ``SAETrainer`` through
a plain iterator of tensors.  Everything else is SAELens's default (``SAETrainerConfig`` and the
``*TrainingSAEConfig`` of the architecture): optimiser, learning rate and schedule, init,
normalisation, auxiliary loss, JumpReLU threshold init and bandwidth.  Only the width, k (TopK),
the L0 coefficient (JumpReLU, SAELens default 1.0), batch size and token count are set here.

The trained SAE is saved with SAELens's ``save_inference_model`` and reloaded with
``SAE.load_from_disk`` (the inference SAE a SAELens user gets); its weights are then converted
to saescope's release convention acting on raw activations and written to ``OUT.npz``::

    pre = x @ W_enc + b_enc                        (W_enc: d_in x F)
    TopK:    f = the k largest of relu(pre) per token, zero elsewhere
    JumpReLU f = relu(pre) * 1[pre > threshold]
    x_hat = f @ W_dec + b_dec                      (W_dec: F x d_in)

with entries ``architecture``, ``k`` (topk), ``seconds`` (training wall time), ``tokens``,
``steps``, and provenance (``library``, ``library_version``, ``config``, ``train_fvu``,
``train_l0``).  The script checks the conversion on 1,024 rows against SAELens's own
encode/decode and prints it, with the train-set FVU (about the mean) and L0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

LIBRARY = "sae_lens"


# ---------------------------------------------------------------- shared with train_sparsify.py
# (each script runs in its own virtual environment, so the helpers are repeated there)


def parse_args(argv: list[str] | None, *, archs: tuple[str, ...]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--acts", required=True, help="float32 .npy (N, d_in), rows already shuffled")
    p.add_argument("--arch", required=True, choices=archs)
    p.add_argument("--width", type=int, default=2048, help="number of latents F")
    p.add_argument("--k", type=int, default=50, help="active latents per token (topk)")
    p.add_argument("--l0-coefficient", type=float, default=None,
                   help="JumpReLU L0 coefficient lambda (default: the peer's own default)")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=262144, help="training tokens (whole batches)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def open_acts(path: str, tokens: int, batch_size: int) -> tuple[np.ndarray, int]:
    """The activation array (memory-mapped) and the number of whole training steps."""
    acts = np.load(path, mmap_mode="r")
    if acts.ndim != 2 or acts.dtype != np.float32:
        raise SystemExit(f"{path}: expected a float32 (N, d_in) array, got {acts.dtype} {acts.shape}")
    steps = tokens // batch_size
    if steps < 1:
        raise SystemExit(f"--tokens {tokens} is less than one batch of {batch_size}")
    if steps * batch_size > acts.shape[0]:
        raise SystemExit(f"{path} has {acts.shape[0]} rows, fewer than --tokens {steps * batch_size}")
    if steps * batch_size != tokens:
        print(f"note: --tokens {tokens} is not a multiple of the batch; training on {steps * batch_size}")
    return acts, steps


def batches(acts: np.ndarray, batch_size: int, steps: int):
    """The first ``steps`` batches of rows, in order, as float32 CPU tensors."""
    for i in range(steps):
        yield torch.from_numpy(np.array(acts[i * batch_size : (i + 1) * batch_size]))


def npz_encode(p: dict[str, torch.Tensor], x: torch.Tensor, arch: str, k: int) -> torch.Tensor:
    """saescope's release convention, on raw activations."""
    pre = x @ p["W_enc"] + p["b_enc"]
    if arch == "jumprelu":
        return torch.relu(pre) * (pre > p["threshold"])
    vals, idx = torch.relu(pre).topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, idx, vals)


def npz_decode(p: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    return f @ p["W_dec"] + p["b_dec"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_fold(p, arch, k, x, f_peer, xhat_peer, tol=1e-4) -> bool:
    """The npz formula, evaluated in float64 on the stored float32 arrays, against the peer's own
    float32 forward.  (Evaluated in float32 the raw-activation formula itself loses precision
    where the activations have a large mean, e.g. Gemma's resid_post: x @ W_enc and b_enc nearly
    cancel; that error is printed too but is not the fold's.)"""
    res = {}
    for name, dt in (("float64", torch.float64), ("float32", torch.float32)):
        q = {n: t.to(dt) for n, t in p.items()}
        f = npz_encode(q, x.to(dt), arch, k)
        res[name] = (rel(f, f_peer), rel(npz_decode(q, f), xhat_peer),
                     float(((f != 0).sum(-1) != (f_peer != 0).sum(-1)).float().mean()))
    ef, ex, l0_diff = res["float64"]
    ok = ef < tol and ex < tol
    print(f"fold check on {x.shape[0]} rows, npz formula in float64 vs the peer's encode/decode: "
          f"rel|f - f_peer| = {ef:.2e}, rel|x_hat - x_hat_peer| = {ex:.2e}, rows with another L0: "
          f"{l0_diff:.4f} -> {'OK' if ok else 'FAILED'} (tolerance {tol:g}); npz formula in float32: "
          f"{res['float32'][0]:.2e}, {res['float32'][1]:.2e}, {res['float32'][2]:.4f}")
    return ok


@torch.no_grad()
def train_metrics(p, arch, k, acts, rows, chunk=8192) -> tuple[float, float]:
    """FVU about the mean and mean L0 of the npz SAE over the first ``rows`` training rows
    (computed in float64; see check_fold)."""
    q = {n: t.double() for n, t in p.items()}
    s1 = torch.zeros(acts.shape[1], dtype=torch.float64)
    s2 = err = l0 = 0.0
    for a in range(0, rows, chunk):
        x = torch.from_numpy(np.array(acts[a : min(rows, a + chunk)])).double()
        f = npz_encode(q, x, arch, k)
        err += float((npz_decode(q, f) - x).pow(2).sum())
        l0 += float((f != 0).sum())
        s1 += x.sum(0)
        s2 += float(x.pow(2).sum())
    total = s2 - float(s1.pow(2).sum()) / rows
    return err / total, l0 / rows


def write_npz(out: str, p: dict[str, torch.Tensor], *, arch: str, k: int, **extra) -> None:
    arrays = {name: t.detach().to(torch.float32).contiguous().numpy() for name, t in p.items()}
    arrays["architecture"] = np.array(arch)
    if arch == "topk":
        arrays["k"] = np.array(k, dtype=np.int64)
    for name, v in extra.items():
        arrays[name] = np.array(v)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(Path(out).name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(out)


# ---------------------------------------------------------------- SAELens


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, archs=("jumprelu", "topk"))
    torch.set_num_threads(args.threads)
    acts, steps = open_acts(args.acts, args.tokens, args.batch_size)
    d_in = acts.shape[1]

    os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's progress bars
    import sae_lens
    from sae_lens import (
        SAE,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        LoggingConfig,
        SAETrainer,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.arch == "jumprelu":
        cfg_kw = {} if args.l0_coefficient is None else {"l0_coefficient": args.l0_coefficient}
        sae_cfg = JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=args.width, **cfg_kw)
        sae = JumpReLUTrainingSAE(sae_cfg)
    else:
        if args.l0_coefficient is not None:
            print("note: --l0-coefficient is ignored for topk")
        sae_cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=args.width, k=args.k)
        sae = TopKTrainingSAE(sae_cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * args.batch_size,
        train_batch_size_samples=args.batch_size,
        logger=LoggingConfig(log_to_wandb=False),
    )
    # SAETrainer asserts lr_end is set; LanguageModelSAERunnerConfig.__post_init__ sets it to lr / 10
    # (used only by the cosine schedules; the default schedule is constant).
    trainer_cfg.lr_end = trainer_cfg.lr / 10
    config = {"sae": {k: v for k, v in sae_cfg.to_dict().items() if k != "metadata"},
              "trainer": {k: v for k, v in vars(trainer_cfg).items() if k != "logger"}}
    print(f"SAELens {sae_lens.__version__}: {type(sae).__name__} d_in={d_in} d_sae={args.width}, "
          f"{steps} steps x {args.batch_size}; lr={trainer_cfg.lr} ({trainer_cfg.lr_scheduler_name}), "
          f"Adam betas=({trainer_cfg.adam_beta1}, {trainer_cfg.adam_beta2}), "
          f"normalize_activations={sae_cfg.normalize_activations!r}"
          + (f", l0_coefficient={sae_cfg.l0_coefficient}, threshold0={sae_cfg.jumprelu_init_threshold}, "
             f"bandwidth={sae_cfg.jumprelu_bandwidth}" if args.arch == "jumprelu" else f", k={args.k}"),
          flush=True)

    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches(acts, args.batch_size, steps))
    t0 = time.perf_counter()
    trained = trainer.fit()
    seconds = time.perf_counter() - t0
    print(f"trained {trainer.n_training_steps} steps, {trainer.n_training_samples} tokens in {seconds:.1f} s "
          f"({trainer.n_training_samples / seconds:,.0f} tokens/s)", flush=True)

    # The SAE a SAELens user gets: saved for inference, loaded back.
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_inference_model(tmp)
        inf = SAE.load_from_disk(tmp, device="cpu")
    inf.eval()
    c = inf.cfg
    if c.normalize_activations != "none":
        raise SystemExit(f"cannot fold normalize_activations={c.normalize_activations!r} exactly")
    if c.reshape_activations != "none":
        raise SystemExit(f"unexpected reshape_activations={c.reshape_activations!r}")

    with torch.no_grad():
        W_enc = inf.W_enc.detach().clone()  # (d_in, F)
        b_enc = inf.b_enc.detach().clone()
        W_dec = inf.W_dec.detach().clone()  # (F, d_in)
        b_dec = inf.b_dec.detach().clone()
        if c.apply_b_dec_to_input:  # SAELens encodes (x - b_dec)
            b_enc = b_enc - b_dec @ W_enc
        if getattr(c, "rescale_acts_by_decoder_norm", False):
            # TopK selects on pre * |W_dec| and decodes (f / |W_dec|) @ W_dec: fold the norms.
            n = inf.W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
        p = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
        if args.arch == "jumprelu":
            p["threshold"] = inf.threshold.detach().clone().float()

        x = torch.from_numpy(np.array(acts[:1024]))
        f_peer = inf.encode(x)
        f_peer = f_peer.to_dense() if f_peer.is_sparse else f_peer
        xhat_peer = inf.decode(f_peer)
        ok = check_fold(p, args.arch, args.k, x, f_peer, xhat_peer)

    fvu, l0 = train_metrics(p, args.arch, args.k, acts, steps * args.batch_size)
    print(f"train FVU {fvu:.4f}  L0 {l0:.1f}  ({args.arch}, {LIBRARY}, {Path(args.acts).name})")
    write_npz(args.out, p, arch=args.arch, k=args.k, seconds=seconds, tokens=steps * args.batch_size,
              steps=steps, library=LIBRARY, library_version=sae_lens.__version__,
              config=json.dumps(config, default=str), train_fvu=fvu, train_l0=l0, seed=args.seed)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
