"""Atomic checkpoints and the run's identity, so a killed run resumes bit-identically.

Layout under ``<out>/checkpoints/``::

    run.json               what this run is (specs, recipe, steps, data seed, site widths);
                           a relaunch with anything different is refused, naming the difference
    latest.json            {"step": N, "dir": "step_000000N"} — the last *complete* checkpoint
    step_000000N/
        state.json         step, per-site scales C, per-SAE bookkeeping (error, tokens seen)
        <sae name>.safetensors   parameters, Adam moments and counters of one SAE

A checkpoint is written into a temporary folder, flushed to disk, renamed into place (atomic
on POSIX), and only then does ``latest.json`` (itself replaced atomically) point to it.  A run
killed at any moment leaves either the old or the new checkpoint in force, never a mixture.
Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saescope.jsonio import dumps, write_json


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


class CheckpointDir:
    """Reads and writes one run's checkpoints (see module docstring)."""

    def __init__(self, root: Path, keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, keep)

    # --- run identity ------------------------------------------------------------------------

    def check_or_write_run(self, run: dict[str, Any]) -> None:
        """Record ``run`` on first launch; on a relaunch, refuse any difference, naming it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "run.json"
        if not path.exists():
            write_json(path, run, indent=1, sort_keys=True)
            return
        previous = json.loads(path.read_text())
        differences = describe_differences(previous, json.loads(dumps(run)))
        if differences:
            raise ValueError(
                f"{self.root.parent} already holds a different training run ({'; '.join(differences)}); "
                "use another output folder, or delete that one to start over"
            )

    # --- checkpoints -------------------------------------------------------------------------

    def latest(self) -> tuple[int, Path] | None:
        """``(step, folder)`` of the last complete checkpoint, or None."""
        pointer = self.root / "latest.json"
        if not pointer.exists():
            return None
        info = json.loads(pointer.read_text())
        folder = self.root / info["dir"]
        if not (folder / "state.json").exists():
            raise RuntimeError(f"checkpoint pointer {pointer} names {folder}, which is missing or incomplete")
        return int(info["step"]), folder

    def save(self, step: int, state: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> Path:
        """Write ``state`` (JSON) and one safetensors file per name in ``tensors``, atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:09d}"
        final = self.root / name
        current = self.latest()
        if current is not None and current[1] == final:
            return final  # already saved (a finished run relaunched): same content by construction
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for sae_name, named in tensors.items():
            path = tmp / f"{sae_name}.safetensors"
            save_file(named, str(path))
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        write_json(tmp / "state.json", {"step": step, **state}, indent=1, sort_keys=True)
        _fsync_dir(tmp)
        if final.exists():  # a stale folder from a run killed before its pointer moved
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self._point_to(step, name)
        self._prune(keep_dir=final)
        return final

    def _point_to(self, step: int, name: str) -> None:
        write_json(self.root / "latest.json", {"step": step, "dir": name}, indent=1, sort_keys=True)

    def step_back_to(self, step: int) -> None:
        """Make the checkpoint of ``step`` (still on disk: ``keep`` ≥ 2) the latest, or start over
        when ``step`` is 0 — what a rank does when the others resume from an earlier step."""
        pointer = self.root / "latest.json"
        if step == 0:
            pointer.unlink(missing_ok=True)
            return
        name = f"step_{step:09d}"
        if not (self.root / name / "state.json").exists():
            raise RuntimeError(f"the checkpoint of step {step} ({self.root / name}) is no longer on disk")
        self._point_to(step, name)

    def load(self, folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        state = json.loads((folder / "state.json").read_text())
        tensors = {p.name[: -len(".safetensors")]: load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}
        return state, tensors

    def remove_partial(self) -> None:
        """Delete temporary folders left by a run killed while writing."""
        if self.root.exists():
            for tmp in self.root.glob(".step_*.tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)

    def _prune(self, keep_dir: Path) -> None:
        folders = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in folders[: -self.keep]:
            if old != keep_dir:
                shutil.rmtree(old, ignore_errors=True)


def describe_differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences between two JSON values, e.g. ``recipe.lr: 7e-05 -> 0.0001``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            where = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append(f"{where} was {old[key]!r}, now absent")
            elif key not in old:
                out.append(f"{where} is new ({new[key]!r})")
            else:
                out.extend(describe_differences(old[key], new[key], where))
        return out
    if old != new:
        return [f"{path}: {old!r} -> {new!r}"]
    return []
