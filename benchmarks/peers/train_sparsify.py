"""Train an EleutherAI sparsify TopK SAE on stored activations, with sparsify's own defaults.

Runs in the sparsify virtual environment (``bash scripts/peer-envs.sh``)::

    /work/peers/sparsify/bin/python benchmarks/peers/train_sparsify.py --acts ACTS.npy \
        --arch topk --width 2048 --k 50 --batch-size 4096 --tokens 262144 --out OUT.npz \
        [--seed 0] [--threads 2]

sparsify trains inside forward hooks of a language model, so the activations are served by a
stand-in "model": its input ids are row numbers of ``ACTS.npy`` (one token per sequence) and its
one hooked submodule outputs those rows.  sparsify's own ``Trainer`` (``TrainConfig`` defaults
otherwise: its signum + schedule-free optimiser and learning-rate rule, b_dec set to the first
batch's mean, unit-norm decoder with the parallel gradient removed, FVU loss, no AuxK) then
trains a ``SparseCoder`` on the first ``--tokens`` rows, in order, batch after batch.  Only the
width (``num_latents``), k, batch size and token count are set here.

The SAE sparsify saves at the end of ``fit`` (with the schedule-free optimiser in eval mode,
i.e. the averaged weights) is loaded with ``SparseCoder.load_from_disk`` and converted to
saescope's release convention acting on raw activations (``OUT.npz``)::

    pre = x @ W_enc + b_enc,  f = the k largest of relu(pre),  x_hat = f @ W_dec + b_dec

where sparsify's encoder on (x - b_dec) is folded into b_enc.  The conversion is checked on
1,024 rows against sparsify's own encode/decode and printed with the train-set FVU (about the
mean) and L0.  sparsify has no JumpReLU.
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

LIBRARY = "sparsify"


sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import parse_args, open_acts, batches, npz_encode, npz_decode, rel, check_fold, train_metrics, write_npz  # noqa: E402



# ---------------------------------------------------------------- sparsify


class StoredActivations(torch.nn.Module):
    """A stand-in for a language model: ``input_ids`` (B, 1) are row numbers of the activation
    array, and the submodule ``acts`` (the hookpoint) outputs those rows as (B, 1, d_in)."""

    def __init__(self, acts: np.ndarray):
        super().__init__()
        self.rows = acts
        self.acts = torch.nn.Identity()
        self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    @property
    def base_model(self) -> torch.nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids: torch.Tensor, **_):
        ids = input_ids.flatten().numpy()
        a, b = int(ids.min()), int(ids.max()) + 1
        if b - a == ids.size and (np.diff(ids) == 1).all():  # a batch of consecutive rows
            x = np.array(self.rows[a:b])
        else:
            x = np.array(self.rows[ids])
        return self.acts(torch.from_numpy(x).reshape(*input_ids.shape, -1))


class RowIds(torch.utils.data.Dataset):
    """Rows 0..n-1, one single-token "sequence" each: ``{"input_ids": tensor([row])}``."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([i])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, archs=("topk",))
    if args.l0_coefficient is not None:
        print("note: --l0-coefficient is ignored for topk")
    torch.set_num_threads(args.threads)
    acts, steps = open_acts(args.acts, args.tokens, args.batch_size)
    d_in = acts.shape[1]

    os.environ.setdefault("TQDM_DISABLE", "1")
    import sparsify
    from sparsify import SaeConfig, SparseCoder, TrainConfig, Trainer

    model = StoredActivations(acts)
    with tempfile.TemporaryDirectory() as save_dir:
        cfg = TrainConfig(
            SaeConfig(num_latents=args.width, k=args.k),
            batch_size=args.batch_size,  # "sequences" of one token each
            hookpoints=["acts"],
            init_seeds=[args.seed],
            log_to_wandb=False,
            save_dir=save_dir,
            run_name="run",
        )
        config = cfg.to_dict()
        lr = cfg.lr or 5e-3 / (args.width / 2**14) ** 0.5  # the signum default in Trainer.__init__
        print(f"sparsify {sparsify.__version__}: SparseCoder d_in={d_in} num_latents={args.width} k={args.k}, "
              f"{steps} steps x {args.batch_size}; optimizer={cfg.optimizer} lr={lr:.3g}"
              f"{' (auto: 5e-3 / sqrt(F / 2^14))' if cfg.lr is None else ''}, "
              f"auxk_alpha={cfg.auxk_alpha}, normalize_decoder={cfg.sae.normalize_decoder}", flush=True)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, RowIds(steps * args.batch_size), model)
        trainer.fit()
        seconds = time.perf_counter() - t0
        print(f"trained {trainer.global_step} steps, {steps * args.batch_size} tokens in {seconds:.1f} s "
              f"({steps * args.batch_size / seconds:,.0f} tokens/s)", flush=True)
        # What sparsify saves (and a user loads): the schedule-free eval-mode weights.
        sae = SparseCoder.load_from_disk(Path(save_dir) / "run" / "acts")
    sae.eval()
    if sae.cfg.transcode or sae.W_skip is not None or sae.cfg.activation != "topk":
        raise SystemExit("only plain TopK autoencoders are converted")

    with torch.no_grad():
        W_enc = sae.encoder.weight.detach().T.contiguous()  # (d_in, F)
        b_dec = sae.b_dec.detach().clone()
        b_enc = sae.encoder.bias.detach() - b_dec @ W_enc  # sparsify encodes (x - b_dec)
        W_dec = sae.W_dec.detach().clone()  # (F, d_in)
        p = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}

        x = torch.from_numpy(np.array(acts[:1024]))
        top_acts, top_idx, _ = sae.encode(x)
        f_peer = torch.zeros(x.shape[0], args.width).scatter_(-1, top_idx, top_acts)
        xhat_peer = sae.decode(top_acts, top_idx)
        ok = check_fold(p, "topk", args.k, x, f_peer, xhat_peer)

    fvu, l0 = train_metrics(p, "topk", args.k, acts, steps * args.batch_size)
    print(f"train FVU {fvu:.4f}  L0 {l0:.1f}  (topk, {LIBRARY}, {Path(args.acts).name})")
    write_npz(args.out, p, arch="topk", k=args.k, seconds=seconds, tokens=steps * args.batch_size,
              steps=steps, library=LIBRARY, library_version=sparsify.__version__,
              config=json.dumps({**config, "lr_used": lr}, default=str), train_fvu=fvu, train_l0=l0,
              seed=args.seed)
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
