"""saescope run: configuration handling (fast) and the quick preset end to end on the real model."""

import json
import math
from pathlib import Path

import pytest

from saescope.pipeline import RunState
from saescope.release.metrics import choose_canonical
from saescope.presets import PRESETS, RunConfig, get_preset
from saescope.settings import SITE_KINDS, check_kind_splits
from saescope.sites import Site
from saescope.train.spec import sweep


def test_presets_are_valid_and_named():
    assert {"default", "quick", "gemma-2-2b-16k"} <= set(PRESETS)
    for name, cfg in PRESETS.items():
        assert cfg.n_steps >= 1, name
        assert cfg.description
        specs = sweep([Site(3, kind) for kind in SITE_KINDS], cfg.widths, architecture=cfg.architecture,
                      sparsity_coefficients=cfg.sparsity_coefficients, ks=cfg.ks, kind_ks=cfg.kind_ks,
                      target_l0s=cfg.target_l0s, prefixes=cfg.prefixes)
        assert {s.site.kind for s in specs} == set(SITE_KINDS), name
    assert {s.site.kind: s.k for s in sweep([Site(3, kind) for kind in SITE_KINDS], (2048,), architecture="batchtopk",
                                              ks=(100,), kind_ks=PRESETS["default"].kind_ks)} == \
        {"resid_post": 100, "attn_z": 85, "mlp_out": 140}
    assert check_kind_splits(PRESETS["default"].kind_splits, PRESETS["default"].batch_size, "batch") == \
        {"mlp_out": 2, "resid_post": 2}
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown run setting"):
        get_preset("quick").replace(widht=3)


def test_run_folder_with_another_configuration_is_refused(tmp_path):
    cfg = RunConfig()
    state = RunState(tmp_path, cfg)
    state.finish("train", 1.0)
    RunState(tmp_path, cfg.replace(device="cuda"))  # runtime-only settings may change
    with pytest.raises(ValueError, match="widths"):
        RunState(tmp_path, cfg.replace(widths=(4096,)))


def test_canonical_is_closest_to_target_l0():
    saes = {
        "a": {"site": "layer_0/resid_post", "l0": 40.0},
        "b": {"site": "layer_0/resid_post", "l0": 130.0},
        "c": {"site": "layer_0/resid_post", "l0": 85.0},
        "d": {"site": "layer_1/mlp_out", "l0": 300.0},
        "e": {"site": "layer_1/mlp_out", "l0": None},
    }
    saes = [(name, m["site"], m["l0"]) for name, m in saes.items()]
    assert choose_canonical(saes, 100) == {"layer_0/resid_post": "c", "layer_1/mlp_out": "d"}
    assert choose_canonical(saes, 30)["layer_0/resid_post"] == "a"


def _finite_numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _finite_numbers(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        yield path, obj


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    """The quick preset on the real Gemma 3 270M, restricted to the first layer's three sites and a
    Fisher metric from 256 tokens to keep CI short (the Fisher pass is the full model's forward and
    backward: 35 of the 46 s of training at the preset's 1,024 tokens on 2 AVX2 cores); every
    artefact exists, every number is finite, a rerun changes nothing."""
    from saescope.cli import main

    out = tmp_path / "run"
    argv = ["run", "--preset", "quick", "--sites", "all@0", "--fisher-tokens", "256", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0

    run = json.loads((out / "run.json").read_text())
    assert set(run["stages"]) == {"train", "eval", "report", "features"}
    release = out / "release"
    folders = sorted(p.parent for p in release.rglob("params.npz"))
    assert len(folders) == 3  # 3 sites × one k
    for folder in folders:
        for name in ("params.npz", "params.safetensors", "config.json", "metrics.json"):
            assert (folder / name).exists(), folder / name
        sections = json.loads((folder / "metrics.json").read_text())
        metrics = sections["eval"]
        for key in ("l0", "fvu", "mse", "delta_loss", "ce_loss_score", "kl_div", "frac_dead", "frac_high_freq"):
            assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), (folder, key, metrics[key])
        # the quick preset is a smoke test, but its SAEs must still beat deleting the site
        assert metrics["ce_loss_score"] > 0, (folder, metrics["ce_loss_score"])
        assert json.loads((folder / "config.json").read_text())["architecture"] == "jumprelu"  # BatchTopK, released
        k = round(sections["training"]["average_l0"])
        assert folder.name.split("_")[2] == str(k), folder  # named by the measured L0 (…_2 if taken)
    summary = json.loads((release / "eval.json").read_text())
    bad = [(p, v) for p, v in _finite_numbers(summary["saes"]) if not math.isfinite(v)]
    assert not bad, bad
    canonical = json.loads((release / "canonical.json").read_text())
    assert len(canonical) == 3 and all((release / f / "params.npz").exists() for f in canonical.values())
    report = out / "report" / "report.html"
    assert report.exists() and len(list(report.parent.glob("*.png"))) >= 5
    assert (out / "features" / "features.sqlite").exists()

    # finished: a rerun changes nothing
    mtimes = {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file()}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file()} == mtimes
