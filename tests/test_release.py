"""Release folders: our round trip, Gemma Scope's layout, and clear errors on malformed files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from saescope.release import (
    export_safetensors,
    load_sae,
    read_release_folder,
    release_folder,
    save_sae,
    width_label,
)
from saescope.errors import IntegrityError
from saescope.sae.base import SAEConfig
from saescope.sae.registry import build_sae
from saescope.sites import Site


def released_sae(architecture="jumprelu", d_in=12, d_sae=40, k=3):
    torch.manual_seed(1)
    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.1, 0.5)
    sae.fold_input_scale(3.0)
    return sae


def test_width_labels_and_folder_names_follow_gemma_scope():
    assert [width_label(w) for w in (4096, 16384, 32768, 65536, 131072, 262144, 524288, 2**20)] == [
        "4k", "16k", "32k", "65k", "131k", "262k", "524k", "1m"]
    assert width_label(100) == "100"
    folder = release_folder("/r", Site(12, "attn_z"), 16384, 71.4)
    assert folder.as_posix() == "/r/attn_z/layer_12/width_16k/average_l0_71"
    assert release_folder("/r", "layer_3/mlp_out", 4096, 8.6).as_posix() == "/r/mlp_out/layer_3/width_4k/average_l0_9"


@pytest.mark.parametrize("architecture", ["jumprelu", "topk", "batchtopk", "relu"])
def test_round_trip_is_exact(tmp_path, architecture):
    sae = released_sae(architecture)
    folder = tmp_path / "resid_post/layer_2/width_40/average_l0_7"
    config = {"model": "tiny", "site": "layer_2/resid_post", "sparsity_coefficient": 1e-3, "tokens_seen": 4096, "input_scale": 3.0}
    written = save_sae(sae, folder, config=config, metrics={"fvu": 0.12})
    assert written == folder
    assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS", "config.json", "metrics.json", "params.npz",
                                                        "params.safetensors"]
    assert [p.name for p in tmp_path.rglob(".*")] == []  # no temporary folder left behind

    with np.load(folder / "params.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(sae.array_names)
        for name in npz.files:
            assert npz[name].dtype == np.float32
            np.testing.assert_array_equal(npz[name], getattr(sae, name).detach().numpy())
    st = load_file(folder / "params.safetensors")
    for name in sae.array_names:
        np.testing.assert_array_equal(st[name], getattr(sae, name).detach().numpy())

    loaded = load_sae(folder)
    assert type(loaded) is type(sae) and loaded.cfg.centre_input is False and getattr(loaded.cfg, "k", None) == getattr(sae.cfg, "k", None)  # only TopK configs have k
    for name in sae.array_names:
        assert torch.equal(getattr(loaded, name), getattr(sae, name).detach())
    record = read_release_folder(folder)  # what the folder says, beside the SAE (never on the module)
    assert record.config["model"] == "tiny" and record.config["d_sae"] == 40
    assert record.metrics == {"training": {"fvu": 0.12}}
    assert not hasattr(loaded, "release_config") and torch.equal(record.sae.W_enc, loaded.W_enc)
    x = torch.randn(5, 12) * 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x))
    assert torch.equal(load_sae(folder / "params.npz").W_enc, loaded.W_enc)
    assert torch.equal(load_sae(folder / "params.safetensors").W_dec, loaded.W_dec)


def test_save_replaces_atomically_and_refuses_training_form(tmp_path):
    sae = released_sae()
    folder = tmp_path / "out"
    save_sae(sae, folder, config={}, metrics={"run": 1})
    save_sae(sae, folder, config={})
    assert not (folder / "metrics.json").exists()  # the old folder was replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    training_form = build_sae(SAEConfig(d_in=4, d_sae=8))
    with pytest.raises(ValueError, match="fold_input_scale"):
        save_sae(training_form, tmp_path / "x", config={})
    with pytest.raises(ValueError, match="contradicts"):
        save_sae(sae, tmp_path / "y", config={"d_sae": 999})
    with torch.no_grad():
        sae.b_dec[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite values in b_dec"):
        save_sae(sae, tmp_path / "z", config={})
    assert not (tmp_path / "z").exists()


def gemma_scope_arrays(d_in=6, d_sae=16384, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_enc": rng.normal(size=d_sae).astype(np.float32) * 0.1,
        "b_dec": rng.normal(size=d_in).astype(np.float32),
        "threshold": rng.uniform(0.5, 1.5, size=d_sae).astype(np.float32),
    }


@pytest.mark.parametrize("repo, kind", [("gemma-scope-2b-pt-res", "resid_post"), ("gemma-scope-9b-pt-mlp", "mlp_out"), ("gemma-scope-2b-pt-att", "attn_z")])
def test_gemma_scope_folder_loads_and_encodes_like_their_tutorial(tmp_path, repo, kind):
    folder = tmp_path / repo / "layer_20/width_16k/average_l0_71"
    folder.mkdir(parents=True)
    arrays = gemma_scope_arrays()
    np.savez(folder / "params.npz", **arrays)

    sae = load_sae(folder)
    assert sae.architecture == "jumprelu" and sae.cfg.centre_input is False
    assert sae.cfg.d_in == 6 and sae.cfg.d_sae == 16384
    record = read_release_folder(folder)
    cfg = record.config
    assert record.site == Site(20, kind) and record.name == "average_l0_71"
    assert cfg["site"] == f"layer_20/{kind}" and cfg["average_l0"] == 71 and cfg["width"] == "16k"
    assert cfg["model"] == ("gemma-2-9b" if "9b" in repo else "gemma-2-2b")

    x = np.random.default_rng(1).normal(size=(7, 6)).astype(np.float32) * 2
    pre = x @ arrays["W_enc"] + arrays["b_enc"]
    expected = np.maximum(pre, 0) * (pre > arrays["threshold"])  # Gemma Scope's tutorial
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x)).numpy()
        x_hat = sae.decode(torch.from_numpy(f)).numpy()
    assert (expected > 0).sum() > 0
    np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat, expected @ arrays["W_dec"] + arrays["b_dec"], rtol=1e-4, atol=1e-4)
    assert torch.equal(load_sae(folder / "params.npz").threshold, sae.threshold)


def test_lowercase_keys_scaling_factor_and_16_bit_arrays(tmp_path):
    arrays = gemma_scope_arrays(d_sae=4096)
    scale = np.linspace(0.5, 2, 4096).astype(np.float32)
    folder = tmp_path / "layer_0/width_4k/average_l0_5"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", w_enc=arrays["W_enc"].astype(np.float16), w_dec=arrays["W_dec"],
             b_enc=arrays["b_enc"], b_dec=arrays["b_dec"], threshold=arrays["threshold"], scaling_factor=scale)
    sae = load_sae(folder)
    assert sae.W_enc.dtype == torch.float32
    np.testing.assert_array_equal(sae.W_enc.detach().numpy(), arrays["W_enc"].astype(np.float16).astype(np.float32))
    # the scaling factor multiplies the latents before decoding: folded into the decoder rows
    f = torch.rand(3, 4096)
    with torch.no_grad():
        expected = (f.numpy() * scale) @ arrays["W_dec"] + arrays["b_dec"]
        np.testing.assert_allclose(sae.decode(f).numpy(), expected, rtol=1e-4, atol=1e-3)
    np.savez(folder / "params.npz", **arrays, scaling_factor=np.ones(4096, np.float32))
    np.testing.assert_array_equal(load_sae(folder).W_dec.detach().numpy(), arrays["W_dec"])
    # bfloat16 arrives through safetensors
    from safetensors.torch import save_file

    bf16 = tmp_path / "bf16.safetensors"
    save_file({k: torch.from_numpy(v).bfloat16() for k, v in arrays.items()}, str(bf16))
    sae = load_sae(bf16)
    assert sae.threshold.dtype == torch.float32
    torch.testing.assert_close(sae.threshold, torch.from_numpy(arrays["threshold"]).bfloat16().float())


def test_export_to_safetensors(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_10"
    folder.mkdir(parents=True)
    arrays = gemma_scope_arrays()
    np.savez(folder / "params.npz", **arrays)
    out = export_safetensors(folder, tmp_path / "sae.safetensors")
    st = load_file(out)
    for name, a in arrays.items():
        np.testing.assert_array_equal(st[name], a)


def write_npz(folder, **arrays):
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **arrays)
    return folder / "params.npz"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("threshold"), r"missing array\(s\) threshold"),
        (lambda a: a.update(b_dec=np.zeros(7, np.float32)), r"b_dec has shape \(7,\), but W_enc \(6, 16384\) implies \(6,\)"),
        (lambda a: a.update(W_dec=a["W_dec"].T.copy()), r"W_dec has shape \(6, 16384\)"),
        (lambda a: a["b_enc"].__setitem__(3, np.nan), r"b_enc contains NaN or Inf"),
        (lambda a: a.update(b_dec=np.zeros(6, np.int64)), r"array 'b_dec' has dtype int64"),
        (lambda a: a.update(b_dec=np.array([{"x": 1}] * 6, dtype=object)), r"'b_dec' is a pickled object array"),
        (lambda a: a.update(extra=np.zeros(3, np.float32)), r"unexpected array\(s\) extra"),
    ],
)
def test_malformed_params_give_clear_errors(tmp_path, change, message):
    arrays = gemma_scope_arrays()
    change(arrays)
    file = write_npz(tmp_path / "layer_1/width_16k/average_l0_9", **arrays)
    with pytest.raises(ValueError, match=message) as info:
        load_sae(file.parent)
    assert str(file) in str(info.value)


def test_unreadable_or_inconsistent_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no params.npz or params.safetensors"):
        load_sae(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such SAE folder"):
        load_sae(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/params.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz archive"):
        load_sae(tmp_path / "bad")
    # the path says 16k but the arrays are 4096 wide
    arrays = gemma_scope_arrays(d_sae=4096)
    write_npz(tmp_path / "layer_1/width_16k/average_l0_9", **arrays)
    with pytest.raises(ValueError, match="the path says width_16k, but the arrays have d_sae = 4096"):
        load_sae(tmp_path / "layer_1/width_16k/average_l0_9")
    # no config and no threshold: the architecture cannot be told
    arrays.pop("threshold")
    write_npz(tmp_path / "plain", **arrays)
    with pytest.raises(ValueError, match="cannot be told"):
        load_sae(tmp_path / "plain")
    # our folder whose config.json disagrees with its arrays
    folder = save_sae(released_sae(), tmp_path / "ours", config={})
    config = json.loads((folder / "config.json").read_text())
    config["d_in"] = 99
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(IntegrityError, match="ours/config.json is damaged .its SHA-256 does not match"):
        load_sae(folder)
    (folder / "SHA256SUMS").unlink()  # a hand-made folder: no checksums, the config is checked
    with pytest.raises(ValueError, match="config says d_in = 99"):
        load_sae(folder)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_sae(folder)
