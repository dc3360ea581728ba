"""Gemma Scope 2's release layout: hand-made folders (lowercase keys, with and without
config.json) load and predict by the formula; our writer round-trips through our reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from saescope.activations.source import InMemorySource
from saescope.release import find_sae_folders, folder_site, load_release, load_sae, read_release_folder
from saescope.release.gemma_scope_2 import folder_path, l0_label, site_of_hooks
from saescope.sites import Site
from saescope.train.recipe import Recipe
from saescope.train.run import train_and_release
from saescope.train.spec import SAESpec
from saescope.train.trainer import Trainer, TrainOptions


def gs2_arrays(d_in=6, d_sae=16384, d_out=None, seed=0, skip=False):
    rng = np.random.default_rng(seed)
    d_out = d_out or d_in
    arrays = {
        "w_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "w_dec": rng.normal(size=(d_sae, d_out)).astype(np.float32),
        "b_enc": (rng.normal(size=d_sae) * 0.1).astype(np.float32),
        "b_dec": rng.normal(size=d_out).astype(np.float32),
        "threshold": rng.uniform(0.5, 1.5, size=d_sae).astype(np.float32),
    }
    if skip:
        arrays["affine_skip_connection"] = rng.normal(size=(d_in, d_out)).astype(np.float32)
    return arrays


def by_the_formula(arrays, x):
    pre = x @ arrays["w_enc"] + arrays["b_enc"]
    f = np.maximum(pre, 0) * (pre > arrays["threshold"])
    y = f @ arrays["w_dec"] + arrays["b_dec"]
    if "affine_skip_connection" in arrays:
        y = y + x @ arrays["affine_skip_connection"]
    return f, y


def assert_predicts(actual, expected):
    """float32 sums over thousands of active latents: compare to 1e-5 of the output's scale."""
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


def make_folder(root, path, arrays, config=None):
    folder = root / path
    folder.mkdir(parents=True)
    save_file(arrays, str(folder / "params.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


GS2_CONFIG = {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "width": "16k", "l0": 18,
              "hf_hook_point_in": "model.layers.5.output"}


@pytest.mark.parametrize("with_config", [True, False])
@pytest.mark.parametrize("folder_kind, hook, kind", [
    ("resid_post", "model.layers.5.output", "resid_post"),
    ("attn_out", "model.layers.5.self_attn.o_proj.input", "attn_z"),
    ("mlp_out", "model.layers.5.post_feedforward_layernorm.output", "mlp_out"),
])
def test_hand_made_folder_loads_and_predicts_by_the_formula(tmp_path, with_config, folder_kind, hook, kind):
    arrays = gs2_arrays()
    config = {**GS2_CONFIG, "hf_hook_point_in": hook} if with_config else None
    folder = make_folder(tmp_path / "gemma-scope-2-270m-pt", f"{folder_kind}/layer_5_width_16k_l0_small", arrays, config)

    record = read_release_folder(folder)
    sae = record.sae
    assert sae.architecture == "jumprelu" and sae.cfg.centre_input is False
    assert record.site == Site(5, kind) and folder_site(folder) == Site(5, kind)
    assert record.config["layout"] == "gemma-scope-2" and record.config["l0_label"] == "small"
    if with_config:
        assert record.config["model"] == "google/gemma-3-270m"  # SAELens's reading of the name
    x = np.random.default_rng(1).normal(size=(9, 6)).astype(np.float32) * 2
    f, y = by_the_formula(arrays, x)
    assert (f > 0).sum() > 0
    with torch.no_grad():
        np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), f, rtol=1e-5, atol=1e-5)
        assert_predicts(sae(torch.from_numpy(x)).numpy(), y)


def test_a_release_tree_of_gs2_folders_is_found_and_loaded(tmp_path):
    root = tmp_path / "gemma-scope-2-270m-pt"
    make_folder(root, "resid_post/layer_0_width_16k_l0_big", gs2_arrays(seed=1))
    make_folder(root, "resid_post_all/layer_3_width_16k_l0_medium", gs2_arrays(seed=2))
    make_folder(root, "attn_out/layer_2_width_16k_l0_small", gs2_arrays(seed=3))
    assert len(find_sae_folders(root)) == 3
    records = load_release(root)
    assert sorted(str(r.site) for r in records) == ["layer_0/resid_post", "layer_2/attn_z", "layer_3/resid_post"]
    assert {r.config["l0_label"] for r in records} == {"small", "medium", "big"}


def test_l0_labels_names_and_hooks():
    assert [l0_label(v) for v in (0, 10, 20, 24.9, 25, 50, 60, 74.9, 75, 90, 150, 1000)] == [
        "small", "small", "small", "small", "medium", "medium", "medium", "medium", "big", "big", "big", "big"]
    with pytest.raises(ValueError, match="L0"):
        l0_label(float("nan"))
    assert folder_path("/r", Site(6, "attn_z"), 16384, 60).as_posix() == "/r/attn_out/layer_6_width_16k_l0_medium"
    assert folder_path("/r", Site(6, "resid_post"), 2**18, 20).as_posix() == "/r/resid_post/layer_6_width_262k_l0_small"
    assert site_of_hooks("model.layers.11.self_attn.o_proj.input") == Site(11, "attn_z")
    with pytest.raises(ValueError, match="not a site saescope knows"):
        site_of_hooks("model.layers.3.mlp.down_proj.output")


