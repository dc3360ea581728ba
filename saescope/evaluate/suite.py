"""Evaluate many SAEs on held-out tokens in one sweep over the corpus.

Per batch of sequences:

1. one clean forward for all SAEs: the clean log-probabilities at every scored position (kept
   for KL, so the batch size is chosen to bound their memory) and, for every site layer L, what
   enters block L (see :mod:`saescope.evaluate.forward`);
2. per site, one zero-ablation forward (the site's tensor replaced by zeros), for CE loss score;
3. per SAE, one spliced forward that starts at the site's block from the cached prefix, with the
   SAE spliced in by :class:`saescope.evaluate.splice.SpliceHook` — the same hook the splicing
   API uses — which also yields x, f and x̂ for the reconstruction metrics.

What counts (see :mod:`saescope.evaluate.metrics` for the formulas):

* reconstruction metrics at positions where ``keep_mask`` is True (not BOS, EOS or padding);
* CE and KL at positions t that predict a real token: ``keep_mask[t]`` and token t+1 belongs to
  a document (``doc_ids[t+1] >= 0``: EOS as a target counts, padding does not);
* splicing and zero ablation act on every position except the first (BOS) unless
  ``EvalConfig.splice_bos`` (see :mod:`saescope.evaluate.splice`);
* groups: each metric per corpus subset (``subset_ids``) and per position bin — positions
  1, 2–3, 4–7, 8–15, … in the packed sequence (the context the model sees; position 0 is BOS).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from saescope.evaluate import metrics as M
from saescope.evaluate.folders import find_sae_folders, folder_site, read_json, write_json
from saescope.evaluate.forward import clean_forward, forward_from, vocab_size
from saescope.evaluate.lm_scores import CleanReference, head_is_linear
from saescope.evaluate.splice import SpliceHook, keep_first_position
from saescope.sae.base import SAE
from saescope.sites import Site, hook_site
from saescope.tokens import TokenizedCorpus


@dataclass
class EvalConfig:
    #: sequences per forward; None: about ``batch_tokens`` tokens, fewer if the head needs
    #: the clean log-probs in memory (soft-capped or non-float32 heads: ``logit_memory_mb``)
    batch_seqs: int | None = None
    batch_tokens: int = 8192
    #: memory for vocabulary-sized temporaries (float32, tokens × vocabulary), in MiB
    logit_memory_mb: int = 1024
    #: fraction of the scored positions whose next-token loss (CE, KL) is computed, drawn at
    #: random (``seed``), the same positions for the clean pass, zero ablation and every SAE.
    #: The vocabulary head dominates a spliced forward's cost on small models (Gemma 3 270M:
    #: 168M of its multiply-adds per token are the 262k-word head), so CPU presets sample;
    #: reconstruction metrics always use every kept token.
    loss_fraction: float = 1.0
    seed: int = 0
    #: run a zero-ablation forward per site (needed for ce_loss_score; one forward per site)
    zero_ablation: bool = True
    #: also splice (and zero-ablate) the BOS position; off by default (module docstring)
    splice_bos: bool = False
    #: show a progress bar
    progress: bool = True

    def __post_init__(self):
        if not 0 < self.loss_fraction <= 1:
            raise ValueError(f"loss_fraction must be in (0, 1], got {self.loss_fraction}")
        if self.batch_seqs is not None and self.batch_seqs < 1:
            raise ValueError(f"batch_seqs must be >= 1, got {self.batch_seqs}")

    def sequences_per_batch(self, seq_len: int, n_vocab: int, keeps_log_probs: bool) -> int:
        if self.batch_seqs is not None:
            return self.batch_seqs
        n = max(1, self.batch_tokens // seq_len)
        if keeps_log_probs:
            n = min(n, self.logit_memory_mb * 2**20 // (int(seq_len * self.loss_fraction) * n_vocab * 4 + 1))
        return int(max(1, n))

    def chunk_tokens(self, n_vocab: int) -> int:
        """Tokens per vocabulary-head chunk: an eighth of the memory budget per temporary."""
        return int(max(1, self.logit_memory_mb * 2**20 // 8 // (n_vocab * 4)))


def position_bins(seq_len: int) -> list[tuple[int, int]]:
    """Inclusive position ranges (1, 1), (2, 3), (4, 7), … covering positions 1..seq_len−1."""
    bins, start = [], 1
    while start < seq_len:
        bins.append((start, min(2 * start - 1, seq_len - 1)))
        start *= 2
    return bins


def _position_bin_index(seq_len: int) -> torch.Tensor:
    """Bin of each position (position 0 gets bin 0 too; it is never kept)."""
    positions = torch.arange(seq_len).clamp_min(1)
    return torch.floor(torch.log2(positions.double())).long()


@dataclass
class _Target:
    """One SAE under evaluation and its accumulators."""

    site: Site
    sae: SAE
    recon_subset: M.ReconstructionStats
    recon_position: M.ReconstructionStats
    loss_subset: M.LossStats
    loss_position: M.LossStats


class _ZeroHook:
    """Zero ablation: the site's tensor replaced by zeros (except position 0 with ``skip_bos``)."""

    def __init__(self, skip_bos: bool):
        self.skip_bos = skip_bos

    def __call__(self, x_BTD: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x_BTD)
        return keep_first_position(x_BTD, out) if self.skip_bos else out


