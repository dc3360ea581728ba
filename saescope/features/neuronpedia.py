"""Neuronpedia's feature-dashboard JSON, written from the feature database ``saescope features`` made.

Neuronpedia imports batches of features as SAE-Dashboard's exporter writes them
(sae-dashboard 0.8.0, ``sae_dashboard/neuronpedia/neuronpedia_dashboard.py``:
``NeuronpediaDashboardBatch`` → ``{model_id, layer, sae_set, features, sae_id_suffix}``, each feature a ``NeuronpediaDashboardFeature.to_dict()``
and each activation example a ``NeuronpediaDashboardActivation.to_dict()``).  One folder per SAE
under the output, ``batch-<i>.json`` files of ``batch_size`` features each.  What each field holds:

* ``feature_index``: the latent; ``frac_nonzero``: its firing frequency on the scanned tokens;
* ``activations``: the top examples (``bin_min`` −1, ``bin_max`` the latent's max, ``bin_contains``
  −1, as SAE-Dashboard marks its top group) and the per-octave samples (``bin_min``/``bin_max`` the
  octave's range, ``bin_contains`` the share of firing events in it), each with its ``tokens`` (one
  string per token, as the tokenizer decodes it alone), ``values`` (the latent's activation on
  each) and ``qualifying_token_index`` (the token the example was chosen for);
* ``freq_hist_data_bar_values``/``_heights``: the activation histogram (bin centres, counts);
* ``pos_str``/``pos_values``, ``neg_str``/``neg_values``: the direct logit effect's top and bottom
  tokens; ``logits_hist_data_bar_values``/``_heights``: the histogram of the effect over the
  vocabulary, from a strided sample of it (every ``logit_stride``-th token; the model is needed);
* ``vector``: the latent's decoder row (raw units), when the decoder was read (with the logit
  histograms);
* neuron-alignment and correlation tables are left empty (saescope does not compute them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saescope.features.store import FeatureStore

#: every key NeuronpediaDashboardFeature.to_dict() writes, in its order
FEATURE_FIELDS = (
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
    "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations", "vector",
)
ACTIVATION_FIELDS = ("bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index")
BATCH_FIELDS = ("model_id", "layer", "sae_set", "features", "sae_id_suffix")


@dataclass
class NeuronpediaConfig:
    #: features per batch file
    batch_size: int = 128
    #: the source set's name on Neuronpedia (default: saescope-<kind>-<width>)
    sae_set: str | None = None
    #: the model id on Neuronpedia (default: the model the features were collected on)
    model_id: str | None = None
    #: bins of the logit-effect histogram (0: leave it empty; no model needed then)
    logit_bins: int = 40
    #: the histogram reads every this-many-th vocabulary token
    logit_stride: int = 8


def _round(values) -> list[float]:
    return [round(float(v), 3) for v in values]


def _activation_histogram(card: dict) -> tuple[list[float], list[float]]:
    counts = card["histogram"]
    width = card["hist_max"] / max(len(counts), 1)
    return _round((i + 0.5) * width for i in range(len(counts))), [float(c) for c in counts]


def _octave_range(card: dict, j: int) -> tuple[float, float, float]:
    """(lo, hi, share of firing events) of octave j of the latent's range (the browser's rule)."""
    hi = card["hist_max"] / 2**j
    lo = 0.0 if j == card["n_octaves"] - 1 else hi / 2
    counts = np.asarray(card["histogram"], dtype=np.float64)
    edges = np.linspace(0.0, card["hist_max"], len(counts) + 1)
    inside = counts[(edges[:-1] >= lo - 1e-12) & (edges[1:] <= hi + 1e-12)].sum()
    return lo, hi, float(inside / counts.sum()) if counts.sum() else 0.0


def feature_json(card: dict, meta: dict, logits_hist, vector=None) -> dict:
    """One latent's card from :meth:`FeatureStore.latent` in Neuronpedia's feature layout."""
    activations = []
    for c in card["contexts"]:
        if c["kind"] == "top":
            bin_min, bin_max, contains = -1.0, float(card["max_act"]), -1.0
        else:
            bin_min, bin_max, contains = _octave_range(card, int(c["kind"][1:]))
        activations.append({"bin_min": bin_min, "bin_max": bin_max, "bin_contains": contains,
                            "tokens": list(c["tokens_raw"]), "values": _round(c["acts"]),
                            "qualifying_token_index": int(c["focus"])})
    bar_values, bar_heights = _activation_histogram(card)
    logit_values, logit_heights = logits_hist if logits_hist is not None else ([], [])
    seq_len = int(meta.get("seq_len") or 0)
    return {
        "feature_index": int(card["latent"]),
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": [t for t, _ in card["bottom_logits"]], "neg_values": _round(v for _, v in card["bottom_logits"]),
        "pos_str": [t for t, _ in card["top_logits"]], "pos_values": _round(v for _, v in card["top_logits"]),
        "frac_nonzero": float(card["frequency"]),
        "freq_hist_data_bar_values": bar_values, "freq_hist_data_bar_heights": bar_heights,
        "logits_hist_data_bar_heights": logit_heights, "logits_hist_data_bar_values": logit_values,
        "n_prompts_total": int(math.ceil(int(meta.get("n_tokens") or 0) / seq_len)) if seq_len else 0,
        "n_tokens_in_prompt": seq_len,
        "dataset": str(meta.get("corpus") or ""),
        "decoder_weights_dist": [],
        "activations": activations,
        "vector": _round(vector) if vector is not None else [],
    }


@torch.no_grad()
def logit_histograms(model, site, W_dec_FD: torch.Tensor, bins: int, stride: int, chunk: int = 256):
    """Per latent (bin centres, counts) of its direct logit effect over every ``stride``-th token."""
    from saescope.features.logits import _apply_norm, residual_directions
    from saescope.sites import adapter_for

    W_U = model.get_output_embeddings().weight[::stride].float()
    norm = adapter_for(model).final_norm(model)
    out = []
    for start in range(0, W_dec_FD.shape[0], chunk):
        dirs = _apply_norm(norm, residual_directions(model, site, W_dec_FD[start : start + chunk].float()))
        effect_CV = dirs @ W_U.T
        lo, hi = effect_CV.amin(1, keepdim=True), effect_CV.amax(1, keepdim=True)
        scale = bins / (hi - lo).clamp_min(1e-12)
        idx = ((effect_CV - lo) * scale).long().clamp_(0, bins - 1)
        counts = torch.zeros(effect_CV.shape[0], bins).scatter_add_(1, idx, torch.ones_like(effect_CV))
        width = (hi - lo) / bins
        centres = lo + width * (torch.arange(bins) + 0.5)
        out += [(_round(c), [float(h) for h in n]) for c, n in zip(centres.tolist(), counts.tolist())]
    return out


def export_neuronpedia(features: str | Path, out: str | Path, cfg: NeuronpediaConfig | None = None,
                       model=None, sae_names: list[str] | None = None, saes_by_name: dict | None = None) -> list[Path]:
    """Write every SAE of the feature database at ``features`` (a run, its features folder or the
    file) — or those named in ``sae_names`` — as Neuronpedia batch files under ``out``.
    ``model`` (for the logit histograms) is loaded from the database's meta when not given; each
    SAE's decoder comes from ``saes_by_name`` or else its release folder."""
    from saescope.jsonio import write_json
    from saescope.release.load import load_sae
    from saescope.sites import Site

    cfg = cfg or NeuronpediaConfig()
    store = FeatureStore(features)
    meta = store.meta
    saes = store.saes()
    if sae_names is not None:
        unknown = sorted(set(sae_names) - {s["name"] for s in saes})
        if unknown:
            raise ValueError(f"no SAE named {', '.join(unknown)} in {store.path}")
        saes = [s for s in saes if s["name"] in sae_names]
    if cfg.logit_bins and model is None:
        from saescope.models import load_model

        model = load_model(meta["model"])[0]
    written = []
    for sae in saes:
        histograms, W_dec = None, None
        if cfg.logit_bins:
            if saes_by_name and sae["name"] in saes_by_name:
                W_dec = saes_by_name[sae["name"]].W_dec
            elif sae.get("release_path"):
                W_dec = load_sae(store.path.parent / sae["release_path"]).W_dec
            else:
                raise ValueError(f"SAE {sae['name']} has no release folder recorded, so its decoder (for the logit "
                                 "histograms) cannot be read; pass logit_bins=0 (--no-logit-histograms)")
            histograms = logit_histograms(model, Site.parse(sae["site"]), W_dec, cfg.logit_bins, cfg.logit_stride)
        folder = Path(out) / sae["name"]
        folder.mkdir(parents=True, exist_ok=True)
        set_name = cfg.sae_set or f"saescope-{sae['kind']}-{sae['d_sae']}"
        batches = [[]]
        for latent in range(sae["d_sae"]):
            card = store.latent(sae["sae"], latent, raw_tokens=True)
            if card is not None:
                if len(batches[-1]) == cfg.batch_size:
                    batches.append([])
                batches[-1].append(feature_json(card, meta, histograms[latent] if histograms else None,
                                                W_dec[latent].tolist() if W_dec is not None else None))
        for i, features_out in enumerate(b for b in batches if b):
            path = folder / f"batch-{i}.json"
            write_json(path, {"model_id": cfg.model_id or meta["model"], "layer": int(sae["layer"]),
                              "sae_set": set_name, "features": features_out, "sae_id_suffix": None})
            written.append(path)
    return written
