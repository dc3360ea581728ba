"""What the report shows, read from a release folder: every evaluated SAE and the canonical ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saescope.jsonio import read_json
from saescope.release.layout import find_sae_folders, folder_name, folder_site, release_root
from saescope.release.metrics import CANONICAL_L0, choose_canonical, read_canonical, read_metrics
from saescope.sites import KNOWN_KINDS, Site


@dataclass
class SAEEntry:
    path: str  # relative to the release root
    site: Site
    d_sae: int
    metrics: dict  # metrics.json's eval section

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
        return [k for k in KNOWN_KINDS if k in present]

    def of_kind(self, kind: str) -> list[SAEEntry]:
        return [e for e in self.entries if e.site.kind == kind]

    def canonical_of_kind(self, kind: str) -> list[SAEEntry]:
        return [e for site, e in sorted(self.canonical.items()) if site.kind == kind]


def canonical_entries(entries: list[SAEEntry], target_l0: float = CANONICAL_L0) -> dict[Site, SAEEntry]:
    """Per site, the entry whose measured L0 is closest to ``target_l0`` (the release's rule)."""
    by_path = {e.path: e for e in entries}
    chosen = choose_canonical(((e.path, e.site, e.get("l0")) for e in entries), target_l0)
    return {site: by_path[path] for site, path in chosen.items()}


def load_report_data(run_or_release: str | Path, canonical_l0: float | None = None) -> ReportData:
    """Every evaluated SAE under the release folder.  Canonical SAEs: ``canonical_l0`` if given,
    else the release's ``canonical.json`` (``{site: folder}``, written by ``saescope run``) when
    present, else measured L0 closest to 100."""
    root = release_root(run_or_release)
    entries, unevaluated = [], []
    for folder in find_sae_folders(root):
        metrics = read_metrics(folder).get("eval")
        relative = folder_name(folder, root)
        if not metrics:  # the trainer's figures alone are not an evaluation
            unevaluated.append(relative)
            continue
        config = read_json(folder / "config.json")
        site = Site.parse(metrics["site"]) if "site" in metrics else folder_site(folder, config)
        d_sae = int(metrics.get("d_sae") or (config or {}).get("d_sae") or 0)
        entries.append(SAEEntry(relative, site, d_sae, metrics))
    if not entries:
        raise FileNotFoundError(f"no evaluated SAE under {root} (no metrics.json from an evaluation); "
                                "run `saescope eval` first")
    entries.sort(key=lambda e: (KNOWN_KINDS.index(e.site.kind), e.site.layer, e.get("l0"), e.path))
    info = (read_json(root / "eval.json") or {}).get("info", {})
    by_path = {e.path: e for e in entries}
    canonical = canonical_entries(entries, CANONICAL_L0 if canonical_l0 is None else canonical_l0)
    chosen = read_canonical(root) if canonical_l0 is None else None
    if chosen:
        canonical.update({Site.parse(site): by_path[path] for site, path in chosen.items() if path in by_path})
    return ReportData(root, entries, canonical, info, unevaluated)

