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


sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import parse_args, open_acts, batches, npz_encode, npz_decode, rel, check_fold, train_metrics, write_npz  # noqa: E402



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
