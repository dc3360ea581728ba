"""``metrics.json`` and the canonical SAE per site.

A folder's ``metrics.json`` has fixed sections, each written by one stage and left alone by the
others: ``training`` (the trainer's figures, measured on the last training batches) and ``eval``
(:func:`saescope.evaluate.suite.evaluate_release`: the held-out metrics, with ``eval.info`` saying
on what).  ``canonical.json`` at a release's root maps each site to its canonical SAE folder.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from saescope.jsonio import read_json, write_json
from saescope.release.layout import METRICS_JSON

SECTIONS = ("training", "eval")
CANONICAL_JSON = "canonical.json"
#: Gemma Scope's rule: per site, the SAE whose average L0 is closest to 100
CANONICAL_L0 = 100.0


def read_metrics(folder: str | Path) -> dict[str, Any]:
    """The sections of a folder's ``metrics.json`` ({} when it has none)."""
    metrics = read_json(Path(folder) / METRICS_JSON) or {}
    return {k: v for k, v in metrics.items() if k in SECTIONS}


def write_section(folder: str | Path, section: str, values: dict[str, Any]) -> Path:
    """Set one section of a folder's ``metrics.json``, keeping the others."""
    if section not in SECTIONS:
        raise ValueError(f"metrics.json has sections {', '.join(SECTIONS)}, not {section!r}")
    return write_json(Path(folder) / METRICS_JSON, {**read_metrics(folder), section: values})


def choose_canonical(candidates: Iterable[tuple[str, Any, float | None]], target_l0: float = CANONICAL_L0) -> dict:
    """Per site, the candidate whose L0 is closest to ``target_l0`` (Gemma Scope's rule with target
    100; ties go to the sparser SAE, then to the first name).  ``candidates``: ``(name, site, l0)``;
    those without a finite L0 are skipped.  Returns ``{site: name}`` sorted by site."""
    best: dict = {}
    for name, site, l0 in candidates:
        if not isinstance(l0, (int, float)) or not math.isfinite(l0):
            continue
        key = (abs(l0 - target_l0), l0, name)
        if site not in best or key < best[site]:
            best[site] = key
    return {site: key[2] for site, key in sorted(best.items())}


def write_canonical(root: str | Path, canonical: dict) -> Path:
    """``<root>/canonical.json``: ``{site name: folder name}``."""
    return write_json(Path(root) / CANONICAL_JSON, {str(site): name for site, name in canonical.items()})


def read_canonical(root: str | Path) -> dict[str, str] | None:
    return read_json(Path(root) / CANONICAL_JSON)
