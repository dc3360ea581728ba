"""Every evaluation metric saescope reports, defined once.

Notation: x is a site activation (one token, width D), x̂ the SAE's reconstruction, f the SAE's
latents (width F); N tokens are evaluated (BOS, EOS and padding positions are never counted).
CE is next-token cross-entropy in nats.  The names below are the keys of ``metrics.json``.

Reconstruction (:class:`ReconstructionStats`):

``l0``        mean over tokens of ‖f‖₀, the number of non-zero latents.
``fvu``       fraction of variance unexplained, Σₙ‖xₙ − x̂ₙ‖² / Σₙ‖xₙ − x̄‖², x̄ the mean of x over the
              N evaluation tokens.  The denominator is the variance *about the mean* (the loss of
              always predicting x̄), not Σ‖x‖²: two widely used libraries shipped the about-zero
              version, which flatters SAEs on sites with a large mean (the residual stream).
``fvu_std``   FVU after standardising each dimension: the mean over the D dimensions of each
              dimension's own FVU, Σₙ(xₙd − x̂ₙd)² / Σₙ(xₙd − x̄d)².  FVU over all dimensions is
              dominated by a model's few massive dimensions (Gemma 3: one dimension holds ~80% of
              the variance of its mid-layer residual stream) while the next-token loss depends on
              the error in the others; here every dimension counts 1/D.
``mse``       mean over tokens of ‖x − x̂‖² (summed over the D dimensions, averaged over tokens; the
              same normalisation as the training loss; divide by D for a per-element figure).
``cossim``    mean over tokens of x·x̂ / (‖x‖‖x̂‖) (0 where either is zero).
``l2_ratio``  mean over tokens of ‖x̂‖ / ‖x‖.
``frac_dead`` fraction of latents never non-zero on the N tokens.
``frac_high_freq``  fraction of latents non-zero on more than 10% of the tokens.
``explained_variance``  1 − fvu (SAELens/SAEBench's name for the same about-the-mean figure).
``relative_reconstruction_bias``  Σₙ‖x̂ₙ‖² / Σₙ xₙ·x̂ₙ (Rajamanoharan et al. 2024, eq. 10): 1 when x̂
              is unbiased in scale, < 1 when the SAE shrinks its output.
``l1``        mean over tokens of Σᵢ|fᵢ|.
``l2_norm_in``, ``l2_norm_out``  mean over tokens of ‖x‖ and of ‖x̂‖.
``frac_alive``  1 − frac_dead: latents non-zero on at least one of the N tokens.
``freq_over_1_percent``  fraction of latents non-zero on more than 1% of the tokens.
``normalized_freq_over_1_percent``, ``…_10_percent``  share of all firings (Σ densities) made by
              the latents above 1% / 10% density.
firing-frequency histogram: histogram of log10(density) over live latents, density = (tokens on
              which the latent fires) / N.

Language modelling (:class:`LossStats`), per position that predicts a real next token:

``ce_clean``, ``ce_spliced``, ``ce_zero_ablation``  mean CE of the clean model, with the SAE's
              reconstruction spliced into its site, and with the site's output replaced by zeros.
``delta_loss``    ce_spliced − ce_clean (Gemma Scope's primary fidelity metric).
``ce_loss_score`` (ce_zero_ablation − ce_spliced) / (ce_zero_ablation − ce_clean): 1 when splicing
              costs nothing, 0 when it is as bad as deleting the site.  A ratio of means (SAEBench).
``kl_div``    mean over tokens of KL(p_clean ‖ p_spliced) = Σᵥ p_clean(v) (log p_clean(v) − log p_spliced(v)).
``kl_div_with_ablation``  the same KL for the zero-ablated site, on the same tokens.
``kl_div_score``  (kl_div_with_ablation − kl_div) / kl_div_with_ablation, a ratio of means (SAEBench).

``saebench`` (:func:`saebench_core`): the figures above that SAEBench's core evaluation reports,
under its names and nesting (``ce_loss_with_sae`` is ce_spliced, ``ce_loss_without_sae`` ce_clean,
``ce_loss_with_ablation`` ce_zero_ablation, ``kl_div_with_sae`` kl_div).  Where SAELens's
``evals.py`` counts positions differently (the zero-ablated BOS, the last position's KL), see
docs/evaluation.md.

Accumulators stream over batches: they keep sums (float64), never activations, and split every
sum by a group id per token (a corpus subset, a position bin); ``summary()`` merges the groups.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

HIGH_FREQ_THRESHOLD = 0.1
#: fixed log10-density bin edges, so histograms of different SAEs overlay
LOG10_DENSITY_EDGES: tuple[float, ...] = tuple(np.round(np.linspace(-8.0, 0.0, 41), 6).tolist())

# ---------------------------------------------------------------------------------------------
# Per-token quantities (pure functions; tensors of shape (N, ...))


def l0_per_token(f_NF: torch.Tensor) -> torch.Tensor:
    """‖f‖₀ per token: the number of non-zero latents."""
    return (f_NF != 0).sum(dim=-1)


def squared_error_per_token(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> torch.Tensor:
    """‖x − x̂‖² per token, summed over D, in float64."""
    return (x_ND.double() - x_hat_ND.double()).pow(2).sum(dim=-1)


def cossim_per_token(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> torch.Tensor:
    """x·x̂ / (‖x‖‖x̂‖) per token; 0 where either vector is zero."""
    x, x_hat = x_ND.double(), x_hat_ND.double()
    norms = x.norm(dim=-1) * x_hat.norm(dim=-1)
    dot = (x * x_hat).sum(dim=-1)
    return torch.where(norms > 0, dot / norms.clamp_min(1e-300), torch.zeros_like(dot))


def l2_ratio_per_token(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> torch.Tensor:
    """‖x̂‖ / ‖x‖ per token (tokens with x = 0 give 0)."""
    x_norm = x_ND.double().norm(dim=-1)
    x_hat_norm = x_hat_ND.double().norm(dim=-1)
    return torch.where(x_norm > 0, x_hat_norm / x_norm.clamp_min(1e-300), torch.zeros_like(x_norm))


def dot_per_token(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> torch.Tensor:
    """x·x̂ per token, float64."""
    return (x_ND.double() * x_hat_ND.double()).sum(dim=-1)


def cross_entropy_per_token(log_probs_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """−log p(target) per token, from log-probabilities."""
    return -log_probs_NV.gather(-1, targets_N[:, None]).squeeze(-1)


def kl_div_per_token(log_probs_clean_NV: torch.Tensor, log_probs_spliced_NV: torch.Tensor) -> torch.Tensor:
    """KL(p_clean ‖ p_spliced) per token, from log-probabilities."""
    return F.kl_div(log_probs_spliced_NV, log_probs_clean_NV, log_target=True, reduction="none").sum(-1)


def fvu_std(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """Mean over dimensions of each dimension's FVU (see module docstring), on one tensor."""
    x = x_ND.double()
    var_D = (x - x.mean(dim=0)).pow(2).sum(0)
    err_D = (x - x_hat_ND.double()).pow(2).sum(0)
    varying = var_D > 0
    return float((err_D[varying] / var_D[varying]).mean())


