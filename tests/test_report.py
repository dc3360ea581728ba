"""The report renders from a release folder of fake metrics: every plot present, every SAE in the table."""

from __future__ import annotations

import re

import numpy as np
import pytest

from saescope.jsonio import write_json
from saescope.evaluate.metrics import LOG10_DENSITY_EDGES
from saescope.evaluate.suite import position_bins
from saescope.report.data import canonical_entries, load_report_data
from saescope.report.html import write_report
from saescope.sites import SITE_KINDS, Site

SUBSETS = ["People", "Biology and health sciences", "Mathematics", "python docs"]
N_LAYERS = 6
L0S = (20, 60, 110, 300)


def fake_metrics(site: Site, l0: float, rng: np.random.Generator) -> dict:
    """Plausible numbers with the shape ``saescope.evaluate.suite`` writes."""
    hardness = {"resid_post": 1.0, "attn_z": 0.4, "mlp_out": 0.6}[site.kind] * (1 + site.layer / N_LAYERS)
    fvu = 0.3 * hardness * (100 / l0) ** 0.5
    delta = 0.05 * hardness * (100 / l0) ** 0.7
    scalars = {"l0": l0 * rng.uniform(0.9, 1.1), "fvu": fvu, "mse": fvu * 40 * (site.layer + 1), "cossim": 1 - fvu / 2,
               "l2_ratio": 0.95, "delta_loss": delta, "ce_loss_score": 1 - delta / 3, "kl_div": delta * 0.9,
               "frac_dead": 0.01, "frac_high_freq": 0.001, "ce_clean": 3.1, "ce_spliced": 3.1 + delta,
               "ce_zero_ablation": 6.0, "n_tokens": 5000}
    bins = position_bins(128)
    positions = np.array([b[0] for b in bins], dtype=float)
    d_sae = 1024
    density = 10 ** rng.normal(-2.5, 0.8, d_sae)
    counts, _ = np.histogram(np.clip(np.log10(density), -8, 0), bins=LOG10_DENSITY_EDGES)
    return {"eval": {
        "site": site.name, "d_in": 64, "d_sae": d_sae, **scalars,
        "by_subset": {s: {**scalars, "delta_loss": delta * (1 + 0.3 * i), "fvu": fvu * (1 + 0.1 * i)}
                      for i, s in enumerate(SUBSETS)},
        "by_position": {
            "position_start": [b[0] for b in bins], "position_end": [b[1] for b in bins],
            "n_tokens": [100] * len(bins), "mse": list(scalars["mse"] * (1 - 0.5 / positions)),
            "delta_loss": list(delta * np.log2(positions + 1) / 4), "fvu": [fvu] * len(bins),
        },
        "firing_histogram": {"log10_density_edges": list(LOG10_DENSITY_EDGES), "counts": counts.tolist(),
                             "n_dead": 3},
        "info": {"corpus": "fake"},
    }}


@pytest.fixture
def release(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "run" / "release"
    for kind in SITE_KINDS:
        for layer in range(N_LAYERS):
            for l0 in L0S:
                folder = root / kind / f"layer_{layer}" / "width_1k" / f"average_l0_{l0}"
                folder.mkdir(parents=True)
                (folder / "params.npz").write_bytes(b"")  # the report never reads parameters
                write_json(folder / "metrics.json", fake_metrics(Site(layer, kind), l0, rng))
    write_json(root / "eval.json", {"info": {"model": "gemma-3-270m", "corpus": "wiki-vital", "n_tokens": 5000}})
    # one SAE not evaluated yet: only the trainer's metrics.json
    fresh = root / "attn_z" / "layer_0" / "width_1k" / "average_l0_999"
    fresh.mkdir(parents=True)
    (fresh / "params.npz").write_bytes(b"")
    write_json(fresh / "metrics.json", {"training": {"fvu": 0.2, "l0": 999.0}})
    return root


def test_report_renders_with_every_plot_and_every_sae(release):
    page = write_report(release.parent)
    assert page == release.parent / "report" / "report.html"
    text = page.read_text()
    images = re.findall(r"<img src='([^']+)'", text)
    assert set(images) == {"delta_loss_vs_l0.png", "ce_recovered_vs_l0.png", "fvu_std_vs_l0.png", "fvu_vs_l0.png",
                           "canonical_by_layer.png", "by_position.png", "firing_frequency.png", "by_subset.png"}
    for name in images:
        png = page.parent / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
    n_saes = len(SITE_KINDS) * N_LAYERS * len(L0S)
    assert text.count("<tr class=\"canonical\">") == len(SITE_KINDS) * N_LAYERS
    assert len(re.findall(r'<td class="l" data-v="[a-z_]+ \d{4}">', text)) == n_saes
    assert "gemma-3-270m" in text and "1 SAE folders have no evaluation yet" in text
    # the hardest site by delta loss (resid_post, deepest layer) is named at the top
    assert re.search(r"Highest delta loss: <span class=\"hard\">layer_5/resid_post", text)


def test_canonical_is_l0_closest_to_target(release):
    data = load_report_data(release)
    site = Site(2, "mlp_out")
    assert abs(data.canonical[site].get("l0") - 100) < 20  # the average_l0_110 one
    fifty = canonical_entries(data.entries, target_l0=50)
    assert abs(fifty[site].get("l0") - 60) < 10
    assert abs(load_report_data(release, canonical_l0=300).canonical[site].get("l0") - 300) < 40
    # the run's own choice (canonical.json) wins when no target is given
    write_json(release / "canonical.json", {site.name: "mlp_out/layer_2/width_1k/average_l0_20"})
    data = load_report_data(release)
    assert data.canonical[site].path == "mlp_out/layer_2/width_1k/average_l0_20"
    assert abs(data.canonical[Site(3, "mlp_out")].get("l0") - 100) < 20


def test_report_without_subsets_or_evaluation(release, tmp_path):
    for metrics in release.rglob("metrics.json"):
        metrics.unlink()
    with pytest.raises(FileNotFoundError, match="saescope eval"):
        write_report(release)
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing")
