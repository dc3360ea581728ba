"""Evaluate many SAEs on held-out tokens in one sweep over the corpus.

Two kinds of metrics, with very different costs:

* reconstruction (L0, FVU, MSE, cosine, L2 ratio, dead / high-frequency latents): computed
  inside the clean forward, where a hook at each site feeds the site's activations to every SAE
  of that site — one forward serves all SAEs, and nothing is stored;
* next-token loss (delta loss, CE loss score, KL): needs one forward per SAE with the SAE
  spliced in (and one zero-ablation forward per site).  Each starts at the site's block from the
  clean prefix cached in the clean pass (:mod:`saescope.forward`), with the SAE spliced
  by :class:`saescope.evaluate.splice.SpliceHook` — the splicing API's own hook.  CE and KL come
  from :class:`saescope.evaluate.lm_scores.CleanReference`, which never holds vocabulary-sized
  log-probabilities for more than one chunk.

On a small model the loss metrics dominate (Gemma 3 270M: a spliced forward costs more than
half a full forward, mostly the 262k-word head), so ``EvalConfig.loss_tokens`` can restrict them
to a seeded random share of the sequences while reconstruction metrics use every token.

What counts (formulas in :mod:`saescope.evaluate.metrics`; masks in :mod:`saescope.evaluate.batch`):
reconstruction at kept positions (``keep_mask``: not BOS, EOS or padding); next-token loss at
positions that are kept and whose next token belongs to a document; splicing and zero ablation
act on every position except the first (BOS) unless ``EvalConfig.splice_bos`` (zero ablation
also with ``EvalConfig.zero_ablate_bos``, SAEBench's convention); every metric also
per corpus subset and per position bin (1, 2–3, 4–7, … in the packed sequence).

A transcoder (site ``layer_L/transcoder``) is measured on its target: it reads ``mlp_in`` and
every reconstruction metric compares its prediction with ``mlp_out``; splicing replaces
``mlp_out`` by the prediction from the same forward's ``mlp_in``; zero ablation zeroes ``mlp_out``.
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
from saescope.evaluate.batch import Accumulators, Batch, ZeroHook, position_bins, scored_positions
from saescope.forward import matmul_weights_in, vocab_size
from saescope.evaluate.lm_scores import head_is_linear
from saescope.jsonio import read_json, write_json
from saescope.precision import autocast_dtype
from saescope.evaluate.splice import SpliceHook
from saescope.sae.base import SAE
from saescope.sites import Site, check_sae_fits
from saescope.tokens import TokenizedCorpus


@dataclass
class EvalConfig:
    #: next-token-loss metrics on sequences holding about this many scored tokens (a seeded
    #: random choice of whole sequences); None: every sequence.  Reconstruction metrics always
    #: use every kept token.
    loss_tokens: int | None = None
    seed: int = 0
    #: run a zero-ablation forward per site (needed for ce_loss_score)
    zero_ablation: bool = True
    #: also splice (and zero-ablate) the BOS position; off by default (module docstring)
    splice_bos: bool = False
    #: zero-ablate the BOS position too (SAELens's and SAEBench's zero ablation zeroes every
    #: position, while their splice leaves special tokens clean); splicing is unaffected
    zero_ablate_bos: bool = False
    #: sequences per forward; None: about ``batch_tokens`` tokens, fewer where a batch's
    #: latents (tokens × widest SAE) or kept clean log-probs (soft-capped or non-float32 heads
    #: only) would exceed ``memory_mb``
    batch_seqs: int | None = None
    batch_tokens: int = 8192
    #: budget for each big temporary (float32 tokens × vocabulary or tokens × latents), in MiB
    memory_mb: int = 1024
    #: precision of the model's forwards for the loss metrics: float32, or bfloat16 autocast
    #: (2–4× faster on CPUs with bf16 units and on GPUs; KL(fp32 ‖ bf16) of Gemma 3 270M itself
    #: is ~0.003 nats).  SAEs always run in float32; reconstruction metrics on the loss
    #: sequences see the autocast forward's activations.
    dtype: str = "float32"
    #: show a progress bar
    progress: bool = True

    def __post_init__(self):
        if self.loss_tokens is not None and self.loss_tokens < 1:
            raise ValueError(f"loss_tokens must be >= 1 (or None for all), got {self.loss_tokens}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.batch_seqs is not None and self.batch_seqs < 1:
            raise ValueError(f"batch_seqs must be >= 1, got {self.batch_seqs}")

    def sequences_per_batch(self, seq_len: int, n_vocab: int, d_sae: int, keeps_log_probs: bool) -> int:
        if self.batch_seqs is not None:
            return self.batch_seqs
        budget = self.memory_mb * 2**20
        n = min(self.batch_tokens // seq_len, budget // (seq_len * d_sae * 4))
        if keeps_log_probs:
            n = min(n, budget // (seq_len * n_vocab * 4))
        return int(max(1, n))

    def chunk_tokens(self, n_vocab: int) -> int:
        """Tokens per vocabulary-head chunk: a quarter of the memory budget per temporary (256
        on Gemma 3's 262k words at 1 GiB; 128 was 22% slower per scored token on 2 CPU cores,
        larger chunks no faster: ``benchmarks/eval.py --chunks``)."""
        return int(max(1, self.memory_mb * 2**20 // 4 // (n_vocab * 4)))


def loss_sequences(corpus: TokenizedCorpus, loss_tokens: int | None, seed: int = 0) -> np.ndarray:
    """(N,) bool: the sequences that get next-token-loss metrics — all, or a seeded random set
    of whole sequences holding at least ``loss_tokens`` scored positions (all if fewer exist)."""
    n = len(corpus)
    if loss_tokens is None:
        return np.ones(n, dtype=bool)
    scored_per_seq = scored_positions(corpus).sum(1)
    order = np.random.default_rng(seed).permutation(n)
    count = int(np.searchsorted(np.cumsum(scored_per_seq[order]), loss_tokens) + 1)
    chosen = np.zeros(n, dtype=bool)
    chosen[order[:count]] = True
    return chosen


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
    seq_len = corpus.input_ids.shape[1]
    n_vocab = vocab_size(model)
    widest = max(sae.cfg.d_sae for _, sae in saes.values())
    autocast = autocast_dtype(cfg.dtype, device)
    batch_seqs = cfg.sequences_per_batch(seq_len, n_vocab, widest,
                                         keeps_log_probs=not head_is_linear(model) or autocast is not None)
    chunk = cfg.chunk_tokens(n_vocab)
    scored = scored_positions(corpus)
    with_loss = loss_sequences(corpus, cfg.loss_tokens, cfg.seed)

    G_sub, bins = len(corpus.subsets) + 1, position_bins(seq_len)
    G_pos = max(len(bins), 1)
    acc: dict[str, Accumulators] = {}
    by_site: dict[Site, list[tuple[str, SAE]]] = {}
    for name, (site, sae) in saes.items():
        sae.to(device)
        acc[name] = Accumulators(sae, G_sub, G_pos, device)
        by_site.setdefault(site, []).append((name, sae))
    sites = sorted(by_site)
    observed = {site: [(sae, acc[name]) for name, sae in by_site[site]] for site in sites}
    zero = {site: (M.LossStats(G_sub, device), M.LossStats(G_pos, device)) for site in sites}

    def batches(mask):
        rows = np.flatnonzero(mask)
        return [rows[i:i + batch_seqs] for i in range(0, len(rows), batch_seqs)]

    loss_batches, recon_batches = batches(with_loss), batches(~with_loss)
    per_loss_batch = 1 + (len(sites) if cfg.zero_ablation else 0) + len(saes)
    bar = tqdm(total=len(loss_batches) * per_loss_batch + len(recon_batches), unit="fwd", desc="eval",
               disable=not cfg.progress)
    zero_hook = ZeroHook(skip_bos=not (cfg.splice_bos or cfg.zero_ablate_bos))
    with matmul_weights_in(model, autocast):  # bf16 copies of the weights only for the loss forwards
        for rows in loss_batches:
            batch = Batch(model, corpus, rows, scored, autocast)
            batch.observe(observed, with_loss=True, chunk=chunk)
            bar.update(1)
            for site in sites:
                if cfg.zero_ablation:
                    ce_M, kl_M = batch.run(site, zero_hook)
                    zero[site][0].update(batch.reference.ce_clean_M, ce_M, kl_M, batch.subset_M)
                    zero[site][1].update(batch.reference.ce_clean_M, ce_M, kl_M, batch.position_M)
                    bar.update(1)
                for name, sae in by_site[site]:
                    ce_M, kl_M = batch.run(site, SpliceHook(sae, skip_bos=not cfg.splice_bos, record=False))
                    acc[name].loss_subset.update(batch.reference.ce_clean_M, ce_M, kl_M, batch.subset_M)
                    acc[name].loss_position.update(batch.reference.ce_clean_M, ce_M, kl_M, batch.position_M)
                    bar.update(1)
            del batch
    for rows in recon_batches:
        Batch(model, corpus, rows, scored).observe(observed, with_loss=False, chunk=chunk)
        bar.update(1)
    bar.close()

    results = {name: _sae_metrics(site, sae, acc[name], *zero[site], corpus.subsets, bins)
               for name, (site, sae) in saes.items()}
    site_figures = {}
    for site in sites:
        _, ce_clean, ce_zero, kl = zero[site][0].means(merged=True)[0]
        site_figures[site.name] = {"ce_clean": ce_clean, "ce_zero_ablation": ce_zero,
                                   "delta_loss_zero_ablation": ce_zero - ce_clean, "kl_div_zero_ablation": kl}
    info = {
        "corpus": corpus.name,
        "n_sequences": len(corpus),
        "seq_len": int(seq_len),
        "n_tokens": corpus.n_tokens,
        "n_loss_tokens": int(scored[with_loss].sum()),
        "loss_sequences": int(with_loss.sum()),
        "subsets": list(corpus.subsets),
        "zero_ablation": cfg.zero_ablation,
        "splice_bos": cfg.splice_bos,
        "zero_ablate_bos": cfg.zero_ablate_bos or cfg.splice_bos,
        "batch_seqs": batch_seqs,
    }
    return {"saes": results, "sites": site_figures, "info": info}


def _sae_metrics(site: Site, sae: SAE, t: Accumulators, zero_subset: M.LossStats, zero_position: M.LossStats,
                 subsets: list[str], bins: list[tuple[int, int]]) -> dict:
    out: dict = {"site": site.name, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                 **({"d_out": sae.cfg.d_out} if sae.is_transcoder else {})}
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
    names = ("n_tokens", "l0", "fvu", "fvu_std", "mse", "cossim", "l2_ratio", "n_loss_tokens", "delta_loss", "kl_div",
             "ce_loss_score")
    out["by_position"] = {
        "position_start": [b[0] for b in bins],
        "position_end": [b[1] for b in bins],
        **{k: [row.get(k, 0 if k.startswith("n_") else math.nan) for row in per_bin] for k in names},
    }
    out["firing_histogram"] = M.firing_histogram(t.recon_subset.firing_counts(), out.get("n_tokens", 0))
    out["saebench"] = M.saebench_core(out)
    return out


def prefix_key(folder, m: int) -> str:
    """The evaluation name of a Matryoshka SAE's prefix of width ``m``."""
    return f"{folder}#prefix{m}"


