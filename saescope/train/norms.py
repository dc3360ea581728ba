"""Each site's input map, estimated from the first batches of a source before step 0: the
paper's scalar C (E‖x/C‖² = 1) or a per-dimension :class:`~saescope.sae.input_norm.InputNorm`.
Estimated per stored site, so a transcoder's input (``mlp_in``) and target (``mlp_out``) each
get their own."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from saescope.activations.source import BatchSource
from saescope.sae.input_norm import InputNorm
from saescope.sites import Site


@torch.no_grad()
def estimate_input_scales(
    source: BatchSource, sites: list[Site], *, batch_size: int, n_tokens: int, seed: int = 0,
    reduce_sums=None,
) -> dict[Site, float]:
    """C per site = sqrt(mean ‖x‖²) over the first ``ceil(n_tokens / batch_size)`` batches.

    Summed in float64 so millions of tokens add up without rounding drift.  A site whose estimate
    is not a finite positive number maps to NaN (its SAEs are then stopped before step 0).
    ``reduce_sums`` (data parallelism) sums, in place, the float64 vector of per-site Σ‖x‖² and
    the row count over the ranks, so every rank gets the C of the whole global batches.
    """
    n_batches = max(1, math.ceil(n_tokens / batch_size))
    sum_sq = {site: 0.0 for site in sites}
    count = 0
    batches = source.iter_batches(batch_size, seed=seed, skip_batches=0)
    for _ in range(n_batches):
        batch = next(batches)
        for site in sites:
            sum_sq[site] += float(batch[site].double().pow(2).sum())
        count += batch[sites[0]].shape[0]
    if reduce_sums is not None:
        sums = torch.tensor([sum_sq[site] for site in sites] + [count], dtype=torch.float64)
        reduce_sums(sums)
        sum_sq, count = dict(zip(sites, sums[:-1].tolist())), sums[-1].item()
    scales = {}
    for site in sites:
        c = math.sqrt(sum_sq[site] / count) if math.isfinite(sum_sq[site]) else float("nan")
        scales[site] = c if math.isfinite(c) and c > 0 else float("nan")
    return scales


@torch.no_grad()
def estimate_input_norms(
    source: BatchSource, sites: list[Site], *, mode: str, batch_size: int, n_tokens: int, seed: int = 0,
    reduce_sums: Callable[[torch.Tensor], None] | None = None, power: float = 1.0,
    fisher: dict[Site, torch.Tensor] | None = None, fisher_weight: float = 0.5,
) -> dict[Site, InputNorm]:
    """Each site's :class:`InputNorm` from the first ``ceil(n_tokens / batch_size)`` batches.

    ``"scalar"`` is :func:`estimate_input_scales` (the paper's C); the other modes stream Σx and
    Σx² per dimension in float64.  ``reduce_sums`` sums the statistics over ranks in place.
    ``"fisher"`` also streams each site's covariance and needs ``fisher``, the sites' Fisher
    metrics (:func:`saescope.activations.fisher.site_fisher`); it is one process's estimate."""
    if mode == "fisher":
        if reduce_sums is not None:
            raise ValueError("input_norm 'fisher' is estimated by one process; use 'diagonal' with data-parallel "
                             "training")
        missing = [str(s) for s in sites if fisher is None or s not in fisher]
        if missing:
            raise ValueError(f"input_norm 'fisher' needs the Fisher metric of {', '.join(missing)}")
    if mode == "scalar":
        scales = estimate_input_scales(source, sites, batch_size=batch_size, n_tokens=n_tokens, seed=seed,
                                       reduce_sums=reduce_sums)
        return {site: InputNorm.from_scale(c, source.d_in[site]) for site, c in scales.items()}
    n_batches = max(1, math.ceil(n_tokens / batch_size))
    sums = {site: torch.zeros(2, source.d_in[site], dtype=torch.float64) for site in sites}
    count = 0.0
    batches = source.iter_batches(batch_size, seed=seed, skip_batches=0)
    # "fisher": Σ (x − c)(x − c)ᵀ about the first batch's mean c, in fp32 per batch (c removes
    # the large mean, so fp32 loses nothing that matters), summed in fp64
    centre, outer = {}, {}
    for _ in range(n_batches):
        batch = next(batches)
        for site in sites:
            x = batch[site].double()
            sums[site][0] += x.sum(0)
            sums[site][1] += x.square().sum(0)
            if mode == "fisher":
                if site not in centre:
                    centre[site] = batch[site].float().mean(0)
                    outer[site] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                xc = batch[site].float() - centre[site]
                outer[site] += (xc.T @ xc).double()
        count += batch[sites[0]].shape[0]
    if mode == "fisher":
        norms = {}
        for site in sites:
            mean_offset = sums[site][0] / count - centre[site].double()
            cov = outer[site] / count - torch.outer(mean_offset, mean_offset)
            norms[site] = InputNorm.from_fisher(count, sums[site][0], sums[site][1], cov, fisher[site],
                                                power=power, weight=fisher_weight)
        return norms
    if reduce_sums is not None:
        flat = torch.cat([sums[site].reshape(-1) for site in sites] + [torch.tensor([count], dtype=torch.float64)])
        reduce_sums(flat)
        at = 0
        for site in sites:
            n = sums[site].numel()
            sums[site] = flat[at:at + n].reshape(2, -1)
            at += n
        count = float(flat[-1])
    return {site: InputNorm.from_sums(mode, count, sums[site][0], sums[site][1], power) for site in sites}
