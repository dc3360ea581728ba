"""Atomic checkpoints and the run's identity, so a killed run resumes bit-identically.

Layout under ``<out>/checkpoints/``::

    run.json               what this run is (specs, recipe, steps, data seed, site widths);
                           a relaunch with anything different is refused, naming the difference
    latest.json            {"step": N, "dir": "step_000000N"} — the last *complete* checkpoint
    step_000000N/
        manifest.json      every other file's SHA-256 and size, written last: a checkpoint whose
                           files do not match it is damaged, and the one before it is used
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
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from saescope.activations.store import sha256_file
from saescope.errors import IntegrityError, UserError, warn
from saescope.jsonio import dumps, read_json, write_json

CHECKPOINT_MANIFEST = "manifest.json"


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
        self._verified: dict[Path, dict] = {}
        self._saved_versions: dict[str, str] = {}  # what :meth:`save` last wrote (the pointer's checkpoint)

    # --- run identity ------------------------------------------------------------------------

    def check_or_write_run(self, run: dict[str, Any], *, owner: bool = True) -> None:
        """Record ``run`` on first launch; on a relaunch, refuse any difference, naming it.

        ``owner``: this process writes the folder (it holds the run's lock): it records ``run``
        and deletes what a killed run left half written.  The other ranks of a data-parallel run
        only compare: were they to clean up too, they would delete rank 0's files in flight."""
        path = self.root / "run.json"
        if owner:
            self.root.mkdir(parents=True, exist_ok=True)
            self.remove_partial()
        try:
            previous = read_json(path)
        except ValueError as err:
            raise IntegrityError(f"{err}; delete {self.root} to start this training run over") from None
        if previous is None:
            if owner:
                write_json(path, run, indent=1, sort_keys=True)
            return
        differences = describe_differences(previous, json.loads(dumps(run)))
        if differences:
            raise UserError(
                f"{self.root.parent} already holds a different training run ({'; '.join(differences)}); "
                "use another output folder, or delete that one to start over"
            )

    # --- checkpoints -------------------------------------------------------------------------

    def _pointer(self) -> tuple[int, str] | None:
        """What ``latest.json`` says, or None when it is missing or unreadable (then the step
        folders themselves are searched: losing the pointer must not restart a run at step 0)."""
        pointer = self.root / "latest.json"
        if not pointer.exists():
            return None
        try:
            info = json.loads(pointer.read_text())
            return int(info["step"]), str(info["dir"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            warn(f"checkpoint pointer {pointer} is unreadable; looking for the newest intact step_* folder")
            return None

    def _candidates(self) -> list[tuple[int, Path]]:
        """Checkpoints to resume from, best first: the pointer's, then earlier ones, newest first
        (with no pointer: every step folder, newest first)."""
        folders = {}
        for p in self.root.glob("step_*"):
            if p.is_dir() and p.name[5:].isdigit():
                folders[int(p.name[5:])] = p
        pointer = self._pointer()
        if pointer is None:
            if folders:
                warn(f"{self.root / 'latest.json'} is missing; resuming from the newest intact checkpoint")
            return sorted(folders.items(), reverse=True)
        step, name = pointer
        earlier = sorted(((s, p) for s, p in folders.items() if s < step), reverse=True)
        return [(step, self.root / name)] + earlier

    def latest(self) -> tuple[int, Path] | None:
        """``(step, folder)`` of the last complete *and intact* checkpoint, or None when there is
        none.  A damaged newest checkpoint is skipped with a warning for the one before it (two
        are kept); when none is intact, :class:`~saescope.errors.IntegrityError` says so."""
        if not self.root.exists():
            return None
        problems = []
        for step, folder in self._candidates():
            try:
                self.verify(folder)
            except IntegrityError as err:
                problems.append(str(err))
                continue
            if problems:
                warn(f"{problems[0]}; resuming from the earlier intact checkpoint {folder.name} instead")
            return step, folder
        if problems:
            raise IntegrityError(f"{problems[0]}; no intact checkpoint is left: delete {self.root} to start "
                                 "training over")
        return None

    def verify(self, folder: Path) -> dict[str, Any]:
        """Check every file of a checkpoint against its ``manifest.json``; return the manifest."""
        folder = Path(folder)
        if folder in self._verified:
            return self._verified[folder]
        path = folder / CHECKPOINT_MANIFEST
        if not folder.is_dir():
            raise IntegrityError(f"checkpoint {folder} is missing")
        try:
            manifest = read_json(path)
        except ValueError as err:
            raise IntegrityError(f"checkpoint manifest {err}") from None
        if manifest is None or not isinstance(manifest.get("files"), dict):
            raise IntegrityError(f"checkpoint {folder} has no valid {CHECKPOINT_MANIFEST} (it is written last: the "
                                 "checkpoint is incomplete, or was made by an older saescope)")
        for name, entry in sorted(manifest["files"].items()):
            file = folder / name
            if not file.is_file():
                raise IntegrityError(f"checkpoint file {file} is missing")
            if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
                raise IntegrityError(f"checkpoint file {file} is damaged (its SHA-256 does not match "
                                     f"{path})")
        self._verified[folder] = manifest
        return manifest

    def save(self, step: int, state: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]],
             versions: Mapping[str, str] | None = None) -> Path:
        """Write ``state`` (JSON) and one safetensors file per name in ``tensors``, then the
        folder's manifest (every file's SHA-256, written last), atomically.

        ``versions``: a string per name that changes whenever its tensors do.  A name whose
        version is the one it had at this object's previous save (an SAE that stopped training,
        the input maps) is hard-linked from that checkpoint (copied where links fail) with its
        manifest entry, not written and hashed again."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:09d}"
        final = self.root / name
        if self._pointer() == (step, name) and final.exists():
            return final  # already saved (a finished run relaunched): same content by construction
        tmp = self.root / f".{name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        files = {}
        versions = dict(versions or {})
        previous = self._reusable([n for n, v in versions.items() if self._saved_versions.get(n) == v])
        for sae_name, named in tensors.items():
            path = tmp / f"{sae_name}.safetensors"
            if path.name in previous:
                _link_or_copy(previous[path.name][0], path)
                files[path.name] = previous[path.name][1]
                continue
            save_file(named, str(path))
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        state_path = write_json(tmp / "state.json", {"step": step, **state}, indent=1, sort_keys=True)
        files["state.json"] = {"sha256": sha256_file(state_path), "bytes": state_path.stat().st_size}
        write_json(tmp / CHECKPOINT_MANIFEST, {"step": step, "files": files}, indent=1, sort_keys=True)
        _fsync_dir(tmp)
        if final.exists():  # a stale folder from a run killed before its pointer moved
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._verified.pop(final, None)
        _fsync_dir(self.root)
        self._point_to(step, name)
        self._prune(keep_dir=final)
        self._saved_versions = versions
        return final

    def _reusable(self, names: Collection[str]) -> dict[str, tuple[Path, dict]]:
        """``{file name: (path, manifest entry)}`` in the pointer's checkpoint for ``names``."""
        pointer = self._pointer()
        if not names or pointer is None:
            return {}
        folder = self.root / pointer[1]
        try:
            entries = read_json(folder / CHECKPOINT_MANIFEST)["files"]
        except (ValueError, TypeError, KeyError):
            return {}  # no usable manifest: everything is written afresh
        out = {}
        for name in names:
            file = f"{name}.safetensors"
            entry = entries.get(file)
            if entry is not None and (folder / file).is_file() and (folder / file).stat().st_size == entry["bytes"]:
                out[file] = (folder / file, entry)
        return out

    def _point_to(self, step: int, name: str) -> None:
        write_json(self.root / "latest.json", {"step": step, "dir": name}, indent=1, sort_keys=True)

    def step_back_to(self, step: int) -> None:
        """Make the checkpoint of ``step`` (still on disk: ``keep`` ≥ 2) the latest, or start over
        when ``step`` is 0 — what a rank does when the others resume from an earlier step."""
        pointer = self.root / "latest.json"
        if step == 0:
            pointer.unlink(missing_ok=True)
            for folder in self.root.glob("step_*"):  # or the pointer's absence would find them again
                shutil.rmtree(folder, ignore_errors=True)
            return
        name = f"step_{step:09d}"
        if not (self.root / name / "state.json").exists():
            raise RuntimeError(f"the checkpoint of step {step} ({self.root / name}) is no longer on disk")
        self._point_to(step, name)

    def load(self, folder: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """The state and tensors of a checkpoint, verified against its manifest first."""
        manifest = self.verify(folder)
        state = json.loads((folder / "state.json").read_text())
        tensors = {}
        for name in sorted(manifest["files"]):
            if name.endswith(".safetensors"):
                try:
                    tensors[name[: -len(".safetensors")]] = load_file(str(folder / name))
                except Exception as err:  # noqa: BLE001 -- verified bytes that still do not parse
                    raise IntegrityError(f"checkpoint file {folder / name} cannot be read ({err}); "
                                         f"delete {folder} to resume from the checkpoint before it") from None
        return state, tensors

    def remove_partial(self) -> None:
        """Delete temporary folders and files left by a run killed while writing (the caller
        holds the run's lock, so no live process owns them)."""
        if self.root.exists():
            for tmp in self.root.glob(".*.tmp-*"):  # a checkpoint folder or latest.json half written
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)

    def _prune(self, keep_dir: Path) -> None:
        folders = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in folders[: -self.keep]:
            if old != keep_dir:
                shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # checkpoint files are never written in place, so sharing one is safe
    except OSError:
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as f:
            os.fsync(f.fileno())


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
