"""Did each SAE get the L0 it was asked for?  Warnings for the release step (and eval).

A known failure of JumpReLU training is an L0 that stops responding to its coefficient: Adam
normalises the sparsity gradient away outside a narrow band (SAELens #719: raising the coefficient
100× moved L0 from 26.6 to 26.0), or θ moves too slowly (~lr per step) for a short run to reach
the L0 λ asks for.  Rather than release a wrong L0 silently, the release warns:

* a target-L0 SAE whose L0 misses its target by more than :data:`TOLERANCE` (15%); when its L0
  also closed less than half the gap while λ was at full strength (from the end of the λ warm-up
  to the end of the run), it says the L0 is not responding to λ;
* a λ sweep (same site, width and architecture) whose L0 moved by less than 10% over a ≥ 10×
  range of λ;
* a target sweep whose L0s moved by less than 10% over a ≥ 2× range of targets.

Pure functions of the figures (no torch), so they are tested on built cases.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

#: a released L0 within ±15% of its target is on target (the issue's tolerance)
TOLERANCE = 0.15


def target_miss(l0: float, target: float) -> float:
    """(l0 − target)/target."""
    return (l0 - target) / target


def l0_warnings(entries: Iterable[dict]) -> dict[str, list[str]]:
    """Warnings per SAE name.  Each entry: ``name``, ``group`` (SAEs that form one sweep, e.g.
    (site, width, architecture)), ``l0`` (what the released SAE fires), and either ``target_l0``
    or ``sparsity_coefficient``; optionally ``l0_after_warmup`` (the mean L0 right after the λ warm-up) and ``warmup_end``."""
    entries = list(entries)
    out: dict[str, list[str]] = defaultdict(list)
    for e in entries:
        target = e.get("target_l0")
        if target is None:
            continue
        miss = target_miss(e["l0"], target)
        if abs(miss) <= TOLERANCE:
            continue
        text = f"L0 {e['l0']:.1f} misses its target {target:g} by {miss:+.0%} (tolerance ±{TOLERANCE:.0%})"
        start = e.get("l0_after_warmup")
        if start is not None and abs(e["l0"] - target) > 0.5 * abs(start - target):
            text += (f"; the L0 is not responding to λ: it went from {start:.1f} to {e['l0']:.1f} while λ was at full "
                     f"strength (from step {e.get('warmup_end', '?')} to the end of the run); raise λ "
                     "(--l0-coefficients), the learning rate or the number of steps")
        else:
            text += "; train longer, or raise λ or the learning rate"
        out[e["name"]].append(text)

    groups: dict = defaultdict(list)
    for e in entries:
        groups[(tuple(e["group"]), e.get("target_l0") is not None)].append(e)
    for (group, by_target), members in groups.items():
        if len(members) < 2:
            continue
        key = "target_l0" if by_target else "sparsity_coefficient"
        members = sorted(members, key=lambda e: e[key])
        lo, hi = members[0], members[-1]
        if not lo[key] > 0:
            continue
        ratio = hi[key] / lo[key]
        l0s = [e["l0"] for e in members]
        spread = max(l0s) / max(min(l0s), 1e-9)
        if by_target and ratio >= 2 and spread < 1.1:
            text = (f"the L0 does not follow the target: targets {lo[key]:g} to {hi[key]:g} gave L0 {lo['l0']:.1f} "
                    f"to {hi['l0']:.1f}")
        elif not by_target and ratio >= 10 and spread < 1.1:
            text = (f"the L0 stopped responding to λ: λ ×{ratio:g} ({lo[key]:g} → {hi[key]:g}) moved L0 only "
                    f"{lo['l0']:.1f} → {hi['l0']:.1f}; the released L0s are not the sweep asked for (train longer, "
                    "raise the learning rate, or use --target-l0)")
        else:
            continue
        for e in members:
            out[e["name"]].append(text)
    return dict(out)
