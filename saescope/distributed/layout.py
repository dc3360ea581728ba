"""The run layout on disk of a multi-process run, and the agreements it needs.

A site-parallel, online or latent-parallel run keeps each rank's checkpoints and log under
``<out>/ranks/rank_<r>`` and records how it is split in ``<out>/parallel.json``; a relaunch split
otherwise is refused.  At the end rank 0 moves every rank's release folders into
``<out>/release`` and writes one ``<out>/train_summary.json``.  A data-parallel run uses the
single-process layout (rank 0 writes it all).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from saescope.distributed.collectives import all_reduce_, barrier
from saescope.distributed.env import DistEnv
from saescope.jsonio import write_json
from saescope.release.layout import unique_folder
from saescope.train.checkpoint import CheckpointDir

PARALLEL_JSON = "parallel.json"


def rank_dir(out_dir: Path, rank: int) -> Path:
    """Where one rank of a site-parallel, online or latent run keeps its checkpoints and log."""
    return Path(out_dir) / "ranks" / f"rank_{rank}"


def check_not_split(out_dir) -> None:
    """Refuse to run a single-process or data-parallel training in the folder of a site-parallel
    or online run (whose state lives under ``ranks/``): it would silently start over."""
    path = Path(out_dir) / PARALLEL_JSON
    if path.exists():
        layout = json.loads(path.read_text())
        raise ValueError(
            f"{out_dir} holds a {layout.get('mode')}-parallel run over {layout.get('world_size')} ranks: relaunch it "
            f"with torchrun ({layout.get('world_size')} processes in total) and the same arguments, or use another "
            "output folder"
        )


def check_layout(out_dir: Path, layout: dict, env: DistEnv) -> None:
    """Record how a run is split over ranks (``parallel.json``); refuse a relaunch split otherwise."""
    if (Path(out_dir) / "checkpoints" / "run.json").exists():
        raise ValueError(f"{out_dir} holds a single-process or data-parallel run; relaunch it the way it was "
                         "started (e.g. --parallel data), or use another output folder")
    path = Path(out_dir) / PARALLEL_JSON
    if env.is_main and not path.exists():
        write_json(path, layout, indent=1, sort_keys=True)
    barrier("recording the run's layout")
    previous = json.loads(path.read_text())
    if previous != json.loads(json.dumps(layout)):
        raise ValueError(
            f"{out_dir} holds a {previous.get('mode')}-parallel run over {previous.get('world_size')} ranks "
            f"with another split of the SAEs; relaunch it with {previous.get('world_size')} processes in total "
            f"and the same SAEs, or use another output folder (this launch: {layout['mode']}, "
            f"{layout['world_size']} ranks)"
        )


def agree_on_start_step(ckpt_root: Path, *, has_state: bool, env: DistEnv) -> int:
    """The step every rank resumes from: the smallest of the ranks' last checkpoints.

    A rank killed between two ranks' checkpoint writes leaves the others one checkpoint ahead;
    they step back to the common one (their previous checkpoint, kept by ``keep_checkpoints`` ≥ 2)
    so that every rank asks for the same batches.  Ranks without SAEs (``has_state=False``) abstain.
    """
    ckpt = CheckpointDir(ckpt_root)
    latest = ckpt.latest() if has_state else None
    none = 2**62
    mine = (latest[0] if latest else 0) if has_state else none
    start = int(all_reduce_(torch.tensor([mine], dtype=torch.int64), "min", what="agreeing on the step to resume from"))
    start = 0 if start == none else start
    if has_state and mine > start:
        try:
            ckpt.step_back_to(start)
        except RuntimeError as err:
            raise RuntimeError(f"{env}: the other ranks resume from step {start}, but {err}; "
                               "start over in a new output folder") from None
    return start


def merge_rank_runs(out_dir: Path, world_size: int) -> list[Path]:
    """Rank 0, after every rank finished: move each rank's release folders into ``<out>/release``
    (a name taken by another rank gets a ``_2``, ``_3`` ... suffix, as within one rank) and
    write ``<out>/train_summary.json`` listing every SAE with the rank that trained it."""
    out_dir = Path(out_dir)
    release, used, folders, saes, header = out_dir / "release", set(), [], [], {}
    for r in range(world_size):
        src_root = rank_dir(out_dir, r)
        path = src_root / "train_summary.json"
        if not path.exists():
            continue  # a rank with nothing to train
        summary = json.loads(path.read_text())
        header = {k: v for k, v in summary.items() if k != "saes"}
        for entry in summary["saes"]:
            entry = {**entry, "rank": r}
            if entry["status"] == "released":
                src = Path(entry["folder"])
                dst = unique_folder(release / src.relative_to(src_root / "release"), used)
                if src.exists():  # absent when an earlier merge of this run already moved it
                    if dst.exists():
                        shutil.rmtree(dst)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
                entry["folder"] = str(dst)
                folders.append(dst)
            saes.append(entry)
        shutil.rmtree(src_root / "release", ignore_errors=True)  # emptied folders (and stale temporaries)
    write_json(out_dir / "train_summary.json", {**header, "world_size": world_size, "saes": saes},
               indent=1, sort_keys=True)
    return folders


def finish_split_run(out_dir: Path, env: DistEnv) -> list[Path]:
    """Every rank: wait for all to finish; rank 0 merges the ranks' releases and summaries."""
    barrier("waiting for every rank to finish training", patient=True)
    folders = merge_rank_runs(out_dir, env.world_size) if env.is_main else []
    barrier("waiting for rank 0 to collect the released SAEs", patient=True)
    return folders
