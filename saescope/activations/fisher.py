"""How much the model's predictions care about each direction of each site: the Fisher metric.

An SAE's error e at a site changes the model's next-token distributions; to second order the
change is KL(p ‖ p_e) ≈ ½·eᵀ·F·e, where F is the Fisher information of the model's own
predictive distribution with respect to the site's activation (the KL's Hessian at e = 0).  We
estimate it per site as F = E_t[g_t g_tᵀ], with g_t = ∂/∂a_t Σ_s log p(y_s | …) and every y_s
*sampled from the model* (the true Fisher, not the empirical one): one forward and one backward
give every site's g at once.  Gradients reach a_t from every later position s ≥ t, so F also
counts what an error does to the predictions after it.

Training an SAE on ‖e‖² under a map that includes F (:class:`~saescope.sae.input_norm.InputNorm`,
mode ``"fisher"``) spends its dictionary on the directions the loss depends on, where the MSE
under any per-dimension map spends it on variance (docs/fidelity.md has the measurements).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from saescope.activations.capture import check_corpus, model_device
from saescope.precision import autocast_dtype
from saescope.sites import Site, hook_site, site_width
from saescope.tokens import TokenizedCorpus


def site_fisher(
    model: nn.Module,
    corpus: TokenizedCorpus,
    sites: Iterable[Site],
    *,
    n_tokens: int,
    seqs_per_forward: int = 2,
    seed: int = 0,
    dtype: torch.dtype | None = torch.bfloat16,
    progress: bool = False,
) -> tuple[dict[Site, torch.Tensor], int]:
    """``({site: F_DD float64}, tokens used)``: each site's Fisher metric, averaged over the
    kept positions of the first sequences of ``corpus`` holding about ``n_tokens`` kept tokens.

    ``dtype``: autocast precision of the forward (None: the model's own); the gradients and F
    are accumulated in float32/float64.  Labels are drawn from a generator seeded by ``seed``."""
    from tqdm.auto import tqdm

    sites = list(dict.fromkeys(sites))
    if not sites:
        raise ValueError("no site to measure the Fisher metric at")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    for site in sites:
        if site.kind == "transcoder":
            raise ValueError(f"the Fisher metric is measured at a stored site, not at a pair site ({site})")
    check_corpus(model, corpus)
    device = model_device(model)
    fisher = {s: torch.zeros(site_width(model, s), site_width(model, s), dtype=torch.float64) for s in sites}
    kept_per_seq = corpus.keep_mask.sum(axis=1)
    n_seqs = int(np.searchsorted(np.cumsum(kept_per_seq), n_tokens) + 1)
    n_seqs = min(n_seqs, len(corpus))
    generator = torch.Generator(device=device).manual_seed(seed)
    if dtype == torch.bfloat16:  # float32 on a CPU without bf16 units (saescope.precision)
        dtype = autocast_dtype("bfloat16", device)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    seen = 0
    try:
        for start in tqdm(range(0, n_seqs, seqs_per_forward), desc="fisher", unit="fwd", disable=not progress):
            ids_BT = torch.as_tensor(corpus.input_ids[start:start + seqs_per_forward], device=device)
            keep_BT = torch.as_tensor(corpus.keep_mask[start:start + seqs_per_forward], device=device)
            if not bool(keep_BT.any()):
                continue
            seen += _accumulate(model, sites, ids_BT, keep_BT, fisher, generator, dtype)
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    if seen == 0:
        raise ValueError(f"corpus {corpus.name!r} has no kept token to measure the Fisher metric on")
    return {s: f / seen for s, f in fisher.items()}, seen


def fisher_of_sites(model: nn.Module, corpus: TokenizedCorpus, *, n_tokens: int, seed: int = 0,
                    progress: bool = False):
    """``sites -> {site: F_DD}`` (what :class:`~saescope.train.trainer.Trainer` takes as
    ``fisher``): :func:`site_fisher` on the first ``n_tokens`` kept tokens of ``corpus``."""
    return lambda sites: site_fisher(model, corpus, sites, n_tokens=n_tokens, seed=seed, progress=progress)[0]


@torch.no_grad()
def sample_labels(log_p_NV: torch.Tensor, generator: torch.Generator, rows_per_chunk: int = 64) -> torch.Tensor:
    """One token per row drawn from ``exp(log_p_NV)``, by inverse CDF: one uniform per row
    against the float64 cumulative sum.  ``torch.multinomial`` draws one exponential per
    vocabulary entry instead (Gemma's 262k words); the default's Fisher pass went 143 -> 133 s."""
    n, vocab = log_p_NV.shape
    out = torch.empty(n, dtype=torch.long, device=log_p_NV.device)
    for a in range(0, n, rows_per_chunk):
        cdf_CV = log_p_NV[a : a + rows_per_chunk].exp().cumsum(-1, dtype=torch.float64)
        u_C1 = torch.rand(cdf_CV.shape[0], 1, generator=generator, dtype=torch.float64, device=cdf_CV.device)
        # first index whose cdf exceeds u·total: index i with probability p_i (never a zero-p one)
        out[a : a + rows_per_chunk] = torch.searchsorted(cdf_CV, u_C1 * cdf_CV[:, -1:], right=True).squeeze(1)
    return out.clamp_(max=vocab - 1)


def _accumulate(model, sites, ids_BT, keep_BT, fisher, generator, dtype) -> int:
    deltas: dict[Site, torch.Tensor] = {}
    handles = []

    def perturb(site):
        def fn(a_BTD):
            deltas[site] = torch.zeros_like(a_BTD, dtype=torch.float32, requires_grad=True)
            return a_BTD + deltas[site].to(a_BTD.dtype)
        return fn

    try:
        for site in sites:
            handles.append(hook_site(model, site, perturb(site)))
        device_type = ids_BT.device.type
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits_BTV = model(input_ids=ids_BT).logits
    finally:
        for h in handles:
            h.remove()
    with torch.enable_grad():
        log_p = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)  # predicts positions 1..T−1
        del logits_BTV
        y = sample_labels(log_p.detach().reshape(-1, log_p.shape[-1]), generator).view(log_p.shape[:2])
        scored = keep_BT[:, 1:]  # only the tokens the corpus keeps are predicted
        total = (log_p.gather(-1, y[..., None]).squeeze(-1) * scored).sum()
        total.backward()
    for site in sites:
        g_ND = deltas[site].grad[keep_BT]
        fisher[site] += (g_ND.T @ g_ND).double()  # one chunk's sum in fp32, the running sum in fp64
    return int(keep_BT.sum())
