"""A least-squares refit of a trained SAE's decoder to its own codes (``Recipe.refit_tokens``).

Why: a run of a few hundred Adam steps ends with a decoder that is not the best one for the
codes its encoder gives. With the encoder (and so every latent's firing) held fixed, the best
decoder is a linear least-squares problem: W_dec, b_dec = argmin Σ_t ‖x_t − f_t·W_dec − b_dec‖².
Its solution does not depend on the input map the SAE was trained behind: for any invertible
metric G, Fᵀ(X − F·W)·G = 0 holds exactly where Fᵀ(X − F·W) = 0 does, so the refit is the best
decoder under the Fisher map's loss as much as under the raw MSE. docs/fidelity.md has the
measurements.

The refit works in training form (normalised units): the codes are the SAE's inference code
(:meth:`encode`: JumpReLU, or BatchTopK's calibrated threshold), b_enc absorbs the change of b_dec
that a centring encoder subtracts, and each latent is then rescaled to a unit-norm decoder row
(exact: JumpReLU-style gates are per latent), so the release folds it as any other SAE.
"""

from __future__ import annotations

import math

import torch

from saescope.sae.base import SAE
from saescope.sae.input_norm import rescale_latents_
from saescope.settings import PAIR_KINDS

#: the architectures whose codes the refit keeps unchanged (per-latent gates; no nested prefixes)
REFITTABLE = ("jumprelu", "batchtopk")
#: the relative ridge of :meth:`RefitStats.solve` (docs/fidelity.md: the refit, measured)
REFIT_RIDGE = 1e-3


def check_refittable(specs, recipe, plan) -> None:
    """Refuse, before any step, a refit the run cannot do (nothing to check without one)."""
    if not recipe.refit_tokens:
        return
    if plan.rows_divisor != 1 or plan.reduce_grads is not None or plan.build_sae is not None:
        raise ValueError("refit_tokens refits whole SAEs on whole batches: train in one process or with "
                         "--parallel site, or set --refit-tokens 0")
    bad = sorted({s.architecture for s in specs if s.site.kind not in PAIR_KINDS
                  and (s.architecture not in REFITTABLE or s.prefixes)})
    if bad:
        raise ValueError(f"refit_tokens keeps each latent's firing fixed, which needs per-latent gates: "
                         f"{', '.join(bad)} SAEs cannot take it; use jumprelu or batchtopk, or --refit-tokens 0")


class RefitStats:
    """Σ f₁ᵀf₁ and Σ f₁ᵀx over the tokens seen (f₁ = [f, 1]), in float64, for one SAE."""

    def __init__(self, d_sae: int, d_in: int):
        self.ff = torch.zeros(d_sae + 1, d_sae + 1, dtype=torch.float64)
        self.fx = torch.zeros(d_sae + 1, d_in, dtype=torch.float64)
        self.sum_sq = 0.0
        self.n_tokens = 0

    @torch.no_grad()
    def add(self, sae: SAE, x_BD: torch.Tensor) -> None:
        """Add a batch of training-form inputs (what the SAE saw in training)."""
        f_BF = sae.encode(x_BD).float()
        f1_BF = torch.cat([f_BF, f_BF.new_ones(len(f_BF), 1)], 1)
        self.ff += (f1_BF.T @ f1_BF).double().cpu()
        self.fx += (f1_BF.T @ x_BD.float()).double().cpu()
        self.sum_sq += float(x_BD.double().square().sum())
        self.n_tokens += len(x_BD)

    def mse_of(self, W_dec_FD: torch.Tensor, b_dec_D: torch.Tensor) -> float:
        """Σ‖x − f·W − b‖² / n for a decoder, from the statistics alone (no second pass)."""
        W1 = torch.cat([W_dec_FD, b_dec_D[None]]).detach().double().cpu()
        return (self.sum_sq - 2 * float((W1 * self.fx).sum()) + float((W1 * (self.ff @ W1)).sum())) / self.n_tokens

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_dec_FD, b_dec_D)`` minimising the squared error plus ``ridge`` × each latent's own
        Σf² × ‖its row‖² (a relative ridge: a latent that fires rarely is held near zero rather
        than fitted to its few tokens)."""
        diag = self.ff.diagonal().clone()
        diag[-1] = 0.0  # b_dec is not shrunk
        A = self.ff + torch.diag(ridge * diag + 1e-12 * float(diag.max().clamp_min(1.0)))
        A[-1, -1] += 1e-12  # no token at all: still solvable
        solution = torch.linalg.solve(A, self.fx)
        return solution[:-1].float(), solution[-1].float()


@torch.no_grad()
def refit_decoder_(sae: SAE, stats: RefitStats, ridge: float) -> dict[str, float]:
    """Replace ``sae``'s decoder by :meth:`RefitStats.solve`'s, keeping every code (in place);
    returns the training-form MSE on the refit tokens before and after."""
    if sae.architecture not in REFITTABLE or getattr(sae.cfg, "prefixes", None):
        raise ValueError(f"the decoder refit keeps per-latent gates fixed; {sae.architecture} SAEs cannot take it")
    before = stats.mse_of(sae.W_dec, sae.b_dec)
    W_FD, b_D = stats.solve(ridge)
    W_FD, b_D = W_FD.to(sae.W_dec), b_D.to(sae.W_dec)
    silent_F = (stats.ff.diagonal()[:-1] == 0).to(W_FD.device)
    W_FD[silent_F] = sae.W_dec[silent_F]  # never fired on these tokens: any row fits; keep the trained one
    after = stats.mse_of(W_FD, b_D)
    if sae.cfg.centre_input:  # π = (x − b_dec)·W_enc + b_enc: keep every π as it was
        sae.b_enc.add_((b_D - sae.b_dec) @ sae.W_enc)
    sae.W_dec.copy_(W_FD)
    sae.b_dec.copy_(b_D)
    rescale_latents_(sae, None)  # unit-norm rows again; W_enc, b_enc and θ take the factor
    return {"refit_mse_before": before, "refit_mse_after": after, "refit_tokens": stats.n_tokens}


def refit_trainers(trainers, source, recipe, seed: int, log, progress: bool = False) -> None:
    """``Recipe.refit_tokens`` (0: nothing): every live SAE trainer's decoder refit to its own
    codes on the run's first batches, read again from ``source`` (its figures go to
    ``trainer.refit``, which :meth:`SAETrainer.final_metrics` reports, and to the log)."""
    from tqdm.auto import tqdm

    todo = [t for t in trainers if t.error is None and not t.sae.is_transcoder]
    if not recipe.refit_tokens or not todo:
        return
    B = recipe.batch_size
    n_batches = max(1, math.ceil(recipe.refit_tokens / B))
    stats = {t.name: RefitStats(t.sae.cfg.d_sae, t.sae.cfg.d_in) for t in todo}
    batches = source.iter_batches(B, seed=seed, skip_batches=0)
    for _ in tqdm(range(n_batches), desc=f"refitting {len(todo)} decoders", unit="batch", disable=not progress):
        batch = next(batches, None)
        if batch is None:  # a source shorter than refit_tokens: refit on all of it
            break
        for t in todo:
            stats[t.name].add(t.sae, t.training_input(batch[t.site]))
    for t in todo:
        t.refit = refit_decoder_(t.sae, stats[t.name], REFIT_RIDGE)
        log.write({"step": t.n_steps, "event": "refit", "sae": t.name, "site": str(t.site), **t.refit})
