"""What the report shows, read from a release folder: every evaluated SAE and the canonical ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saescope.evaluate.folders import find_sae_folders, folder_site, read_json
from saescope.sites import SITE_KINDS, Site

#: Gemma Scope's rule: per site, the SAE whose average L0 is closest to 100
CANONICAL_L0 = 100.0


@dataclass
class SAEEntry:
    path: str  # relative to the release root
    site: Site
    d_sae: int
    metrics: dict  # metrics.json

    def get(self, key: str) -> float:
        """A scalar metric, NaN when missing or null."""
        value = self.metrics.get(key)
        return float(value) if isinstance(value, (int, float)) else float("nan")


@dataclass
class ReportData:
    release: Path
    entries: list[SAEEntry]  # sorted by kind, layer, L0
    canonical: dict[Site, SAEEntry]
    info: dict  # eval.json's "info", when present
    unevaluated: list[str]  # SAE folders without metrics.json

    @property
    def kinds(self) -> list[str]:
        present = {e.site.kind for e in self.entries}
        return [k for k in SITE_KINDS if k in present]

    def of_kind(self, kind: str) -> list[SAEEntry]:
        return [e for e in self.entries if e.site.kind == kind]

    def canonical_of_kind(self, kind: str) -> list[SAEEntry]:
        return [e for site, e in sorted(self.canonical.items()) if site.kind == kind]


def release_root(run_or_release: str | Path) -> Path:
    """``<run>/release`` when given a run directory, else the folder itself."""
    path = Path(run_or_release)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    return path / "release" if (path / "release").is_dir() else path


def choose_canonical(entries: list[SAEEntry], target_l0: float = CANONICAL_L0) -> dict[Site, SAEEntry]:
    """Per site, the SAE whose measured L0 is closest to ``target_l0`` (ties: the smaller L0)."""
    best: dict[Site, SAEEntry] = {}
    for e in entries:
        key = (abs(e.get("l0") - target_l0), e.get("l0"))
        if e.site not in best or key < (abs(best[e.site].get("l0") - target_l0), best[e.site].get("l0")):
            best[e.site] = e
    return best


def load_report_data(run_or_release: str | Path, canonical_l0: float | None = None) -> ReportData:
    """Every evaluated SAE under the release folder.  Canonical SAEs: ``canonical_l0`` if given,
    else the release's ``canonical.json`` (``{site: folder}``, written by ``saescope run``) when
    present, else measured L0 closest to 100."""
    root = release_root(run_or_release)
    entries, unevaluated = [], []
    for folder in find_sae_folders(root):
        metrics = read_json(folder / "metrics.json")
        relative = folder.relative_to(root).as_posix() if folder != root else folder.name
        if not metrics or "eval" not in metrics:  # the trainer's metrics.json alone is not an evaluation
            unevaluated.append(relative)
            continue
        config = read_json(folder / "config.json")
        site = Site.parse(metrics["site"]) if "site" in metrics else folder_site(folder, config)
        d_sae = int(metrics.get("d_sae") or (config or {}).get("d_sae") or 0)
        entries.append(SAEEntry(relative, site, d_sae, metrics))
    if not entries:
        raise FileNotFoundError(f"no evaluated SAE under {root} (no metrics.json from an evaluation); "
                                "run `saescope eval` first")
    entries.sort(key=lambda e: (SITE_KINDS.index(e.site.kind), e.site.layer, e.get("l0"), e.path))
    info = (read_json(root / "eval.json") or {}).get("info", {})
    canonical = choose_canonical(entries, CANONICAL_L0 if canonical_l0 is None else canonical_l0)
    chosen = read_json(root / "canonical.json") if canonical_l0 is None else None
    if chosen:
        by_path = {e.path: e for e in entries}
        canonical.update({Site.parse(site): by_path[path] for site, path in chosen.items() if path in by_path})
    return ReportData(root, entries, canonical, info, unevaluated)

