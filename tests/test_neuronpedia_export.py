"""Neuronpedia export: the field lists SAE-Dashboard's exporter writes, filled from the feature database.

The field names are those of ``NeuronpediaDashboardBatch.to_dict``, ``NeuronpediaDashboardFeature.to_dict``
and ``NeuronpediaDashboardActivation.to_dict`` in SAE-Dashboard 0.8.0's
``sae_dashboard/neuronpedia/neuronpedia_dashboard.py``; the top group's bin marks (−1, max, −1)
are ``NeuronpediaConverter._parse_sequence_group_title``'s in ``neuronpedia_converter.py``.  The
last test loads every batch with that module's own classes.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import build_tiny_model
from test_features_server import build_run

from saescope.features.neuronpedia import (
    ACTIVATION_FIELDS,
    BATCH_FIELDS,
    FEATURE_FIELDS,
    NeuronpediaConfig,
    export_neuronpedia,
)
from saescope.features.store import FeatureStore

#: NeuronpediaDashboardFeature.to_dict()'s keys, as SAE-Dashboard's source lists them
SAE_DASHBOARD_FEATURE_KEYS = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson", "neg_str",
    "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
    "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations", "vector",
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root, model, tokenizer, saes = build_run(tmp_path_factory.mktemp("np"), build_tiny_model)
    out = root / "np"
    written = export_neuronpedia(root, out, NeuronpediaConfig(batch_size=20, logit_bins=10, logit_stride=2),
                                 model=model, saes_by_name={n: s for n, (_, s) in saes.items()})
    return root, out, written, model


def test_field_lists_match_sae_dashboard(exported):
    _, _, written, _ = exported
    assert set(FEATURE_FIELDS) == SAE_DASHBOARD_FEATURE_KEYS
    for path in written:
        batch = json.loads(path.read_text())
        assert tuple(batch) == BATCH_FIELDS and isinstance(batch["layer"], int)
        for feature in batch["features"]:
            assert tuple(feature) == FEATURE_FIELDS
            for activation in feature["activations"]:
                assert tuple(activation) == ACTIVATION_FIELDS
                assert len(activation["tokens"]) == len(activation["values"]) > 0


def test_values_come_from_the_feature_database(exported):
    root, out, written, model = exported
    store = FeatureStore(root)
    (sae,) = [s for s in store.saes() if s["name"].startswith("resid_post/layer_1/")]
    batches = sorted((out / sae["name"]).glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    assert len(batches) == math.ceil(sae["d_sae"] / 20)
    features = [f for b in batches for f in json.loads(b.read_text())["features"]]
    assert [f["feature_index"] for f in features] == list(range(sae["d_sae"]))
    vocab = model.get_output_embeddings().weight.shape[0]
    checked = 0
    for f in features:
        card = store.latent(sae["sae"], f["feature_index"], raw_tokens=True)
        assert f["frac_nonzero"] == pytest.approx(card["frequency"])
        assert f["pos_str"] == [t for t, _ in card["top_logits"]] and f["neg_str"] == [t for t, _ in card["bottom_logits"]]
        assert sum(f["freq_hist_data_bar_heights"]) == sum(card["histogram"])
        assert sum(f["logits_hist_data_bar_heights"]) == math.ceil(vocab / 2)  # every other token
        assert f["n_tokens_in_prompt"] == store.meta["seq_len"]
        tops = [a for a in f["activations"] if a["bin_min"] == -1]
        assert len(tops) == sum(c["kind"] == "top" for c in card["contexts"])
        for a in tops:
            # the examples are stored as float16 (relative rounding ≤ 2^-11)
            assert a["bin_contains"] == -1 and max(a["values"]) <= a["bin_max"] * (1 + 2e-3) + 1e-3
        for a in f["activations"]:
            if a["bin_min"] != -1:
                assert 0 <= a["bin_min"] < a["bin_max"] and 0 <= a["bin_contains"] <= 1
        checked += bool(tops)
    assert checked > 0


def test_cli_refuses_unknown_sae_names(exported, tmp_path):
    from saescope.cli import main

    root, _, _, _ = exported
    with pytest.raises(ValueError, match="no SAE named"):
        export_neuronpedia(root, tmp_path / "x", NeuronpediaConfig(logit_bins=0), sae_names=["nope"])
    assert main(["export", "--format", "neuronpedia", str(root), str(tmp_path / "y"), "--no-logit-histograms",
                 "--sae", "attn_z/layer_1/width_64/average_l0_9"]) == 0
    assert len(list((tmp_path / "y" / "attn_z" / "layer_1" / "width_64" / "average_l0_9").glob("batch-*.json"))) == 1


def _sae_dashboard_module():
    """SAE-Dashboard's own ``neuronpedia_dashboard.py`` (it needs only numpy), read from its wheel:
    the package itself pins transformers < 4.57 and TransformerLens, which do not install beside
    this project's, so .ci/run downloads the wheel (no dependencies) and this test imports that one file."""
    import os
    import types
    import zipfile
    from pathlib import Path

    wheels = sorted((Path(os.environ.get("SAESCOPE_PEERS", "/work/peers")) / "wheels").glob("sae_dashboard-*.whl"))
    if not wheels:
        if os.environ.get("CI"):
            pytest.fail("no sae_dashboard wheel: .ci/run downloads it into $SAESCOPE_PEERS/wheels")
        pytest.skip("no sae_dashboard wheel in $SAESCOPE_PEERS/wheels (pip download --no-deps sae-dashboard==0.8.0)")
    with zipfile.ZipFile(wheels[-1]) as whl:
        source = whl.read("sae_dashboard/neuronpedia/neuronpedia_dashboard.py").decode()
    module = types.ModuleType("neuronpedia_dashboard")
    exec(compile(source, f"{wheels[-1].name}/sae_dashboard/neuronpedia/neuronpedia_dashboard.py", "exec"),
         module.__dict__)
    return module


def test_sae_dashboards_own_classes_load_the_batches(exported):
    """NeuronpediaDashboardBatch(**batch).to_dict() gives back exactly what was written."""
    module = _sae_dashboard_module()
    _, _, written, _ = exported
    for path in written:
        batch = json.loads(path.read_text())
        parsed = module.NeuronpediaDashboardBatch(**batch)
        assert parsed.to_dict() == batch  # every field theirs, none lost or added
        # (their Batch.__eq__ reads a missing attribute, other.sae, so features are compared one by one)
        again = module.NeuronpediaDashboardBatch(**json.loads(path.read_text()))
        assert all(a == b for a, b in zip(parsed.features, again.features))
