"""Transcoders on a model, end to end: splicing, evaluation on mlp_out, training from a store
and online, the CLI and the pipeline, Gemma Scope 2's layout, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from saescope.sae.base import SAEConfig
from saescope.sae.registry import build_sae
from saescope.sites import Site, adapter_for, capture, check_sae_fits, hook_site
from test_transcoders import TC, X_SITE, Y_SITE, random_transcoder

pytestmark = pytest.mark.usefixtures("one_thread")


# --- fitting a model --------------------------------------------------------------------------


def test_mismatched_transcoder_and_site_are_refused_in_one_line(tiny_model):
    model = tiny_model("gemma3")  # d_model 48, attn_z 64
    check_sae_fits(model, TC, random_transcoder(d_in=48, d_out=48), "ok")
    with pytest.raises(ValueError, match=r"maps d_in 48 to d_out 32, but site layer_1/transcoder of this model "
                                         r"reads 48 and predicts 48 dimensions"):
        check_sae_fits(model, TC, random_transcoder(d_in=48, d_out=32), "tc")
    with pytest.raises(ValueError, match="is a transcoder, but its site is layer_1/mlp_out"):
        check_sae_fits(model, Y_SITE, random_transcoder(d_in=48, d_out=48), "tc")
    sae = build_sae(SAEConfig(d_in=48, d_sae=16, architecture="jumprelu"))
    with pytest.raises(ValueError, match="is an SAE, not a transcoder"):
        check_sae_fits(model, TC, sae, "sae")


def test_spliced_transcoder_replaces_mlp_out_by_its_prediction_from_mlp_in(tiny_model):
    from saescope.evaluate.splice import splice

    model = tiny_model("gemma2")
    ids = torch.randint(3, 300, (2, 12))
    clean = capture(model, [X_SITE, Y_SITE], ids)
    tc = random_transcoder(d_in=48, d_out=48)
    seen = {}
    with splice(model, {TC: tc}):
        handle = hook_site(model, Y_SITE, lambda y: seen.setdefault("y", y))  # runs after the splice hook
        try:
            model(input_ids=ids)
        finally:
            handle.remove()
    expected = tc(clean[X_SITE])
    torch.testing.assert_close(seen["y"][:, 1:], expected[:, 1:])
    torch.testing.assert_close(seen["y"][:, :1], clean[Y_SITE][:, :1])  # BOS kept


def test_transcoder_eval_metrics_are_measured_on_mlp_out(tiny_model, tiny_corpus):
    """A transcoder that predicts zero measures exactly as a zero SAE at mlp_out: the same FVU,
    spliced loss and zero ablation (mlp_out zeroed), CE recovered 0."""
    from saescope.evaluate.suite import EvalConfig, evaluate

    model = tiny_model("llama")
    zero = random_transcoder("jumprelu_skip_transcoder", d_in=48, d_out=48)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
        zero.threshold.fill_(1e9)
    corpus = tiny_corpus(8, 16)
    result = evaluate(model, corpus, {"zero": (TC, zero), "zero-sae": (Y_SITE, _zero_sae(48))},
                      EvalConfig(batch_seqs=4, progress=False))
    tc_m, sae_m = result["saes"]["zero"], result["saes"]["zero-sae"]
    assert tc_m["d_out"] == 48 and tc_m["l0"] == 0 and tc_m["frac_dead"] == 1.0
    for key in ("fvu", "mse", "delta_loss", "ce_zero_ablation", "ce_spliced"):
        assert tc_m[key] == pytest.approx(sae_m[key], rel=1e-6, abs=1e-7), key
    assert tc_m["ce_loss_score"] == pytest.approx(0.0, abs=1e-6)


def _zero_sae(d):
    sae = build_sae(SAEConfig(d_in=d, d_sae=8, architecture="jumprelu", centre_input=False))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.threshold.fill_(1e9)
    return sae


# --- training ---------------------------------------------------------------------------------


def test_trainer_trains_both_kinds_from_aligned_pairs_and_releases_them(tmp_path, tiny_model, tiny_corpus):
    """Online on a tiny Gemma 3: a transcoder and a skip transcoder (diagonal maps, as the CPU
    presets) next to an SAE, from one source; the released files predict raw mlp_out."""
    import saescope
    from saescope.activations.online import OnlineSource
    from saescope.train.recipe import Recipe
    from saescope.train.run import release_results
    from saescope.train.spec import sweep
    from saescope.train.trainer import Trainer, TrainOptions

    model = tiny_model("gemma3")
    corpus = tiny_corpus(24, 32)
    source = OnlineSource(model, corpus, [TC, Y_SITE])
    assert source.sites == [X_SITE, Y_SITE]
    batch = next(source.iter_batches(64))
    block = adapter_for(model).blocks(model)[1]
    with torch.no_grad():  # rows aligned: row r of mlp_out is the block's MLP of row r of mlp_in
        torch.testing.assert_close(block.post_feedforward_layernorm(block.mlp(batch[X_SITE])), batch[Y_SITE])
    specs = (sweep([TC, Y_SITE], [64], architecture="batchtopk", ks=[8])
             + sweep([TC], [64], architecture="batchtopk", ks=[8], skip_connection=True))
    assert [s.architecture for s in specs] == ["batchtopk_transcoder", "batchtopk", "batchtopk_skip_transcoder"]
    recipe = Recipe.for_steps(100, batch_size=64, lr=3e-3, input_norm="diagonal", input_norm_power=0.5)
    trainer = Trainer(source, specs, recipe, tmp_path, n_steps=100, final_steps=10, options=TrainOptions(progress=False))
    results = trainer.fit()
    assert all(r.error is None for r in results)
    assert set(trainer.norms) == {X_SITE, Y_SITE} and results[0].target_norm is trainer.norms[Y_SITE]
    folders = release_results(trainer, results)
    assert [f.relative_to(tmp_path / "release").parts[0] for f in folders] == ["transcoder", "mlp_out", "transcoder"]
    for r, folder in zip(results, folders):
        loaded = saescope.load_sae(folder)
        config = json.loads((folder / "config.json").read_text())
        if r.spec.site != TC:
            continue
        assert config["input_site"] == "layer_1/mlp_in" and config["target_site"] == "layer_1/mlp_out"
        assert config["architecture"] == ("jumprelu_skip_transcoder" if "skip" in r.spec.architecture
                                          else "jumprelu_transcoder")
        with torch.no_grad():
            x_n = trainer.norms[X_SITE].apply(batch[X_SITE])
            y_n = r.sae.predict(x_n, r.sae.encode(x_n))  # the trained form, on its inference code
            expected = y_n / trainer.norms[Y_SITE].gain_D + trainer.norms[Y_SITE].shift_D
        torch.testing.assert_close(loaded(batch[X_SITE]), expected, rtol=1e-3, atol=1e-3)
        assert r.metrics["fvu"] < 1.0, f"{r.spec.name} learnt nothing: {r.metrics}"


def test_store_without_the_halves_is_a_clear_error(tmp_path, tiny_model, tiny_corpus):
    from saescope.activations.harvest import HarvestConfig, harvest
    from saescope.activations.store import StoreReader

    model = tiny_model("gpt2")
    store = harvest(model, None, tiny_corpus(6, 16), [Y_SITE], tmp_path / "store", HarvestConfig(progress=False))
    with pytest.raises(ValueError, match=r"layer_1/mlp_in .*layer_1/transcoder read and predict them"):
        StoreReader(store, [TC])
    full = harvest(model, None, tiny_corpus(6, 16), [TC], tmp_path / "store2", HarvestConfig(progress=False))
    assert full.sites == [X_SITE, Y_SITE]
    assert StoreReader(full, [TC]).sites == [X_SITE, Y_SITE]


def test_cli_harvest_train_eval_report_features_with_transcoders(tmp_path, tiny_model, capsys):
    """The commands a user runs: harvest the pair, train a transcoder and a skip transcoder from the
    store (and one online), evaluate, report, collect features, export for SAELens; and errors in
    one line."""
    from saescope.cli import main
    from saescope.release.metrics import read_metrics
    from test_features_cli import save_word_model
    from test_features_server import WORDS

    import random

    model_dir = tmp_path / "model"
    save_word_model(model_dir, tiny_model)
    rng = random.Random(0)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=12))}) + "\n" for _ in range(300)))
    common = ["--device", "cpu", "--no-progress"]
    assert main(["harvest", "--model", str(model_dir), "--corpus", str(corpus), "--sites", "transcoder@1",
                 "--seq-len", "32", "--tokens", "2048", "--out", str(tmp_path / "run"), *common]) == 0
    train = ["train", "--store", str(tmp_path / "run" / "store"), "--sites", "transcoder", "--widths", "64",
             "--batch-size", "128", "--lr", "3e-3", "--l0-coefficients", "1e-3", *common]
    assert main(train + ["--out", str(tmp_path / "plain")]) == 0
    assert main(train + ["--out", str(tmp_path / "skip"), "--skip-connection"]) == 0
    assert main(["train", "--model", str(model_dir), "--corpus", str(corpus), "--sites", "layer_1/transcoder",
                 "--arch", "batchtopk", "--k", "8", "--widths", "64", "--batch-size", "128", "--tokens", "1024",
                 "--seq-len", "32", "--out", str(tmp_path / "online"), *common]) == 0
    for name in ("plain", "skip", "online"):
        release = tmp_path / name / "release"
        assert main(["eval", "--release", str(release), "--corpus", str(corpus), "--seq-len", "32", "--tokens",
                     "512", "--report", str(tmp_path / name / "report"), *common]) == 0
        (folder,) = release.glob("transcoder/layer_1/width_64/*")
        m = read_metrics(folder)["eval"]
        assert m["site"] == "layer_1/transcoder" and m["d_out"] == 48
        for key in ("l0", "fvu", "delta_loss", "ce_loss_score", "ce_zero_ablation", "frac_dead", "frac_high_freq"):
            assert isinstance(m[key], float), key
        assert "transcoder" in (tmp_path / name / "report" / "report.html").read_text()
    assert json.loads((folder / "config.json").read_text())["trained_as"]["architecture"] == "batchtopk_transcoder"
    assert main(["features", "--release", str(tmp_path / "skip" / "release"), "--corpus", str(corpus),
                 "--seq-len", "32", "--tokens", "512", "--out", str(tmp_path / "features"), *common]) == 0

    capsys.readouterr()
    resid_store = ["train", "--model", str(model_dir), "--corpus", str(corpus), "--tokens", "256", "--seq-len", "32",
                   "--batch-size", "128", "--widths", "64", "--out", str(tmp_path / "bad"), *common]
    assert main(resid_store + ["--sites", "transcoder@1", "--arch", "topk", "--k", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "transcoders train as jumprelu or batchtopk, not 'topk'" in err  # before the model loads
    assert main(["train", "--store", str(tmp_path / "run" / "store"), "--sites", "layer_1/resid_post",
                 "--out", str(tmp_path / "bad2"), *common]) == 1
    assert "no activations for layer_1/resid_post" in capsys.readouterr().err
    # a transcoder filed at an SAE site: one line naming both
    (folder,) = (tmp_path / "plain" / "release").glob("transcoder/layer_1/width_64/*")
    config = json.loads((folder / "config.json").read_text())
    moved = tmp_path / "moved" / "mlp_out" / "layer_1" / "width_64" / folder.name
    import shutil

    from saescope.release.save import write_checksums

    shutil.copytree(folder, moved)
    (moved / "config.json").write_text(json.dumps({**config, "site": "layer_1/mlp_out"}))
    write_checksums(moved, ("params.npz", "params.safetensors", "config.json"))
    assert main(["eval", "--release", str(tmp_path / "moved"), "--corpus", str(corpus), "--seq-len", "32",
                 "--tokens", "256", *common]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' loading bar comes before)
    assert err.startswith("saescope eval: error:") and "is a transcoder, but its site is layer_1/mlp_out" in err
    assert main(["export", "--format", "saelens", str(tmp_path / "skip" / "release"), str(tmp_path / "sl")]) == 0
    (cfg_json,) = (tmp_path / "sl").rglob("cfg.json")
    assert json.loads(cfg_json.read_text())["architecture"] == "jumprelu_skip_transcoder"


def test_pipeline_runs_transcoders_next_to_saes(tmp_path, tiny_model):
    """``saescope run --sites transcoder@1,mlp_out@1`` on the quick preset (BatchTopK; the SAE
    behind the Fisher map, the transcoder behind diagonal maps): trained, evaluated, canonical per site, in the report and the feature database."""
    import random
    import sqlite3

    from saescope.cli import main
    from test_features_cli import save_word_model
    from test_features_server import WORDS

    save_word_model(tmp_path / "model", tiny_model)
    rng = random.Random(1)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=12))}) + "\n" for _ in range(300)))
    out = tmp_path / "run"
    argv = ["run", "--preset", "quick", "--model", str(tmp_path / "model"), "--corpus", str(corpus), "--eval-corpus",
            str(corpus), "--sites", "transcoder@1,mlp_out@1", "--skip-connection", "--widths", "64", "--k", "8",
            "--tokens", "1024", "--batch-size", "128", "--seq-len", "32", "--eval-tokens", "256",
            "--eval-loss-tokens", "128", "--feature-tokens", "256", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    canonical = json.loads((out / "release" / "canonical.json").read_text())
    assert set(canonical) == {"layer_1/mlp_out", "layer_1/transcoder"}
    config = json.loads((out / "release" / canonical["layer_1/transcoder"] / "config.json").read_text())
    assert config["architecture"] == "jumprelu_skip_transcoder" and config["input_norm"] == "diagonal"
    # the quick preset's SAEs train behind the Fisher map; the transcoder next to them keeps a diagonal one
    sae_config = json.loads((out / "release" / canonical["layer_1/mlp_out"] / "config.json").read_text())
    assert sae_config["input_norm"] == "fisher"
    assert "transcoder: reads the MLP's input (mlp_in)" in (out / "report" / "report.html").read_text()
    with sqlite3.connect(out / "features" / "features.sqlite") as db:
        assert {r[0] for r in db.execute("SELECT site FROM saes")} == {"layer_1/mlp_out", "layer_1/transcoder"}


def test_a_run_folder_older_than_a_setting_resumes_at_its_default(tmp_path):
    from saescope.pipeline import RunState
    from saescope.presets import RunConfig

    cfg = RunConfig()
    RunState(tmp_path, cfg)
    state = json.loads((tmp_path / "run.json").read_text())
    del state["config"]["skip_connection"]  # written before the setting existed
    (tmp_path / "run.json").write_text(json.dumps(state))
    RunState(tmp_path, cfg)
    with pytest.raises(ValueError, match="skip_connection"):
        RunState(tmp_path, cfg.replace(skip_connection=True))


@pytest.mark.parametrize("skip", [False, True])
def test_gemma_scope_2_transcoder_folders_load_as_our_transcoders(tmp_path, skip):
    """A Gemma Scope 2 transcoder folder (lowercase keys, affine_skip_connection, config.json or the
    path alone) loads as a JumpReLU (skip) transcoder that predicts by the published formula."""
    import numpy as np

    import saescope
    from test_gemma_scope_2 import assert_predicts, by_the_formula, gs2_arrays, make_folder

    arrays = gs2_arrays(d_in=6, d_sae=1024, d_out=6, skip=skip)
    name = "transcoder_all/layer_5_width_1k_l0_small" + ("_affine" if skip else "")
    config = {"architecture": "jump_relu", "model_name": "gemma-v3-270m-pt", "width": "1k", "l0": 18,
              "affine_connection": skip, "hf_hook_point_in": "model.layers.5.pre_feedforward_layernorm.output",
              "hf_hook_point_out": "model.layers.5.post_feedforward_layernorm.output"}
    x = np.random.default_rng(1).normal(size=(40, 6)).astype(np.float32)
    for with_config in (True, False):
        folder = make_folder(tmp_path / str(with_config), name, arrays, config if with_config else None)
        tc = saescope.load_sae(folder)
        assert tc.is_transcoder and tc.architecture == ("jumprelu_skip_transcoder" if skip else "jumprelu_transcoder")
        (released,) = saescope.load_release(tmp_path / str(with_config))
        assert released.site == Site(5, "transcoder")
        f, y = by_the_formula(arrays, x)
        with torch.no_grad():
            assert_predicts(tc(torch.from_numpy(x)).numpy(), y)


def test_trained_transcoders_release_in_gemma_scope_2_layout(tmp_path, tiny_model, tiny_corpus):
    import saescope
    from saescope.activations.online import OnlineSource
    from saescope.train.recipe import Recipe
    from saescope.train.run import train_and_release
    from saescope.train.spec import sweep
    from saescope.train.trainer import Trainer, TrainOptions

    source = OnlineSource(tiny_model("gemma3"), tiny_corpus(12, 32), [TC])
    specs = sweep([TC], [64], architecture="batchtopk", ks=[8], skip_connection=True)
    trainer = Trainer(source, specs, Recipe.for_steps(4, batch_size=64), tmp_path, n_steps=4,
                      options=TrainOptions(progress=False, release_layout="gemma-scope-2"))
    (folder,) = train_and_release(trainer)
    assert folder.relative_to(tmp_path / "release").as_posix() == "transcoder/layer_1_width_64_l0_small_affine"
    tc = saescope.load_sae(folder)
    assert tc.architecture == "jumprelu_skip_transcoder" and tc.cfg.d_out == 48
    assert json.loads((folder / "config.json").read_text())["hf_hook_point_out"] == \
        "model.layers.1.post_feedforward_layernorm.output"
