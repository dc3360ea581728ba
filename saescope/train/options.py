"""Knobs of a training run that change no result (where it runs, how often it reports and saves)."""

from __future__ import annotations

from dataclasses import dataclass

from saescope.settings import RELEASE_LAYOUTS
from saescope.train.run_log import check_loggers


@dataclass(frozen=True)
class TrainOptions:
    """Knobs that change no result: where SAEs train and how often the run reports and saves."""

    device: str = "cpu"
    #: steps between checkpoints (and at the last step)
    checkpoint_every: int = 1_000
    #: checkpoints kept on disk (at least 2 under site parallelism: ranks may step back one)
    keep_checkpoints: int = 2
    #: steps between metric records (and at the last step)
    log_every: int = 100
    #: extra metric sinks, "tensorboard" and/or "wandb" (must be installed)
    loggers: tuple[str, ...] = ()
    #: show a progress bar
    progress: bool = True
    #: how the release names and writes its folders: "saescope" (ours, Gemma Scope 1's tail) or
    #: "gemma-scope-2" (:mod:`saescope.release.gemma_scope_2`)
    release_layout: str = "saescope"

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")
        if self.release_layout not in RELEASE_LAYOUTS:
            raise ValueError(f"unknown release layout {self.release_layout!r}; use one of {', '.join(RELEASE_LAYOUTS)}")
        check_loggers(tuple(self.loggers))