class _Batch:
    """A batch of sequences: its masks and groups, its clean forward, and :meth:`run`, which
    scores another forward (from a site's cached prefix, with a hook at the site) against it."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, corpus: TokenizedCorpus, rows: slice, scored: np.ndarray,
                 layers: set[int], chunk: int):
        self.model = model
        device = next(model.parameters()).device
        seq_len = corpus.input_ids.shape[1]
        self.ids_BT = torch.from_numpy(corpus.input_ids[rows]).long().to(device)
        self.keep_BT = torch.from_numpy(corpus.keep_mask[rows]).to(device)
        self.scored_BT = torch.from_numpy(scored[rows]).to(device)
        subset_BT = torch.from_numpy(corpus.subset_ids[rows].astype(np.int64)).to(device)
        subset_BT = torch.where(subset_BT >= 0, subset_BT, torch.full_like(subset_BT, len(corpus.subsets)))
        position_BT = _position_bin_index(seq_len).to(device).expand_as(self.ids_BT)
        # N: kept positions (reconstruction); M: scored positions (next-token loss)
        self.subset_N, self.position_N = subset_BT[self.keep_BT], position_BT[self.keep_BT]
        self.subset_M, self.position_M = subset_BT[self.scored_BT], position_BT[self.scored_BT]
        next_token_M = self.ids_BT[:, 1:][self.scored_BT[:, :-1]]

        hidden_BTD, self.prefix = clean_forward(model, self.ids_BT, layers)
        self.reference = CleanReference(model, hidden_BTD[self.scored_BT], next_token_M, chunk)
        self.ce_clean_M = self.reference.ce_clean_M

    @torch.no_grad()
    def run(self, site: Site, hook) -> tuple[torch.Tensor, torch.Tensor]:
        """CE and KL(clean ‖ hooked) per scored position, for a forward with ``hook`` at ``site``."""
        handle = hook_site(self.model, site, hook)
        try:
            hidden_BTD = forward_from(self.model, self.ids_BT, site.layer, self.prefix.get(site.layer))
        finally:
            handle.remove()
        return self.reference.score(hidden_BTD[self.scored_BT])


def scored_positions(corpus: TokenizedCorpus, fraction: float = 1.0, seed: int = 0) -> np.ndarray:
    """(N, T) bool: the positions whose next-token prediction is scored.

    A position counts when it is kept and the next token belongs to a document (an EOS target
    counts, padding does not); with ``fraction`` < 1, a seeded random share of those.
    """
    keep, doc = corpus.keep_mask, corpus.doc_ids
    scored = np.zeros_like(keep, dtype=bool)
    scored[:, :-1] = keep[:, :-1] & (doc[:, 1:] >= 0)
    if fraction < 1:
        scored &= np.random.default_rng(seed).random(scored.shape) < fraction
    return scored


@torch.no_grad()
def evaluate(model: nn.Module, corpus: TokenizedCorpus, saes: Mapping[str, tuple[Site, SAE]],
             cfg: EvalConfig | None = None) -> dict:
    """Evaluate every SAE in ``saes`` (name -> (site, SAE)) on ``corpus``.

    Returns ``{"saes": {name: metrics}, "sites": {site: zero-ablation figures}, "info": {...}}``;
    each SAE's metrics dict is what ``metrics.json`` holds (scalars named as in
    :mod:`saescope.evaluate.metrics`, plus ``by_subset``, ``by_position`` and
    ``firing_histogram``).  SAEs are moved to the model's device.
    """
    from tqdm.auto import tqdm

    cfg = cfg or EvalConfig()
    if not saes:
        raise ValueError("no SAE to evaluate")
    if corpus.n_tokens == 0:
        raise ValueError(f"corpus {corpus.name!r} has no kept tokens to evaluate on")
    device = next(model.parameters()).device
    n_seqs, seq_len = corpus.input_ids.shape
    n_vocab = vocab_size(model)
    batch_seqs = cfg.sequences_per_batch(seq_len, n_vocab, keeps_log_probs=not head_is_linear(model))
    chunk = cfg.chunk_tokens(n_vocab)
    scored = scored_positions(corpus, cfg.loss_fraction, cfg.seed)

    # groups: one per subset, plus one for kept tokens without a subset (only in the totals)
    G_sub = len(corpus.subsets) + 1
    bins = position_bins(seq_len)
    G_pos = max(len(bins), 1)

    targets: dict[str, _Target] = {}
    for name, (site, sae) in saes.items():
        sae.to(device)
        d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
        targets[name] = _Target(
            site, sae,
            M.ReconstructionStats(d_in, d_sae, G_sub, device=device),
            M.ReconstructionStats(d_in, d_sae, G_pos, track_firing=False, device=device),
            M.LossStats(G_sub, device), M.LossStats(G_pos, device),
        )
    sites = sorted({t.site for t in targets.values()})
    zero_subset = {s: M.LossStats(G_sub, device) for s in sites}
    zero_position = {s: M.LossStats(G_pos, device) for s in sites}

    n_batches = math.ceil(n_seqs / batch_seqs)
    n_zero = len(sites) if cfg.zero_ablation else 0
    bar = tqdm(total=n_batches * (1 + n_zero + len(targets)), unit="fwd", desc="eval", disable=not cfg.progress)
    zero_hook = _ZeroHook(skip_bos=not cfg.splice_bos)
    for start in range(0, n_seqs, batch_seqs):
        rows = slice(start, min(start + batch_seqs, n_seqs))
        batch = _Batch(model, corpus, rows, scored, {s.layer for s in sites}, chunk)
        bar.update(1)
        for site in sites:
            if cfg.zero_ablation:
                ce_M, kl_M = batch.run(site, zero_hook)
                zero_subset[site].update(batch.ce_clean_M, ce_M, kl_M, batch.subset_M)
                zero_position[site].update(batch.ce_clean_M, ce_M, kl_M, batch.position_M)
                bar.update(1)
            for t in (t for t in targets.values() if t.site == site):
                hook = SpliceHook(t.sae, skip_bos=not cfg.splice_bos, record=True)
                ce_M, kl_M = batch.run(site, hook)
                keep = batch.keep_BT
                x_ND, x_hat_ND, f_NF = hook.last.x_BTD[keep], hook.last.x_hat_BTD[keep], hook.last.f_BTF[keep]
                t.recon_subset.update(x_ND, x_hat_ND, f_NF, batch.subset_N)
                t.recon_position.update(x_ND, x_hat_ND, f_NF, batch.position_N)
                t.loss_subset.update(batch.ce_clean_M, ce_M, kl_M, batch.subset_M)
                t.loss_position.update(batch.ce_clean_M, ce_M, kl_M, batch.position_M)
                bar.update(1)
        del batch
    bar.close()

    results = {name: _sae_metrics(t, zero_subset[t.site], zero_position[t.site], corpus.subsets, bins)
               for name, t in targets.items()}
    site_figures = {}
    for site in sites:
        _, ce_clean, ce_zero, kl = zero_subset[site].means(merged=True)[0]
        site_figures[site.name] = {"ce_clean": ce_clean, "ce_zero_ablation": ce_zero,
                                   "delta_loss_zero_ablation": ce_zero - ce_clean, "kl_div_zero_ablation": kl}
    info = {
        "corpus": corpus.name,
        "n_sequences": int(n_seqs),
        "seq_len": int(seq_len),
        "n_tokens": corpus.n_tokens,
        "n_loss_tokens": int(scored.sum()),
        "loss_fraction": cfg.loss_fraction,
        "zero_ablation": cfg.zero_ablation,
        "subsets": list(corpus.subsets),
        "splice_bos": cfg.splice_bos,
        "batch_seqs": batch_seqs,
    }
    return {"saes": results, "sites": site_figures, "info": info}


def _sae_metrics(t: _Target, zero_subset: M.LossStats, zero_position: M.LossStats,
                 subsets: list[str], bins: list[tuple[int, int]]) -> dict:
    out: dict = {"site": t.site.name, "d_in": t.sae.cfg.d_in, "d_sae": t.sae.cfg.d_sae}
    out.update(t.recon_subset.summary())
    out.update(M.loss_metrics(t.loss_subset.means(merged=True)[0], zero_subset.means(merged=True)[0]))

    recon = t.recon_subset.by_group()
    loss, zero = t.loss_subset.means(merged=False), zero_subset.means(merged=False)
    out["by_subset"] = {
        name: {**recon[g], **M.loss_metrics(loss[g], zero[g])}
        for g, name in enumerate(subsets) if recon[g]["n_tokens"] or loss[g][0]
    }

    recon = t.recon_position.by_group()
    loss, zero = t.loss_position.means(merged=False), zero_position.means(merged=False)
    per_bin = [{**recon[g], **M.loss_metrics(loss[g], zero[g])} for g in range(len(bins))]
    names = ("n_tokens", "l0", "fvu", "mse", "cossim", "l2_ratio", "n_loss_tokens", "delta_loss", "kl_div",
             "ce_loss_score")
    out["by_position"] = {
        "position_start": [b[0] for b in bins],
        "position_end": [b[1] for b in bins],
        **{k: [row.get(k, 0 if k.startswith("n_") else math.nan) for row in per_bin] for k in names},
    }
    out["firing_histogram"] = M.firing_histogram(t.recon_subset.firing_counts(), out.get("n_tokens", 0))
    return out


#: the scalar metrics, in the order tables show them
SCALAR_METRICS = ("l0", "fvu", "mse", "cossim", "l2_ratio", "delta_loss", "ce_loss_score", "kl_div",
                  "frac_dead", "frac_high_freq", "ce_clean", "ce_spliced", "ce_zero_ablation")


def evaluate_release(root: str | Path, model: nn.Module, corpus: TokenizedCorpus, cfg: EvalConfig | None = None,
                     *, kind: str | None = None, model_name: str | None = None, sae_memory_mb: int = 4096) -> dict:
    """Evaluate every SAE folder at or under ``root``; write each folder's ``metrics.json`` and
    ``<root>/eval.json`` (the run-level summary); return the latter's contents.

    SAEs are loaded (with :func:`saescope.release.load_sae`) in groups of at most
    ``sae_memory_mb`` of parameters; each group shares one clean pass per batch, so a release
    that fits in one group (the usual case) computes the clean forward exactly once.  ``kind``
    names the site kind for folders whose config and path do not (Gemma Scope's).  Keys already
    in a ``metrics.json`` (e.g. training figures) are kept unless evaluation recomputes them.
    """
    from saescope.release import load_sae

    root = Path(root)
    t0 = time.time()
    entries = sorted((folder_site(f, read_json(f / "config.json"), kind), f) for f in find_sae_folders(root))
    device = str(next(model.parameters()).device)
    merged: dict = {"saes": {}, "sites": {}}
    group: dict[str, tuple[Site, SAE]] = {}
    group_bytes = 0

    def run_group():
        result = evaluate(model, corpus, group, cfg)
        merged["saes"].update(result["saes"])
        merged["sites"].update(result["sites"])
        merged["info"] = result["info"]
        group.clear()

    for site, folder in entries:
        sae = load_sae(folder, device=device)
        n_bytes = sum(p.numel() * p.element_size() for p in sae.parameters())
        if group and group_bytes + n_bytes > sae_memory_mb * 2**20:
            run_group()
            group_bytes = 0
        group[str(folder)] = (site, sae)
        group_bytes += n_bytes
    run_group()

    info = {**merged["info"], "model": model_name, "seconds": round(time.time() - t0, 1)}
    summary = {"info": info, "sites": merged["sites"], "saes": {}}
    for site, folder in entries:
        sae_metrics = merged["saes"][str(folder)]
        previous = read_json(folder / "metrics.json") or {}
        write_json(folder / "metrics.json", {**previous, **sae_metrics, "eval": info})
        relative = folder.relative_to(root).as_posix() if folder != root else "."
        summary["saes"][relative] = {"site": site.name, "d_sae": sae_metrics["d_sae"],
                                     **{k: sae_metrics.get(k) for k in SCALAR_METRICS}}
    write_json(root / "eval.json", summary)
    return summary