#: the scalar metrics, in the order tables show them
SCALAR_METRICS = ("l0", "fvu", "fvu_std", "mse", "cossim", "l2_ratio", "delta_loss", "ce_loss_score", "kl_div",
                  "frac_dead", "frac_high_freq", "ce_clean", "ce_spliced", "ce_zero_ablation",
                  # SAEBench's core figures not above (metrics.json's "saebench" block has them all)
                  "explained_variance", "kl_div_score", "kl_div_with_ablation", "relative_reconstruction_bias",
                  "l1", "l2_norm_in", "l2_norm_out", "frac_alive")


def evaluate_release(root: str | Path, model: nn.Module, corpus: TokenizedCorpus, cfg: EvalConfig | None = None,
                     *, kind: str | None = None, model_name: str | None = None, sae_memory_mb: int = 4096) -> dict:
    """Evaluate every SAE folder at or under ``root``; write each folder's ``metrics.json`` and
    ``<root>/eval.json`` (the run-level summary); return the latter's contents.

    SAEs are read through :mod:`saescope.release` in groups of at most ``sae_memory_mb`` of
    parameters; each group shares one clean pass per batch, so a release that fits in one group
    (the usual case) computes the clean forward exactly once.  ``kind`` names the site kind for
    folders whose config and path do not (Gemma Scope's).  Each folder's ``metrics.json`` gets its
    ``eval`` section (the metrics, and ``info``: on what); its ``training`` section is kept.
    The release is locked meanwhile (no second eval or release writes it at the same time).
    """
    from saescope.locks import folder_lock

    if not Path(root).exists():
        raise FileNotFoundError(f"release folder {root} does not exist")
    with folder_lock(root, "release"):
        return _evaluate_release(Path(root), model, corpus, cfg, kind, model_name, sae_memory_mb)


