"""Train a sweep and release it: what ``saescope train``, ``saescope run`` and each rank of a
parallel run call.  The trainer trains; the release step (:func:`saescope.release.save.release_trained`)
writes the folders; this module joins the two and writes ``<out>/train_summary.json``."""

from __future__ import annotations

from pathlib import Path

from saescope.jsonio import write_json
from saescope.locks import folder_lock
from saescope.release.save import release_trained
from saescope.train.trainer import Trainer, TrainedSAE

SUMMARY_JSON = "train_summary.json"


def release_results(trainer: Trainer, results: list[TrainedSAE], *, folders: bool = True) -> list[Path]:
    """Release ``results`` under ``<out>/release`` and write the run's summary (every SAE: its
    folder and metrics, or its error).  Returns the folders written (none if not ``folders``)."""
    B = trainer.recipe.batch_size
    with folder_lock(trainer.out_dir, "training run"):
        written, entries = release_trained(results, trainer.out_dir / "release", model_name=trainer.model_name,
                                           recipe=trainer.recipe.to_dict(), batch_size=B, write_folders=folders,
                                           layout=trainer.options.release_layout)
        write_json(trainer.out_dir / SUMMARY_JSON, {"n_steps": trainer.n_steps, "tokens": trainer.n_steps * B,
                                                    "saes": entries}, indent=1, sort_keys=True)
    return written


def train_and_release(trainer: Trainer) -> list[Path]:
    """``trainer.fit()``, then, on the rank that writes, the release.  Returns the folders written."""
    results = trainer.fit()
    return release_results(trainer, results) if trainer.plan.writes else []