def fvu(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² on one tensor of tokens (about the mean; see module docstring)."""
    x = x_ND.double()
    variance = (x - x.mean(dim=0)).pow(2).sum()
    return float(squared_error_per_token(x_ND, x_hat_ND).sum() / variance)


def ce_loss_score(ce_clean: float, ce_spliced: float, ce_zero_ablation: float) -> float:
    """(CE_zero − CE_spliced) / (CE_zero − CE_clean); NaN when zero ablation costs nothing."""
    denominator = ce_zero_ablation - ce_clean
    return (ce_zero_ablation - ce_spliced) / denominator if denominator != 0 else math.nan


def kl_div_score(kl_sae: float, kl_zero_ablation: float) -> float:
    """(KL_zero − KL_sae) / KL_zero; NaN when zero ablation changes nothing."""
    return (kl_zero_ablation - kl_sae) / kl_zero_ablation if kl_zero_ablation != 0 else math.nan


def relative_reconstruction_bias(sum_x_hat_sq: float, sum_dot: float) -> float:
    """Σ‖x̂‖² / Σ x·x̂ (eq. 10 of arXiv:2404.16014); NaN when Σ x·x̂ = 0."""
    return sum_x_hat_sq / sum_dot if sum_dot != 0 else math.nan


def firing_frequency_metrics(fired_F: np.ndarray, n_tokens: int) -> dict:
    """frac_alive and SAEBench's firing-frequency figures from per-latent firing counts."""
    density = np.asarray(fired_F, dtype=np.float64) / max(n_tokens, 1)
    total = density.sum()

    def share(threshold: float) -> float:
        return float(density[density > threshold].sum() / total) if total > 0 else 0.0

    return {
        "frac_alive": float((density > 0).mean()),
        "freq_over_1_percent": float((density > 0.01).mean()),
        "freq_over_10_percent": float((density > HIGH_FREQ_THRESHOLD).mean()),
        "normalized_freq_over_1_percent": share(0.01),
        "normalized_freq_over_10_percent": share(HIGH_FREQ_THRESHOLD),
    }


def firing_histogram(fired_F: np.ndarray, n_tokens: int, edges=LOG10_DENSITY_EDGES) -> dict:
    """Histogram of log10(firing density) over live latents; dead latents are counted apart.

    Densities below the first edge fall in the first bin, so no live latent is lost.
    """
    fired = np.asarray(fired_F, dtype=np.float64)
    live = fired[fired > 0]
    log_density = np.log10(live / max(n_tokens, 1)) if live.size else np.zeros(0)
    edges_arr = np.asarray(edges, dtype=np.float64)
    counts, _ = np.histogram(np.clip(log_density, edges_arr[0], edges_arr[-1]), bins=edges_arr)
    return {"log10_density_edges": edges_arr.tolist(), "counts": counts.tolist(), "n_dead": int((fired == 0).sum())}


# ---------------------------------------------------------------------------------------------
# Streaming accumulators


def _group_sum(values_N: torch.Tensor, group_N: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum of ``values`` per group id (float64); rows (N, ...) keep their trailing shape."""
    out = torch.zeros((n_groups, *values_N.shape[1:]), dtype=torch.float64, device=values_N.device)
    return out.index_add_(0, group_N, values_N.double())


class ReconstructionStats:
    """Streams reconstruction metrics over batches, split into ``n_groups`` groups.

    The variance for FVU is merged batch by batch with Chan et al.'s parallel update (each batch's
    sum of squared deviations about its own mean, plus a correction for the shift of the mean),
    in float64: no catastrophic cancellation even when ‖x̄‖² ≫ the variance, as in the residual
    stream.  Firing counts per latent (``track_firing``) cost n_groups × F integers.
    """

    def __init__(self, d_in: int, d_sae: int, n_groups: int = 1, *, track_firing: bool = True, device="cpu"):
        G = n_groups
        self.n_groups, self.d_sae = G, d_sae
        kw = {"dtype": torch.float64, "device": device}
        self.n = torch.zeros(G, **kw)
        self.mean_GD = torch.zeros(G, d_in, **kw)
        self.m2 = torch.zeros(G, **kw)  # Σ‖x − x̄‖² about the running mean
        self.sq_err = torch.zeros(G, **kw)
        self.m2_GD = torch.zeros(G, d_in, **kw)  # per-dimension Σ(x − x̄)², for fvu_std
        self.sq_err_GD = torch.zeros(G, d_in, **kw)
        self.l0 = torch.zeros(G, **kw)
        self.cossim = torch.zeros(G, **kw)
        self.l2_ratio = torch.zeros(G, **kw)
        self.l1 = torch.zeros(G, **kw)
        self.norm_in = torch.zeros(G, **kw)
        self.norm_out = torch.zeros(G, **kw)
        self.x_hat_sq = torch.zeros(G, **kw)  # Σ‖x̂‖², for relative_reconstruction_bias
        self.dot = torch.zeros(G, **kw)  # Σ x·x̂
        self.fired_GF = torch.zeros(G, d_sae, dtype=torch.int64, device=device) if track_firing else None

    @torch.no_grad()
    def update(self, x_ND: torch.Tensor, x_hat_ND: torch.Tensor, f_NF: torch.Tensor, group_N: torch.Tensor | None = None):
        device = self.n.device
        x_ND, x_hat_ND, f_NF = x_ND.to(device), x_hat_ND.to(device), f_NF.to(device)
        G = self.n_groups
        group_N = torch.zeros(len(x_ND), dtype=torch.long, device=device) if group_N is None else group_N.to(device).long()
        ones = torch.ones(len(x_ND), dtype=torch.float64, device=device)

        n_b = _group_sum(ones, group_N, G)
        mean_b = _group_sum(x_ND, group_N, G) / n_b.clamp_min(1)[:, None]
        m2_b_GD = _group_sum((x_ND.double() - mean_b[group_N]).pow(2), group_N, G)
        m2_b = m2_b_GD.sum(-1)
        n_total = self.n + n_b
        delta = mean_b - self.mean_GD
        weight = torch.where(n_total > 0, n_b / n_total.clamp_min(1), torch.zeros_like(n_total))
        self.m2 += m2_b + delta.pow(2).sum(-1) * self.n * weight
        self.m2_GD += m2_b_GD + delta.pow(2) * (self.n * weight)[:, None]
        self.sq_err_GD += _group_sum((x_ND.double() - x_hat_ND.double()).pow(2), group_N, G)
        self.mean_GD += delta * weight[:, None]
        self.n = n_total

        self.sq_err += _group_sum(squared_error_per_token(x_ND, x_hat_ND), group_N, G)
        self.l0 += _group_sum(l0_per_token(f_NF), group_N, G)
        self.cossim += _group_sum(cossim_per_token(x_ND, x_hat_ND), group_N, G)
        self.l2_ratio += _group_sum(l2_ratio_per_token(x_ND, x_hat_ND), group_N, G)
        self.l1 += _group_sum(f_NF.double().abs().sum(-1), group_N, G)
        x_hat_norm = x_hat_ND.double().norm(dim=-1)
        self.norm_in += _group_sum(x_ND.double().norm(dim=-1), group_N, G)
        self.norm_out += _group_sum(x_hat_norm, group_N, G)
        self.x_hat_sq += _group_sum(x_hat_norm.pow(2), group_N, G)
        self.dot += _group_sum(dot_per_token(x_ND, x_hat_ND), group_N, G)
        if self.fired_GF is not None:  # one-hot(group)ᵀ @ active: one small matmul, exact in float32
            one_hot_NG = F.one_hot(group_N, G).float()
            self.fired_GF += (one_hot_NG.T @ (f_NF != 0).float()).round().long()

    #: per-token sums whose mean over tokens is a metric of the same name
    _MEANS = ("l0", "cossim", "l2_ratio", "l1", "norm_in", "norm_out")
    _NAMES = {"norm_in": "l2_norm_in", "norm_out": "l2_norm_out"}

    def _metrics(self, n, m2, sq_err, sums: dict, fired_F, m2_D, sq_err_D) -> dict:
        if n == 0:
            return {"n_tokens": 0}
        varying = m2_D > 0
        fvu = float(sq_err / m2) if m2 > 0 else math.nan
        out = {
            "n_tokens": int(n),
            "l0": float(sums["l0"] / n),
            "fvu": fvu,
            "fvu_std": float((sq_err_D[varying] / m2_D[varying]).mean()) if bool(varying.any()) else math.nan,
            "mse": float(sq_err / n),
            "cossim": float(sums["cossim"] / n),
            "l2_ratio": float(sums["l2_ratio"] / n),
            "explained_variance": 1.0 - fvu,
            "relative_reconstruction_bias": relative_reconstruction_bias(sums["x_hat_sq"], sums["dot"]),
            **{self._NAMES.get(k, k): float(sums[k] / n) for k in ("l1", "norm_in", "norm_out")},
        }
        if fired_F is not None:
            out["frac_dead"] = float((fired_F == 0).double().mean())
            out["frac_high_freq"] = float((fired_F > HIGH_FREQ_THRESHOLD * n).double().mean())
            out.update(firing_frequency_metrics(np.asarray(fired_F), int(n)))
        return out

    def _sums(self, g: int | None) -> dict:
        names = (*self._MEANS, "x_hat_sq", "dot")
        return {k: (getattr(self, k).sum() if g is None else getattr(self, k)[g]).item() for k in names}

    def by_group(self) -> list[dict]:
        """Metrics of each group (``{"n_tokens": 0}`` for an empty one)."""
        fired = self.fired_GF.cpu() if self.fired_GF is not None else [None] * self.n_groups
        return [
            self._metrics(self.n[g].item(), self.m2[g].item(), self.sq_err[g].item(), self._sums(g), fired[g],
                          self.m2_GD[g], self.sq_err_GD[g])
            for g in range(self.n_groups)
        ]

    def summary(self) -> dict:
        """Metrics over all groups together (groups merged exactly, as in :meth:`update`)."""
        n = self.n.sum()
        mean_D = (self.n[:, None] * self.mean_GD).sum(0) / n.clamp_min(1)
        m2 = self.m2.sum() + (self.n * (self.mean_GD - mean_D).pow(2).sum(-1)).sum()
        m2_D = self.m2_GD.sum(0) + (self.n[:, None] * (self.mean_GD - mean_D).pow(2)).sum(0)
        fired = self.fired_GF.sum(0).cpu() if self.fired_GF is not None else None
        return self._metrics(n.item(), m2.item(), self.sq_err.sum().item(), self._sums(None), fired, m2_D,
                             self.sq_err_GD.sum(0))

    def firing_counts(self) -> np.ndarray:
        """Tokens on which each latent fired, all groups together, (F,) int64."""
        if self.fired_GF is None:
            raise RuntimeError("firing counts were not tracked (track_firing=False)")
        return self.fired_GF.sum(0).cpu().numpy()


class LossStats:
    """Streams per-token CE and KL sums, split into ``n_groups`` groups.

    ``update(ce_clean, ce_other, kl, group)``: ``ce_other`` is the spliced CE for an SAE, or the
    zero-ablation CE for a site.
    """

    def __init__(self, n_groups: int = 1, device="cpu"):
        kw = {"dtype": torch.float64, "device": device}
        self.n_groups = n_groups
        self.n = torch.zeros(n_groups, **kw)
        self.ce_clean = torch.zeros(n_groups, **kw)
        self.ce_other = torch.zeros(n_groups, **kw)
        self.kl = torch.zeros(n_groups, **kw)

    @torch.no_grad()
    def update(self, ce_clean_N, ce_other_N, kl_N, group_N: torch.Tensor | None = None):
        device = self.n.device
        group_N = torch.zeros(len(ce_clean_N), dtype=torch.long, device=device) if group_N is None else group_N.to(device).long()
        G = self.n_groups
        self.n += _group_sum(torch.ones(len(group_N), device=device), group_N, G)
        self.ce_clean += _group_sum(ce_clean_N.to(device), group_N, G)
        self.ce_other += _group_sum(ce_other_N.to(device), group_N, G)
        self.kl += _group_sum(kl_N.to(device), group_N, G)

    def means(self, merged: bool) -> list[tuple[int, float, float, float]]:
        """``(n, mean ce_clean, mean ce_other, mean kl)`` per group, or one tuple if ``merged``."""
        sums = [t.sum(0, keepdim=True) if merged else t for t in (self.n, self.ce_clean, self.ce_other, self.kl)]
        return [
            (int(n), c / n if n else math.nan, o / n if n else math.nan, k / n if n else math.nan)
            for n, c, o, k in zip(*(s.tolist() for s in sums))
        ]


def loss_metrics(spliced: tuple[int, float, float, float], zero: tuple[int, float, float, float]) -> dict:
    """The language-modelling metrics of one SAE from its and its site's zero-ablation means."""
    n, ce_clean, ce_spliced, kl = spliced
    if n == 0:
        return {"n_loss_tokens": 0}
    ce_zero, kl_zero = zero[2], zero[3]
    return {
        "n_loss_tokens": n,
        "ce_clean": ce_clean,
        "ce_spliced": ce_spliced,
        "ce_zero_ablation": ce_zero,
        "delta_loss": ce_spliced - ce_clean,
        "ce_loss_score": ce_loss_score(ce_clean, ce_spliced, ce_zero),
        "kl_div": kl,
        "kl_div_with_ablation": kl_zero,
        "kl_div_score": kl_div_score(kl, kl_zero),
    }


#: SAEBench's core metrics: (its category, its name, saescope's key in metrics.json)
SAEBENCH_CORE = (
    ("model_behavior_preservation", "kl_div_score", "kl_div_score"),
    ("model_behavior_preservation", "kl_div_with_ablation", "kl_div_with_ablation"),
    ("model_behavior_preservation", "kl_div_with_sae", "kl_div"),
    ("model_performance_preservation", "ce_loss_score", "ce_loss_score"),
    ("model_performance_preservation", "ce_loss_with_ablation", "ce_zero_ablation"),
    ("model_performance_preservation", "ce_loss_with_sae", "ce_spliced"),
    ("model_performance_preservation", "ce_loss_without_sae", "ce_clean"),
    ("reconstruction_quality", "explained_variance", "explained_variance"),
    ("reconstruction_quality", "mse", "mse"),
    ("reconstruction_quality", "cossim", "cossim"),
    ("shrinkage", "l2_norm_in", "l2_norm_in"),
    ("shrinkage", "l2_norm_out", "l2_norm_out"),
    ("shrinkage", "l2_ratio", "l2_ratio"),
    ("shrinkage", "relative_reconstruction_bias", "relative_reconstruction_bias"),
    ("sparsity", "l0", "l0"),
    ("sparsity", "l1", "l1"),
    ("misc_metrics", "frac_alive", "frac_alive"),
    ("misc_metrics", "freq_over_1_percent", "freq_over_1_percent"),
    ("misc_metrics", "freq_over_10_percent", "freq_over_10_percent"),
    ("misc_metrics", "normalized_freq_over_1_percent", "normalized_freq_over_1_percent"),
    ("misc_metrics", "normalized_freq_over_10_percent", "normalized_freq_over_10_percent"),
    ("token_stats", "total_tokens_eval_reconstruction", "n_loss_tokens"),
    ("token_stats", "total_tokens_eval_sparsity_variance", "n_tokens"),
)


def saebench_core(metrics: dict) -> dict:
    """SAEBench's core-evaluation block (its categories and names) from one SAE's metrics;
    missing figures (no zero ablation, no loss tokens) are NaN."""
    out: dict = {}
    for category, name, key in SAEBENCH_CORE:
        out.setdefault(category, {})[name] = metrics.get(key, math.nan)
    return out
