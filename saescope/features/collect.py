"""Collect what every latent of every SAE does, in one streaming pass over a corpus.

One model forward per batch serves all SAEs: every needed site is captured at once and the
forward stops after the deepest one (no logits).  Each SAE then encodes its site (a
transcoder: the MLP input it reads; its decoder rows write into ``mlp_out``) and feeds the
streaming collectors of :mod:`saescope.features.stats`: firing counts and histograms, the top-k
activating contexts, a uniform sample of contexts per activation octave, and a token -> latents
index.  After the pass, each latent's direct logit effect is computed from its decoder row
(:mod:`saescope.features.logits`) and everything is written to one SQLite file
(:mod:`saescope.features.store`).

Memory is bounded by one batch of activations for one SAE plus, per SAE, ``O(d_sae * (top_k +
n_octaves * samples) * window)`` float16 context windows, whatever the number of tokens.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from saescope.features.logits import LogitLens, fast_shortlist_dtype
from saescope.features.stats import (
    Events,
    LatentScale,
    OctaveSampler,
    RunningHistogram,
    RunningTopK,
    TokenIndex,
)
from saescope.features.store import DB_NAME, FeatureWriter
from saescope.features.token_text import token_bytes
from saescope.locks import folder_lock
from saescope.sites import Site, capture, check_sae_fits, io_sites

#: log10(frequency) bin edges of each SAE's latent-density histogram
DENSITY_EDGES = [round(-7 + 0.25 * i, 2) for i in range(29)]


@dataclass
class FeatureConfig:
    """What to keep per latent, and how to batch."""

    top_k: int = 16  # top activating contexts per latent
    n_octaves: int = 4  # activation octaves below the max that get a sample of contexts
    samples_per_octave: int = 3
    before: int = 10  # context window: tokens before and after the activating token
    after: int = 4
    hist_bins: int = 64  # power of two
    logit_tokens: int = 10  # promoted / suppressed tokens per latent
    fast_logits: bool = True  # bf16 shortlist + exact float32 re-score where bf16 is faster (logits.py)
    latents_per_token: int = 10  # entries per token id in the token -> latents index
    batch_tokens: int = 4096  # tokens per model forward (whole sequences, at least one)
    seed: int = 0
    progress: bool = True
    #: recorded for the browser's live text box: the model name to reload and the release root
    model_name: str | None = None
    release_root: str | None = None


class SAECollector:
    """All streaming collectors of one SAE."""

    def __init__(self, d_sae: int, vocab: np.ndarray, cfg: FeatureConfig, device: torch.device, seed: int):
        self.scale = LatentScale(d_sae, device)
        self.hist = RunningHistogram(d_sae, cfg.hist_bins, device)
        self.topk = RunningTopK(d_sae, cfg.top_k, cfg.before, cfg.after, device)
        self.samples = OctaveSampler(d_sae, cfg.n_octaves, cfg.samples_per_octave, cfg.before, cfg.after, device, seed)
        self.index = TokenIndex(torch.as_tensor(vocab), cfg.latents_per_token, device)

    def update(self, ev: Events, token_offset: int) -> None:
        old_exp_F = self.scale.update(ev)
        self.hist.update(ev, old_exp_F, self.scale.exp_F)
        self.topk.update(ev, token_offset)
        self.samples.update(ev, old_exp_F, self.scale.exp_F, token_offset)
        self.index.update(ev)


def _encode(sae, x_BTD: torch.Tensor) -> torch.Tensor:
    B, T, D = x_BTD.shape
    return sae.encode(x_BTD.reshape(B * T, D).to(sae.W_enc.dtype)).reshape(B, T, -1).float()


def _context_rows(sae_id, latent_C, kind_C, rank_C, act_C, token_C, window_CW, corpus, cfg):
    """Database rows for contexts: windows cut to the sequence and to the activating document."""
    T = corpus.input_ids.shape[1]
    seq_C, pos_C = token_C // T, token_C % T
    pos_CW = pos_C[:, None] + np.arange(-cfg.before, cfg.after + 1)
    inside_CW = (pos_CW >= 0) & (pos_CW < T)
    pos_clip = pos_CW.clip(0, T - 1)
    doc_CW = corpus.doc_ids[seq_C[:, None], pos_clip]
    same_doc_CW = inside_CW & (doc_CW == corpus.doc_ids[seq_C, pos_C][:, None])
    for i in range(len(latent_C)):
        keep = same_doc_CW[i]
        focus = int(keep[: cfg.before].sum())
        yield (
            sae_id, int(latent_C[i]), kind_C[i], int(rank_C[i]), float(act_C[i]), int(seq_C[i]), int(pos_C[i]),
            int(pos_C[i]) - focus, focus, window_CW[i][keep],
        )


def _write_sae(writer, name, site, sae, col: SAECollector, lens: LogitLens, corpus, n_tokens, release_path, cfg):
    F = sae.cfg.d_sae
    count = col.scale.count_F.cpu().numpy()
    freq = count / max(n_tokens, 1)
    with np.errstate(divide="ignore"):
        density, _ = np.histogram(np.log10(freq[count > 0]), bins=DENSITY_EDGES)
    info = {
        "average_l0": float(count.sum() / max(n_tokens, 1)),
        "dead": int((count == 0).sum()),
        "density_hist": density.tolist(),
        "density_edges": DENSITY_EDGES,
        "width": F,
    }
    sae_id = writer.add_sae(name, site, F, release_path, info)

    t0 = time.perf_counter()
    top_ids, top_vals, bot_ids, bot_vals = (t.numpy() for t in lens.effects(site, sae.W_dec.detach(), cfg.logit_tokens))
    logits_s = time.perf_counter() - t0
    mean = (col.scale.sum_F.cpu().numpy() / np.maximum(count, 1)).tolist()
    maxes = col.scale.max_F.cpu().numpy().tolist()
    exp = col.scale.exp_F.cpu().numpy()
    hist_max = np.where(count > 0, np.exp2(exp.clip(-126, 127).astype(np.float64)), 0.0).tolist()
    hist = col.hist.counts_FH.cpu().numpy()
    writer.add_latents(
        (
            sae_id, f, int(count[f]), float(freq[f]), maxes[f], mean[f], hist_max[f],
            np.trim_zeros(hist[f], "b").tolist(),
            [[int(t), round(float(v), 4)] for t, v in zip(top_ids[f], top_vals[f])],
            [[int(t), round(float(v), 4)] for t, v in zip(bot_ids[f], bot_vals[f])],
        )
        for f in range(F)
    )

    # top-k contexts
    val_FK = col.topk.value_FK.cpu().numpy()
    tok_FK = col.topk.token_FK.cpu().numpy()
    win_FKW = col.topk.window_FKW.float().cpu().numpy()
    lat, rank = (val_FK > 0).nonzero()
    writer.add_contexts(_context_rows(
        sae_id, lat, ["top"] * len(lat), rank, val_FK[lat, rank], tok_FK[lat, rank], win_FKW[lat, rank], corpus, cfg
    ))
    # octave samples, each octave's sample sorted by activation (largest first)
    s, n_oct = cfg.samples_per_octave, cfg.n_octaves
    tok_S = col.samples.token_S.cpu().numpy()
    val_S = col.samples.value_S.cpu().numpy()
    win_SW = col.samples.window_SW.float().cpu().numpy()
    slots = (tok_S >= 0).nonzero()[0]
    group = slots // s
    slots = slots[np.lexsort((-val_S[slots], group))]
    group = slots // s
    first = np.searchsorted(group, group)
    rank = np.arange(len(slots)) - first
    writer.add_contexts(_context_rows(
        sae_id, group // n_oct, [f"q{j}" for j in group % n_oct], rank, val_S[slots], tok_S[slots], win_SW[slots],
        corpus, cfg,
    ))
    # token -> latents index
    lat_VM = col.index.latent_VM.cpu().numpy()
    val_VM = col.index.value_VM.cpu().numpy()
    vocab = col.index.vocab.cpu().numpy()
    v, r = (lat_VM >= 0).nonzero()
    writer.add_token_latents(
        (sae_id, int(vocab[i]), int(j), int(lat_VM[i, j]), float(val_VM[i, j])) for i, j in zip(v, r)
    )
    return logits_s


def load_release_saes(root: Path | str, device: str = "cpu", *, kind: str | None = None
                      ) -> tuple[dict[str, tuple[Site, torch.nn.Module]], set[str]]:
    """Every SAE at or under a release folder, read through :func:`saescope.release.load_release`
    (so every folder ``saescope eval`` accepts, Gemma Scope's included): ``({name: (site, sae)},
    {model names in their configs})``; a name is the folder's path under ``root``."""
    from saescope.release.load import load_release

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"release folder {root} does not exist")
    released = load_release(root, kind=kind, device=device)
    models = {str(r.config["model"]) for r in released if r.config.get("model")}
    return {r.name: (r.site, r.sae) for r in released}, models


