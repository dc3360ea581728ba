"""Steps per batch and epochs by site kind (Recipe.kind_splits, Recipe.kind_epochs)."""

import json

import pytest
import torch

from saescope.activations.source import InMemorySource
from saescope.sae.base import SAEConfig
from saescope.sites import Site
from saescope.train.plan import TrainPlan
from saescope.train.recipe import Recipe
from saescope.train.sae_trainer import SAETrainer
from saescope.train.trainer import Trainer

from trainer_kit import MLP, RECIPE, RESID, SPECS, Recording, TinySAE, make_data, straight_and_resumed, trainer


# --- steps per batch by site kind (Recipe.kind_splits) -----------------------------------------


def test_recipe_split_keeps_warmups_in_tokens_and_refuses_bad_splits():
    recipe = RECIPE.replace(kind_splits=("mlp_out=2",), sparsity_warmup_steps=5)
    assert (recipe.splits_at(MLP), recipe.splits_at(RESID)) == (2, 1)
    half = recipe.split(2)
    assert (half.batch_size, half.lr_warmup_steps, half.sparsity_warmup_steps, half.kind_splits) == (16, 6, 10, ())
    assert recipe.split(1) is recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe  # a checkpoint's round trip
    with pytest.raises(ValueError, match="mlp_out=3 does not divide the batch of 32"):
        RECIPE.replace(kind_splits=("mlp_out=3",))
    with pytest.raises(ValueError, match="kind_splits: .*noise=2"):
        RECIPE.replace(kind_splits=("noise=2",))
    with pytest.raises(ValueError, match="kind_splits: mlp_out=16 does not divide the 8 rows"):
        Trainer(InMemorySource(make_data()), SPECS, RECIPE.replace(kind_splits=("mlp_out=16",)), "unused",
                n_steps=4, plan=TrainPlan(build_sae=TinySAE, rows_divisor=4))  # a data-parallel rank's 8 rows


def _mlp_only_differs(tmp_path, **recipe_changes):
    """A run with ``recipe_changes`` (recorded source) and one without: the resid_post SAEs must be
    bit-identical, the mlp_out one must differ.  Returns the recording and the changed run."""
    source = Recording(InMemorySource(make_data()))
    changed = trainer(source, tmp_path / "changed", recipe=RECIPE.replace(**recipe_changes))
    changed.fit()
    plain = trainer(InMemorySource(make_data()), tmp_path / "plain")
    plain.fit()
    for a, b in zip(changed.trainers, plain.trainers):
        same = all(torch.equal(p, q) for p, q in zip(a.sae.parameters(), b.sae.parameters()))
        assert same == (a.site == RESID), a.name
    return source, changed


def test_a_split_kind_takes_one_step_per_part_of_each_batch(tmp_path):
    """mlp_out=2: its SAE is exactly an SAETrainer stepped on each batch's two halves; the other
    kind's SAEs are those of a run without the split."""
    source, split = _mlp_only_differs(tmp_path, kind_splits=("mlp_out=2",))
    t = next(t for t in split.trainers if t.site == MLP)
    assert t.n_steps == 24 and t.tokens_seen == 12 * 32
    torch.manual_seed(1)  # the spec's seed
    manual = SAETrainer(TinySAE(SAEConfig(20, 24, "tiny")), RECIPE.split(2), sparsity_coefficient=1e-2, n_steps=24,
                        input_scale=t.input_scale, name="manual", site=MLP, final_steps=4)
    for step, batch in enumerate(source.passes[-1]):
        for j, half in enumerate(batch[MLP].chunk(2)):
            manual.update(2 * step + j, half, return_metrics=False)
    for (name, p), q in zip(t.sae.named_parameters(), manual.sae.parameters()):
        assert torch.equal(p, q), name


