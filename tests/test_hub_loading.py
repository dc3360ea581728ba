"""load_sae('owner/repo/path'): from a local Hugging Face cache laid out as huggingface_hub lays it
out, with no network; a clear error naming repo, path and cache when it is not there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import saescope
from saescope.release.hub import parse_hub_spec

REPO, INSIDE, COMMIT = "google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82", "0123abcd" * 5


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo_dir = cache / ("models--" + REPO.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    folder = repo_dir / "snapshots" / COMMIT / INSIDE
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {"W_enc": rng.normal(size=(6, 16384)), "W_dec": rng.normal(size=(16384, 6)), "b_enc": rng.normal(size=16384),
              "b_dec": rng.normal(size=6), "threshold": rng.random(16384)}
    np.savez(folder / "params.npz", **{k: v.astype(np.float32) for k, v in arrays.items()})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing may touch the network here
    return cache, arrays


def test_parse_hub_spec():
    assert parse_hub_spec(f"{REPO}/{INSIDE}") == (REPO, INSIDE)
    assert parse_hub_spec(f"hf://{REPO}/{INSIDE}/") == (REPO, INSIDE)
    assert parse_hub_spec("just-a-name") is None
    assert parse_hub_spec("a/b/../../etc") is None


def test_load_sae_from_the_local_cache(fake_cache):
    _, arrays = fake_cache
    sae = saescope.load_sae(f"{REPO}/{INSIDE}")
    assert sae.architecture == "jumprelu" and sae.cfg.d_sae == 16384
    torch.testing.assert_close(sae.threshold, torch.from_numpy(arrays["threshold"].astype(np.float32)))
    (released,) = saescope.load_release(saescope.release.hub.resolve_hub_folder(f"{REPO}/{INSIDE}"))
    assert released.site.name == "layer_12/resid_post"  # from the repo name, as for any Gemma Scope path


def test_missing_folder_names_repo_path_and_cache(fake_cache):
    cache, _ = fake_cache
    with pytest.raises(FileNotFoundError) as err:
        saescope.load_sae(f"{REPO}/layer_3/width_16k/average_l0_10")
    message = str(err.value)
    assert REPO in message and "layer_3/width_16k/average_l0_10" in message and str(cache) in message
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        saescope.load_sae("google/no-such-repo/layer_0/width_16k/average_l0_1")
