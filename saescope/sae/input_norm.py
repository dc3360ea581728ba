"""The fixed affine map an SAE is trained behind, and how it folds into the released weights.

SAEs train on ``x_n = (x − shift_D) ⊙ gain_D`` and predict ``x̂_n``; the release must act on raw
activations (Gemma Scope's files).  Two modes (``Recipe.input_norm``):

* ``"scalar"`` — the paper's: shift 0, gain 1/C with E‖x/C‖² = 1 (Gemma Scope §3.1).
* ``"centred"`` — shift = the data mean, gain 1/C′ with E‖x − mean‖²/C′² = 1: the scalar map
  about the mean.  Where the mean is large (Gemma 3's massive dimensions), the paper's C is
  mostly the mean's norm and squeezes the variance the SAE must explain into a small share of
  its unit budget.
* ``"diagonal"`` — per dimension: shift = the data mean, gain_d ∝ σ_d^(−p), scaled so that
  E‖x_n‖² = 1 still (ε, θ₀ and λ keep their meaning).  p = 1 standardises every dimension
  (variance 1/D each); p = 0.5 goes halfway on a log scale, shrinking a dimension 100× the
  typical σ to 10×.  Gemma 3 has a few
  massive dimensions (at layer 6 one holds ~80% of the variance); under the scalar map they
  dominate the MSE and the SAE spends its dictionary on them, while the model's loss depends
  on the error in the ordinary dimensions (docs/fidelity.md has the measurements).

* ``"fisher"`` — a full linear map: shift = the data mean, x_n = (x − mean)·M with M = G^½,
  G = w·F̂ + (1 − w)·Ĝ_diag, where F̂ is the site's Fisher metric (how the model's next-token
  distributions react to a change of the activation: :mod:`saescope.activations.fisher`, plus a
  small ridge) and Ĝ_diag the ``"diagonal"`` map's metric; each part is scaled so that
  E‖x_n‖² = 1.  The SAE's squared error in these units, eᵀ·G·e, then weighs each direction by
  what an error there costs the model's loss, to second order.

Folding is exact (:func:`fold_input_norm`); for architectures whose latents may be rescaled
one by one (JumpReLU, ReLU: positively homogeneous, per-latent gates), the fold then rescales
each latent so every released decoder row has unit norm in raw units — the decoder rule holds
for the released file whatever map was used in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("scalar", "centred", "diagonal", "fisher")
#: the Fisher part's ridge, as a fraction of its mean eigenvalue: keeps M invertible, so every
#: direction still costs something
FISHER_RIDGE = 0.01


@dataclass
class InputNorm:
    """x_n = (x − shift_D) ⊙ gain_D, both (D,) float32 tensors, then ·matrix_DD if there is one
    (mode ``"fisher"``; ``inverse_DD`` is its inverse)."""

    shift_D: torch.Tensor
    gain_D: torch.Tensor
    mode: str = "scalar"
    matrix_DD: torch.Tensor | None = None
    inverse_DD: torch.Tensor | None = None

    def apply(self, x_BD: torch.Tensor) -> torch.Tensor:
        x_n = (x_BD - self.shift_D.to(x_BD.device)) * self.gain_D.to(x_BD.device)
        return x_n if self.matrix_DD is None else x_n @ self.matrix_DD.to(x_BD.device)

    def to_raw(self, delta_BD: torch.Tensor) -> torch.Tensor:
        """A difference of two normalised vectors (an error, a deviation) in raw units."""
        if self.inverse_DD is not None:
            delta_BD = delta_BD @ self.inverse_DD.to(delta_BD.device)
        return delta_BD / self.gain_D.to(delta_BD.device)

    @property
    def is_finite(self) -> bool:
        ok = bool(torch.isfinite(self.shift_D).all() and torch.isfinite(self.gain_D).all() and (self.gain_D > 0).all())
        if self.matrix_DD is not None:
            ok = ok and bool(torch.isfinite(self.matrix_DD).all() and torch.isfinite(self.inverse_DD).all())
        return ok

    @property
    def scalar(self) -> float:
        """C of the scalar map (NaN for other modes): what the paper's configs record."""
        if self.mode != "scalar":
            return math.nan
        return float(1.0 / self.gain_D[0])

    @classmethod
    def from_sums(cls, mode: str, count: float, sum_D: torch.Tensor, sum_sq_D: torch.Tensor,
                  power: float = 1.0) -> InputNorm:
        """The map from streamed float64 sums Σx and Σx² over ``count`` tokens (``power``: the
        exponent p of the diagonal mode)."""
        if mode not in MODES:
            raise ValueError(f"unknown input_norm {mode!r}; use one of {', '.join(MODES)}")
        if mode == "fisher":
            raise ValueError("the 'fisher' map needs the site's Fisher metric and covariance: InputNorm.from_fisher")
        D = sum_D.numel()
        mean_D = sum_D / count
        if mode == "scalar":
            c = math.sqrt(float(sum_sq_D.sum()) / count)
            gain = 1.0 / c if math.isfinite(c) and c > 0 else math.nan
            return cls(torch.zeros(D), torch.full((D,), gain), mode)
        var_D = (sum_sq_D / count - mean_D.square()).clamp_min(0)
        if mode == "centred":
            c = math.sqrt(float(var_D.sum()))
            gain = 1.0 / c if math.isfinite(c) and c > 0 else math.nan
            return cls(mean_D.float(), torch.full((D,), gain), mode)
        # a constant dimension gets the gain of an average one instead of an infinite one
        std_D = var_D.sqrt()
        floor = float(std_D.mean()) * 1e-3
        gain_D = std_D.clamp_min(floor if floor > 0 else 1e-30).pow(-power)
        gain_D = gain_D / (var_D * gain_D.square()).sum().sqrt()  # E‖x_n‖² = 1
        return cls(mean_D.float(), gain_D.float(), mode)

    @classmethod
    def from_fisher(cls, count: float, sum_D: torch.Tensor, sum_sq_D: torch.Tensor, cov_DD: torch.Tensor,
                    fisher_DD: torch.Tensor, *, power: float, weight: float) -> InputNorm:
        """The ``"fisher"`` map from streamed sums (as :meth:`from_sums`), the data's covariance
        ``cov_DD`` and the site's Fisher metric ``fisher_DD``; ``weight`` is w, the Fisher's share."""
        if not 0 <= weight <= 1:
            raise ValueError(f"fisher_weight must lie in [0, 1], got {weight}")
        D = sum_D.numel()
        if cov_DD.shape != (D, D) or fisher_DD.shape != (D, D):
            raise ValueError(f"the Fisher metric and covariance must be ({D}, {D}), got {tuple(fisher_DD.shape)} "
                             f"and {tuple(cov_DD.shape)}")
        diag = cls.from_sums("diagonal", count, sum_D, sum_sq_D, power)
        cov = cov_DD.double()
        G_diag = torch.diag(diag.gain_D.double().square())  # tr(G_diag·Σ) = 1 already
        F = fisher_DD.double()
        F = F + FISHER_RIDGE * float(torch.trace(F)) / D * torch.eye(D, dtype=torch.float64)
        G = (1 - weight) * G_diag + weight * F / (F * cov).sum()  # each part: tr(G·Σ) = 1
        eigenvalues, V = torch.linalg.eigh((G + G.T) / 2)
        eigenvalues = eigenvalues.clamp_min(float(eigenvalues.max()) * 1e-12)
        matrix = (V * eigenvalues.sqrt()) @ V.T
        inverse = (V / eigenvalues.sqrt()) @ V.T
        return cls(diag.shift_D, torch.ones(D), "fisher", matrix.float(), inverse.float())

    @classmethod
    def from_scale(cls, scale: float, d_in: int) -> InputNorm:
        return cls(torch.zeros(d_in), torch.full((d_in,), 1.0 / scale), "scalar")

    def to_dict(self) -> dict:
        """JSON-ready; a ``"fisher"`` map's matrices are not in it (:meth:`matrices`)."""
        if self.mode == "scalar":
            return {"mode": "scalar", "scale": _finite_or_none(self.scalar)}
        return {"mode": self.mode, "shift": self.shift_D.tolist(), "gain": self.gain_D.tolist()}

    def matrices(self) -> dict[str, torch.Tensor]:
        """What :meth:`to_dict` leaves out, for a tensor file (empty for per-dimension maps)."""
        return {} if self.matrix_DD is None else {"matrix": self.matrix_DD, "inverse": self.inverse_DD}

    @classmethod
    def from_dict(cls, d: dict, d_in: int, matrices: dict[str, torch.Tensor] | None = None) -> InputNorm:
        if d.get("mode", "scalar") == "scalar":
            scale = d.get("scale")
            return cls.from_scale(scale if scale is not None else math.nan, d_in)
        norm = cls(torch.tensor(d["shift"], dtype=torch.float32), torch.tensor(d["gain"], dtype=torch.float32), d["mode"])
        if d["mode"] == "fisher":
            if not matrices or "matrix" not in matrices or "inverse" not in matrices:
                raise ValueError("a 'fisher' input map needs its matrices (they are kept next to its JSON)")
            norm.matrix_DD, norm.inverse_DD = matrices["matrix"].float(), matrices["inverse"].float()
        return norm


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@torch.no_grad()
def fold_input_norm(sae, norm: InputNorm) -> None:
    """Turn a training-form ``sae`` (centred, on x_n) into release form on raw x, in place.

    π = (x_n − b_dec)·W_enc + b_enc = x·(diag(g)·W_enc) + [b_enc − (s⊙g + b_dec)·W_enc], and
    x = x̂_n ⊘ g + s = f·(W_dec ⊘ g) + (b_dec ⊘ g + s).  Then, where the architecture allows
    (``sae.latents_rescalable``, or any architecture when the gain is one scalar), latent i is multiplied by n_i = ‖row i of W_dec‖ (W_enc's
    column, b_enc and θ by n_i, the row by 1/n_i): the same reconstruction, unit-norm rows.
    """
    if not sae.cfg.centre_input:
        raise ValueError("this SAE is already in release form")
    if norm.mode == "scalar":  # the paper's fold: latents × C, the same for every architecture
        sae.fold_input_scale(norm.scalar)
        return
    if norm.matrix_DD is not None:  # x_n = (x − s)·M: the same algebra with diag(g) → M
        M, M_inv, s_D = norm.matrix_DD.to(sae.W_enc), norm.inverse_DD.to(sae.W_enc), norm.shift_D.to(sae.W_enc)
        sae.b_enc.sub_((s_D @ M + sae.b_dec) @ sae.W_enc)
        sae.W_enc.copy_(M @ sae.W_enc)
        sae.W_dec.copy_(sae.W_dec @ M_inv)
        sae.b_dec.copy_(sae.b_dec @ M_inv + s_D)
        sae.cfg.centre_input = False
        if sae.latents_rescalable:
            rescale_latents_(sae, None)
        return
    g_D, s_D = norm.gain_D.to(sae.W_enc), norm.shift_D.to(sae.W_enc)
    sae.b_enc.sub_((s_D * g_D + sae.b_dec) @ sae.W_enc)
    sae.W_enc.mul_(g_D[:, None])
    sae.W_dec.div_(g_D[None, :])
    sae.b_dec.div_(g_D).add_(s_D)
    sae.cfg.centre_input = False
    uniform = bool((norm.gain_D == norm.gain_D[0]).all())
    if uniform or sae.latents_rescalable:  # one factor for all latents keeps TopK's ranking
        rescale_latents_(sae, norm.gain_D)


@torch.no_grad()
def rescale_latents_(sae, gain_D: torch.Tensor | None) -> None:
    """After a fold whose output map had gains ``gain_D`` (None: a full matrix): one factor 1/g
    for every latent when the map is uniform (the training-form decoder rows stay as they were),
    else unit-norm decoder rows; encoder, b_enc and the per-latent parameters (thresholds) take
    the inverse factor, exactly."""
    uniform = gain_D is not None and bool((gain_D == gain_D[0]).all())
    n_F = (torch.full((sae.cfg.d_sae,), float(1 / gain_D[0]), device=sae.W_dec.device) if uniform
           else sae.W_dec.norm(dim=1).clamp_min(1e-30))
    sae.W_dec.div_(n_F[:, None])
    sae.W_enc.mul_(n_F[None, :])
    sae.b_enc.mul_(n_F)
    sae._scale_latents_(n_F)
