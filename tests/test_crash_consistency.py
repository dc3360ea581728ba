"""Crash consistency through the real CLI: ``saescope train`` SIGKILLed while a release folder is
half written (the ghost SAE of issue 11), rerun, and its released arrays compared bit for bit
with an uninterrupted run's (checkpoint kills are tests/test_trainer.py's, in process).  The full
harness (harvest, train and every ``run`` stage, stage boundaries and random delays, 20+ points)
is ``benchmarks/crash_consistency.py``; this drives the same code on a few points."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import crash_consistency  # noqa: E402


def test_train_killed_while_releasing_resumes_to_identical_release(tmp_path):
    points = crash_consistency.run_points(
        tmp_path, ["train"], n_random=0, boundaries={"train": ["a release folder half written"]},
        log=lambda *_: None,
    )
    assert [p.name for p in points] == ["at: a release folder half written"]
    for p in points:
        assert p.killed, (p.name, p.detail)
        assert p.identical, (p.name, p.detail)