def test_inconsistent_gs2_folders_give_clear_errors(tmp_path):
    bad_width = make_folder(tmp_path, "resid_post/layer_1_width_65k_l0_small", gs2_arrays())
    with pytest.raises(ValueError, match="width_65k"):
        load_sae(bad_width)
    skip_on_sae = make_folder(tmp_path, "mlp_out/layer_1_width_16k_l0_small", gs2_arrays(skip=True))
    with pytest.raises(ValueError, match="only transcoders"):
        load_sae(skip_on_sae)
    bad_hook = make_folder(tmp_path, "x/sae", gs2_arrays(), {**GS2_CONFIG, "hf_hook_point_in": "model.layers.1.mlp.output"})
    with pytest.raises(ValueError, match="not a site saescope knows"):
        load_sae(bad_hook)


def test_our_writer_round_trips_through_our_reader(tmp_path):
    torch.manual_seed(0)
    sites = {Site(1, "resid_post"): torch.randn(2048, 8) * 3, Site(1, "attn_z"): torch.randn(2048, 8)}
    specs = [SAESpec(site=s, architecture="jumprelu", d_sae=1024, sparsity_coefficient=c, seed=0)
             for s in sites for c in (1e-3, 3e-3)]
    recipe = Recipe.for_steps(8, batch_size=256, lr=1e-3)
    trainer = Trainer(InMemorySource(sites), specs, recipe, tmp_path, n_steps=8, model_name="tiny",
                      options=TrainOptions(progress=False, release_layout="gemma-scope-2"))
    folders = train_and_release(trainer)
    assert len(folders) == 4
    names = sorted(f.relative_to(tmp_path / "release").as_posix() for f in folders)
    kinds = {n.split("/")[0] for n in names}
    assert kinds == {"resid_post", "attn_out"}
    for folder in folders:
        assert folder.name.startswith("layer_1_width_1k_l0_"), folder
        params = load_file(folder / "params.safetensors")
        assert sorted(params) == ["b_dec", "b_enc", "threshold", "w_dec", "w_enc"]
        assert not (folder / "params.npz").exists()
        config = json.loads((folder / "config.json").read_text())
        assert config["architecture"] == "jump_relu" and config["model_name"] == "tiny"
        assert config["hf_hook_point_in"].startswith("model.layers.1.") and config["width"] == "1k"
        assert config["saescope"]["site"] in ("layer_1/resid_post", "layer_1/attn_z")
        record = read_release_folder(folder)
        assert record.site == Site.parse(config["saescope"]["site"])
        assert record.metrics["training"]["average_l0"] == pytest.approx(config["l0"], abs=0.01)
        assert config["l0_label"] == l0_label(config["l0"])
        x = sites[record.site][:64]
        arrays = {k: v for k, v in params.items()}
        _, y = by_the_formula(arrays, x.numpy())
        with torch.no_grad():
            assert_predicts(record.sae(x).numpy(), y)
    # two SAEs of one site whose L0s share a label get distinct folders
    assert len(set(names)) == 4


def test_a_gs2_repo_path_loads_from_the_local_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo, inside, commit = "google/gemma-scope-2-270m-pt", "resid_post/layer_5_width_16k_l0_small", "89abcdef" * 5
    repo_dir = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    arrays = gs2_arrays(seed=4)
    make_folder(repo_dir / "snapshots" / commit, inside, arrays, GS2_CONFIG)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing may touch the network here

    sae = load_sae(f"{repo}/{inside}")
    x = np.random.default_rng(2).normal(size=(4, 6)).astype(np.float32)
    with torch.no_grad():
        assert_predicts(sae(torch.from_numpy(x)).numpy(), by_the_formula(arrays, x)[1])
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        load_sae(f"{repo}/resid_post/layer_6_width_16k_l0_small")


def test_target_l0_runs_are_labelled_by_their_targets(tmp_path):
    torch.manual_seed(0)
    sites = {Site(2, "mlp_out"): torch.randn(2048, 8) * 2}
    specs = [SAESpec(site=Site(2, "mlp_out"), architecture="jumprelu", d_sae=1024, sparsity_coefficient=0.01,
                     target_l0=t, seed=0) for t in (20, 60, 150)]
    trainer = Trainer(InMemorySource(sites), specs, Recipe.for_steps(4, batch_size=256, lr=1e-3), tmp_path, n_steps=4,
                      model_name="tiny", options=TrainOptions(progress=False, release_layout="gemma-scope-2"))
    folders = train_and_release(trainer)
    assert [f.name for f in folders] == ["layer_2_width_1k_l0_small", "layer_2_width_1k_l0_medium",
                                         "layer_2_width_1k_l0_big"]
    for folder, target in zip(folders, (20, 60, 150)):
        config = json.loads((folder / "config.json").read_text())
        assert config["target_l0"] == target and config["l0_label"] == l0_label(target)
        assert read_release_folder(folder).config["target_l0"] == target