def _evaluate_release(root: Path, model, corpus, cfg, kind, model_name, sae_memory_mb) -> dict:
    from saescope.release.layout import find_sae_folders, folder_site
    from saescope.release.load import read_release_folder
    from saescope.release.metrics import write_section

    t0 = time.time()
    entries = []
    for folder in find_sae_folders(root):
        entries.append((folder_site(folder, read_json(folder / "config.json"), kind), folder))
    entries.sort()
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

    prefixes: dict[str, list[int]] = {}
    targets: dict[str, float] = {}
    for site, folder in entries:
        released = read_release_folder(folder, root, kind=kind, device=device)
        sae = released.sae
        check_sae_fits(model, site, sae, str(folder))
        # a Matryoshka SAE: each nested dictionary is evaluated as an SAE of its own
        widths = [int(m) for m in released.config.get("matryoshka_prefixes") or []]
        parts = {str(folder): sae, **{prefix_key(folder, m): sae.prefix(m) for m in widths}}
        if widths:
            prefixes[str(folder)] = widths
        if released.config.get("target_l0") is not None:
            targets[str(folder)] = float(released.config["target_l0"])
        n_bytes = sum(p.numel() * p.element_size() for part in parts.values() for p in part.parameters())
        if group and group_bytes + n_bytes > sae_memory_mb * 2**20:
            run_group()
            group_bytes = 0
        group.update({key: (site, part) for key, part in parts.items()})
        group_bytes += n_bytes
    run_group()

    info = {**merged["info"], "model": model_name, "seconds": round(time.time() - t0, 1)}
    summary = {"info": info, "sites": merged["sites"], "saes": {}}
    from saescope.errors import warn
    from saescope.train.l0_check import TOLERANCE, target_miss

    for site, folder in entries:
        sae_metrics = merged["saes"][str(folder)]
        if str(folder) in prefixes:  # each prefix's scalar metrics, by width
            sae_metrics["prefixes"] = {
                str(m): {"d_sae": m, **{k: merged["saes"][prefix_key(folder, m)].get(k) for k in SCALAR_METRICS}}
                for m in prefixes[str(folder)]}
        if str(folder) in targets:  # Gemma Scope 2's target L0 against the held-out L0
            target = targets[str(folder)]
            sae_metrics["target_l0"] = target
            sae_metrics["l0_vs_target"] = target_miss(sae_metrics["l0"], target)
            if abs(sae_metrics["l0_vs_target"]) > TOLERANCE:
                warn(f"{folder}: held-out L0 {sae_metrics['l0']:.1f} misses its target {target:g} by "
                     f"{sae_metrics['l0_vs_target']:+.0%} (tolerance ±{TOLERANCE:.0%})")
        write_section(folder, "eval", {**sae_metrics, "info": info})
        relative = folder.relative_to(root).as_posix() if folder != root else "."
        summary["saes"][relative] = {"site": site.name, "d_sae": sae_metrics["d_sae"],
                                     **{k: sae_metrics.get(k) for k in SCALAR_METRICS},
                                     **{k: sae_metrics[k] for k in ("target_l0", "prefixes") if k in sae_metrics}}
    write_json(root / "eval.json", summary)
    return summary