def test_a_kind_with_two_epochs_trains_on_after_the_others_stop(tmp_path):
    """kind_epochs mlp_out=2: its SAE is exactly an SAETrainer stepped on the source's first
    2·n_steps batches (its schedule spans them all); the other kind's SAEs are those of a run
    without it, and their log ends at n_steps."""
    source, run = _mlp_only_differs(tmp_path, kind_epochs=("mlp_out=2",))
    assert len(source.passes[-1]) == 24  # 16 batches an epoch: the run read into the second
    t = next(t for t in run.trainers if t.site == MLP)
    assert t.n_steps == 24 and t.tokens_seen == 24 * 32
    torch.manual_seed(1)  # the spec's seed
    manual = SAETrainer(TinySAE(SAEConfig(20, 24, "tiny")), RECIPE, sparsity_coefficient=1e-2, n_steps=24,
                        input_scale=t.input_scale, name="manual", site=MLP, final_steps=4)
    for step, batch in enumerate(source.passes[-1]):
        manual.update(step, batch[MLP], return_metrics=False)
    for (name, p), q in zip(t.sae.named_parameters(), manual.sae.parameters()):
        assert torch.equal(p, q), name
    lines = [json.loads(x) for x in (tmp_path / "changed" / "train_log.jsonl").read_text().splitlines()]
    last = {}
    for line in lines:
        if "sae" in line and "loss" in line:
            last[line["site"]] = max(last.get(line["site"], 0), line["step"])
    assert last == {str(RESID): 12, str(MLP): 24}
    assert Recipe.from_dict(json.loads(json.dumps(run.recipe.to_dict()))) == run.recipe  # a checkpoint's round trip
    with pytest.raises(ValueError, match="kind_epochs: .*noise=2"):
        RECIPE.replace(kind_epochs=("noise=2",))


def test_epochs_and_splits_by_layer_act_at_that_layer_only(tmp_path):
    """kind_epochs mlp_out@1=2 (the kit's mlp_out site is layer 1) is mlp_out=2; a term for a
    layer the run lacks, or resid_post=2 undone at layer 0, changes nothing."""
    by_layer = trainer(InMemorySource(make_data()), tmp_path / "a",
                       recipe=RECIPE.replace(kind_epochs=("mlp_out@1=2", "resid_post=2", "resid_post@0=1",
                                                          "mlp_out@5=3")))
    by_kind = trainer(InMemorySource(make_data()), tmp_path / "b",
                      recipe=RECIPE.replace(kind_epochs=("mlp_out=2",)))
    for run in (by_layer, by_kind):
        run.fit()
    for a, b in zip(by_layer.trainers, by_kind.trainers):
        assert a.n_steps == b.n_steps == (24 if a.site == MLP else 12), a.name
        assert all(torch.equal(p, q) for p, q in zip(a.sae.parameters(), b.sae.parameters())), a.name
    recipe = RECIPE.replace(kind_splits=("mlp_out@1=2", "mlp_out@0=4"))
    assert (recipe.splits_at(MLP), recipe.splits_at(Site(0, "mlp_out")), recipe.splits_at(RESID)) == (2, 4, 1)


def test_a_run_with_more_epochs_at_one_kind_resumes_bit_identically(tmp_path):
    """Killed in the second epoch (only mlp_out's SAE still training), resumed: bit-identical."""
    reference, resumed = straight_and_resumed(InMemorySource(make_data()), tmp_path, kill_step=18,
                                              recipe=RECIPE.replace(kind_epochs=("mlp_out=2",)))
    for a, b in zip(reference.trainers, resumed.trainers):
        for key, value in a.state_tensors().items():
            assert torch.equal(value, b.state_tensors()[key]), f"{a.name}: {key} differs after resume"


def test_a_split_run_resumes_bit_identically(tmp_path):
    reference, resumed = straight_and_resumed(InMemorySource(make_data()), tmp_path,
                                              recipe=RECIPE.replace(kind_splits=("mlp_out=2", "resid_post=4")))
    for a, b in zip(reference.trainers, resumed.trainers):
        for key, value in a.state_tensors().items():
            assert torch.equal(value, b.state_tensors()[key]), f"{a.name}: {key} differs after resume"


def test_checkpoints_link_what_stopped_moving(tmp_path):
    """In the second epoch only mlp_out's SAE moves: each checkpoint there hard-links the
    resid_post SAEs' files from the one before (same inode, same manifest entry), writes the
    mlp_out one afresh, and still verifies and resumes (the test above resumes from one)."""
    from saescope.train.checkpoint import CheckpointDir

    run = trainer(InMemorySource(make_data()), tmp_path / "run", n_steps=12, checkpoint_every=4,
                  recipe=RECIPE.replace(kind_epochs=("mlp_out=2",)))
    run.fit()
    ckpt = CheckpointDir(tmp_path / "run" / "checkpoints")
    (_, last), older = ckpt.latest(), tmp_path / "run" / "checkpoints" / "step_000000020"
    assert last.name == "step_000000024" and older.is_dir()
    for t in run.trainers:
        a, b = older / f"{t.name}.safetensors", last / f"{t.name}.safetensors"
        assert (a.stat().st_ino == b.stat().st_ino) == (t.site != MLP), t.name
    ckpt.verify(last)
    state, tensors = ckpt.load(last)
    for t in run.trainers:
        for key, value in t.state_tensors().items():
            assert torch.equal(tensors[t.name][key], value), (t.name, key)