@torch.no_grad()
def collect_features(
    model,
    tokenizer,
    corpus,
    saes: dict[str, tuple[Site, torch.nn.Module]],
    out_dir: Path | str,
    cfg: FeatureConfig | None = None,
) -> Path:
    """Run ``corpus`` through ``model`` once and write ``out_dir/features.sqlite``.

    ``saes`` maps a name (the SAE's path under the release root, e.g.
    ``resid_post/layer_3/width_4k/average_l0_52``) to ``(site, sae)``; SAEs must be in release
    form (they encode raw site activations).  Returns the database path.  ``out_dir`` is locked
    meanwhile (a second writer is refused, naming this process).
    """
    cfg = cfg or FeatureConfig()
    if not saes:
        raise ValueError("no SAEs to collect features for")
    with folder_lock(out_dir, "feature folder"):
        return _collect(model, tokenizer, corpus, saes, Path(out_dir), cfg)


def _collect(model, tokenizer, corpus, saes, out_dir: Path, cfg: FeatureConfig) -> Path:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    for name, (site, sae) in saes.items():
        check_sae_fits(model, site, sae, name)
        sae.to(device)
    N, T = corpus.input_ids.shape
    seqs_per_batch = max(1, cfg.batch_tokens // T)
    vocab = np.unique(corpus.input_ids[corpus.keep_mask])
    collectors = {
        name: SAECollector(sae.cfg.d_sae, vocab, cfg, device, cfg.seed + i) for i, (name, (_, sae)) in enumerate(saes.items())
    }
    sites = sorted({io_sites(site)[0] for site, _ in saes.values()})  # what each SAE reads (a transcoder: mlp_in)

    t0 = time.perf_counter()
    n_tokens = 0
    bar = tqdm(total=int(corpus.keep_mask.sum()), unit="tok", desc="features", disable=not cfg.progress)
    for start in range(0, N, seqs_per_batch):
        ids_BT = torch.as_tensor(corpus.input_ids[start : start + seqs_per_batch], dtype=torch.long, device=device)
        keep_BT = torch.as_tensor(corpus.keep_mask[start : start + seqs_per_batch], device=device)
        acts = capture(model, sites, ids_BT)
        for name, (site, sae) in saes.items():
            ev = Events.from_acts(_encode(sae, acts[io_sites(site)[0]]), ids_BT, keep_BT)
            collectors[name].update(ev, token_offset=start * T)
        kept = int(keep_BT.sum())
        n_tokens += kept
        bar.update(kept)
    bar.close()
    timings = {"pass_s": time.perf_counter() - t0, "logits_s": 0.0}

    lens = LogitLens(model, fast_shortlist_dtype(device) if cfg.fast_logits else None)
    writer = FeatureWriter(out_dir / DB_NAME)
    try:
        t1 = time.perf_counter()
        for name, (site, sae) in saes.items():
            folder = Path(cfg.release_root) / name if cfg.release_root else None
            rel = os.path.relpath(folder, out_dir) if folder is not None and folder.is_dir() else None
            timings["logits_s"] += _write_sae(
                writer, name, site, sae, collectors[name], lens, corpus, n_tokens, rel, cfg
            )
        writer.add_sequences(corpus.input_ids)
        writer.add_vocab(lambda ids: [tokenizer.decode([i]) for i in ids], lambda ids: token_bytes(tokenizer, ids))
        timings["write_s"] = time.perf_counter() - t1 - timings["logits_s"]
        writer.set_meta(
            format_version=1, model=cfg.model_name, corpus=corpus.name, n_tokens=n_tokens, seq_len=T,
            window=[cfg.before, cfg.after], config=asdict(cfg),
            release_root=os.path.relpath(cfg.release_root, out_dir) if cfg.release_root else None,
            timings={k: round(v, 3) for k, v in timings.items()},
        )
    except BaseException:
        writer.db.close()
        writer.tmp.unlink(missing_ok=True)
        raise
    return writer.close()


def first_tokens(corpus, max_tokens: int | None):
    """The shortest prefix of ``corpus``'s sequences that holds ``max_tokens`` kept tokens."""
    if max_tokens is None or corpus.n_tokens <= max_tokens:
        return corpus
    n_seqs = int(np.searchsorted(np.cumsum(corpus.keep_mask.sum(axis=1)), max_tokens)) + 1
    fields = ("input_ids", "doc_ids", "subset_ids", "keep_mask")
    return replace(corpus, **{f: getattr(corpus, f)[:n_seqs] for f in fields})


def collect_release(
    release_root: Path | str,
    model,
    tokenizer,
    corpus,
    out_dir: Path | str,
    *,
    max_tokens: int | None = None,
    progress: bool = True,
    model_name: str | None = None,
    cfg: FeatureConfig | None = None,
) -> Path:
    """:func:`collect_features` for every SAE under a release folder (the pipeline's stage).

    ``max_tokens`` caps the corpus (whole sequences); the model name recorded for the browser's
    live box is ``model_name``, else the one the SAEs' configs agree on.
    """
    device = next(model.parameters()).device
    saes, models = load_release_saes(release_root, device=str(device))
    cfg = cfg or FeatureConfig()
    cfg = replace(
        cfg, progress=progress, release_root=str(Path(release_root).resolve()),
        model_name=model_name or cfg.model_name or (next(iter(models)) if len(models) == 1 else None),
    )
    return collect_features(model, tokenizer, first_tokens(corpus, max_tokens), saes, out_dir, cfg)
