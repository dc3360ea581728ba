"""The real architectures through the trainer: bit-identical resume for each, and the release
folders they are written to (Gemma Scope's format, a non-scalar input map folded in exactly)."""

import json

import pytest
import torch

from saescope.activations.source import InMemorySource
from saescope.sites import Site
from saescope.train.run import train_and_release
from saescope.train.spec import SAESpec

from trainer_kit import RECIPE, REAL_SPECS, RESID, KillAt, TinySAE, make_data, straight_and_resumed, trainer


# --- the real architectures and the release format ------------------------------------------------

def test_resume_is_bit_identical_for_every_architecture(tmp_path):
    """Buffers count too: TopK's dead-latent counters and BatchTopK's running threshold."""
    reference, resumed = straight_and_resumed(InMemorySource(make_data()), tmp_path, specs=REAL_SPECS, build_sae=None)
    for a, b in zip(reference.trainers, resumed.trainers):
        assert a.sae.state_dict().keys() == b.sae.state_dict().keys()
        for key, value in a.sae.state_dict().items():
            assert torch.equal(value, b.sae.state_dict()[key]), f"{a.name}: {key} differs after resume"


def test_release_folders_are_written_and_loadable(tmp_path):
    from saescope.release import load_sae

    data = make_data()
    source = InMemorySource(data)
    run = trainer(source, tmp_path, specs=REAL_SPECS, build_sae=None, model_name="tiny-model")
    folders = train_and_release(run)
    assert len(folders) == len(REAL_SPECS)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    for spec, t, folder in zip(REAL_SPECS, run.trainers, folders):
        metrics = json.loads((folder / "metrics.json").read_text())["training"]
        config = json.loads((folder / "config.json").read_text())
        assert folder.parent == tmp_path / "release" / spec.site.kind / f"layer_{spec.site.layer}" / f"width_{spec.d_sae}"
        assert folder.name.startswith(f"average_l0_{round(metrics['average_l0'])}")
        assert config["model"] == "tiny-model" and config["site"] == spec.site.name
        assert config["tokens_seen"] == 12 * RECIPE.batch_size and config["recipe"]["lr"] == RECIPE.lr
        C = config["input_scale"]
        assert C == pytest.approx(run.scales[spec.site])
        # the released SAE acts on raw activations exactly as the trained one does on x / C
        released = load_sae(folder)
        x = data[spec.site][:32]
        t.sae.eval()
        with torch.no_grad():
            if spec.architecture != "batchtopk":  # BatchTopK's batch-level selection differs at inference
                assert torch.allclose(released.encode(x), C * t.sae.encode(x / C), atol=1e-5)
            assert torch.allclose(released(x), C * t.sae(x / C), atol=1e-4)
    assert [s["status"] for s in summary["saes"]] == ["released"] * len(REAL_SPECS)


class SilentSAE(TinySAE):
    """Never fires: every seed ends at L0 = 0."""

    def encode(self, x_BD):
        return torch.relu(self.pre_activations(x_BD)) * 0


def test_same_rounded_l0_gets_distinct_folders(tmp_path):
    specs = [SAESpec(RESID, "tiny", 32, sparsity_coefficient=1e-3, seed=s) for s in (0, 1)]
    folders = train_and_release(trainer(InMemorySource(make_data()), tmp_path, specs=specs, build_sae=SilentSAE))
    assert [f.name for f in folders] == ["average_l0_0", "average_l0_0_2"]
    assert all((f / "params.npz").exists() for f in folders)


def test_cli_trains_from_a_store_and_resumes(tmp_path, capsys):
    """`saescope train --store RUN/store` end to end on a tiny model: a λ sweep at two widths,
    released in Gemma Scope's layout under RUN/release; the same command again resumes (no-op)."""
    from conftest import build_tiny_corpus, build_tiny_model

    from saescope.cli import main
    from saescope.activations.harvest import HarvestConfig, harvest
    from saescope.release import load_sae

    sites = [Site(1, "resid_post"), Site(1, "mlp_out")]
    harvest(build_tiny_model("gemma3", n_layers=2), None, build_tiny_corpus(n_seqs=16, seq_len=16), sites,
            tmp_path / "store", HarvestConfig(model_name="tiny-gemma3", progress=False, shard_tokens=64))
    argv = ["train", "--store", str(tmp_path / "store"), "--sites", "resid_post", "--widths", "64,96",
            "--l0-coefficients", "1e-3,1e-2", "--batch-size", "32", "--checkpoint-every", "2", "--no-progress",
            "--device", "cpu"]
    assert main(argv) == 0
    released = sorted((tmp_path / "release" / "resid_post" / "layer_1").glob("width_*/average_l0_*"))
    assert len(released) == 4 and {p.parent.name for p in released} == {"width_64", "width_96"}
    for folder in released:
        config = json.loads((folder / "config.json").read_text())
        assert config["model"] == "tiny-gemma3" and config["site"] == "layer_1/resid_post"
        assert load_sae(folder).cfg.d_sae == config["d_sae"]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["tokens"] == summary["n_steps"] * 32 and len(summary["saes"]) == 4
    before = {p: (p / "params.npz").read_bytes() for p in released}
    capsys.readouterr()
    assert main(argv) == 0  # relaunch: the run is complete, the same SAEs are released again
    assert {p: (p / "params.npz").read_bytes() for p in released} == before
    assert main(argv[:-2] + ["--device", "cpu", "--lr", "1e-3"]) == 1
    assert "recipe.lr" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["centred", "diagonal"])
def test_non_scalar_input_map_resumes_bit_identically_and_releases_exactly(tmp_path, mode):
    """A run behind a per-dimension map resumes bit for bit (the map is in the checkpoint), and
    its released SAEs act on raw activations as the trained ones do behind the map."""
    from saescope.release import load_sae

    data = make_data()
    source = InMemorySource(data)
    recipe = RECIPE.replace(input_norm=mode, input_norm_power=0.5)
    kw = {"specs": REAL_SPECS, "build_sae": None, "recipe": recipe}
    reference = trainer(source, tmp_path / "straight", **kw)
    folders = train_and_release(reference)
    with pytest.raises(KeyboardInterrupt):
        trainer(KillAt(source, 6), tmp_path / "killed", **kw).fit()
    resumed = trainer(source, tmp_path / "killed", **kw)
    assert [f.relative_to(tmp_path / "killed") for f in train_and_release(resumed)] == \
        [f.relative_to(tmp_path / "straight") for f in folders]
    for a, b in zip(reference.trainers, resumed.trainers):
        for key, value in a.sae.state_dict().items():
            assert torch.equal(value, b.sae.state_dict()[key]), f"{a.name}: {key} differs after resume"
    for spec, t, folder in zip(REAL_SPECS, reference.trainers, folders):
        config = json.loads((folder / "config.json").read_text())
        assert config["input_norm"] == mode and config["input_scale"] is None
        norm = reference.norms[spec.site]
        released = load_sae(folder)
        x = data[spec.site][:32]
        t.sae.eval()
        with torch.no_grad():
            expected = t.sae(norm.apply(x)) / norm.gain_D + norm.shift_D
            assert torch.allclose(released(x), expected, rtol=1e-4, atol=1e-4)
            if released.architecture == "jumprelu":  # unit-norm decoder rows in raw units
                assert torch.allclose(released.W_dec.norm(dim=1), torch.ones(spec.d_sae), atol=1e-5)
