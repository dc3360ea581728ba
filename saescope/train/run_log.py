"""Training metrics: one JSON object per line in ``<out>/train_log.jsonl``, plus, only when asked
for and installed, TensorBoard or Weights & Biases.

Lines are strict JSON (NaN and Inf are written as ``null``, :mod:`saescope.jsonio`).  Records carry ``"step"`` (updates done so far).  On resume, records past the checkpoint's step
(written by the killed run after its last checkpoint) are dropped, and a run restarted from
scratch starts a new file, so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from saescope.jsonio import dumps

LOGGERS = ("tensorboard", "wandb")


def check_loggers(loggers: tuple[str, ...]) -> None:
    """Refuse unknown or uninstalled metric sinks before any work is done."""
    for logger in loggers:
        if logger not in LOGGERS:
            raise ValueError(f"unknown logger {logger!r}: use one of {', '.join(LOGGERS)}")
        if importlib.util.find_spec(logger) is None:
            raise RuntimeError(f"logger {logger!r} was asked for but is not installed (pip install {logger})")


class NullLog:
    """The metrics log of ranks that do not write one."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class RunLog:
    def __init__(self, path: Path, *, resume_step: int = 0, loggers: tuple[str, ...] = (), run_name: str = "saescope"):
        check_loggers(loggers)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._file = open(self.path, "a")
        self._tensorboard = None
        self._wandb = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))
        if "wandb" in loggers:
            import wandb

            self._wandb = wandb.init(project="saescope", name=run_name, dir=str(self.path.parent), resume="allow")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        if step == 0:  # a fresh start: nothing of an earlier attempt counts
            self.path.unlink()
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(dumps(record) + "\n")
        self._file.flush()
        name, step = record.get("sae"), record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tensorboard is not None and name:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(f"{name}/{key}", value, step)
        if self._wandb is not None and name:
            self._wandb.log({f"{name}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()
