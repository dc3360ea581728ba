"""Exports of a release for other libraries (the formats live beside: :mod:`saescope.release.saelens`)."""

from __future__ import annotations

from pathlib import Path

from saescope.release.saelens import CFG_JSON, WEIGHTS, saelens_config, saelens_tensors


def export_folder(folder: Path, out: Path, root: Path | None = None) -> Path:
    """One release folder as a SAELens folder ``out``; returns ``out``."""
    from safetensors.torch import save_file

    from saescope.jsonio import write_json
    from saescope.release.load import read_release_folder

    released = read_release_folder(folder, root)
    cfg = saelens_config(released.sae, released.site, released.config)
    out.mkdir(parents=True, exist_ok=True)
    save_file(saelens_tensors(released.sae), str(out / WEIGHTS))
    write_json(out / CFG_JSON, cfg, indent=1)
    return out


def export_saelens(path: str | Path, out: str | Path) -> list[Path]:
    """Every SAE folder at or under ``path`` (a release, a run's release or one folder) as SAELens
    folders under ``out``, named by their place in the release.  Returns the folders written."""
    from saescope.release.layout import find_sae_folders, release_root

    path = Path(path)
    root = release_root(path) if (path / "release").is_dir() else path
    folders = find_sae_folders(root)
    if not folders:
        raise FileNotFoundError(f"no SAE folder at or under {root}")
    out = Path(out)
    written = []
    for folder in folders:
        relative = folder.relative_to(root) if folder != root else Path(folder.name)
        written.append(export_folder(folder, out / relative, root))
    return written


def export_circuit_tracer(path: str | Path, out: str | Path, *, target_l0: float | None = None,
                          model_name: str | None = None) -> Path:
    """A release's transcoders as one circuit-tracer transcoder set under ``out``
    (:mod:`saescope.release.circuit_tracer`): one per layer, every layer from 0 of one model.

    Where a layer has several transcoders, the release's canonical one is taken (canonical.json),
    or with ``target_l0`` the one whose L0 is closest to it.  ``model_name`` is what
    circuit-tracer will load (default: the model the release names; the embedded default's local
    folder, since it is a converted copy of google/gemma-3-270m, not the hub's weights)."""
    import yaml
    from safetensors.torch import save_file

    from saescope import defaults
    from saescope.release import circuit_tracer as ct
    from saescope.release.layout import find_sae_folders, release_root
    from saescope.release.load import read_release_folder
    from saescope.release.metrics import choose_canonical, read_canonical

    path = Path(path)
    root = release_root(path) if (path / "release").is_dir() else path
    released = [r for r in (read_release_folder(f, root) for f in find_sae_folders(root))
                if r.site.kind == "transcoder"]
    if not released:
        raise ValueError(f"{root} holds no transcoder: circuit-tracer needs one per layer "
                         "(train them with --sites transcoder)")
    bad = sorted({r.sae.architecture for r in released} - set(ct.TRANSCODER_ARCHITECTURES))
    if bad:
        raise ValueError(f"circuit-tracer reads JumpReLU transcoders; {root} holds {', '.join(bad)} ones")
    by_name = {r.name: r for r in released}
    canonical = read_canonical(root) if target_l0 is None else None
    chosen = {}
    if canonical:
        chosen = {site: name for site, name in canonical.items() if name in by_name}
    if len(chosen) < len({r.site for r in released}):
        l0s = [(r.name, r.site.name, _l0(r)) for r in released]
        chosen = choose_canonical(l0s, target_l0 if target_l0 is not None else 100.0)
    per_layer = {by_name[name].site.layer: by_name[name] for name in chosen.values()}
    missing = sorted(set(range(max(per_layer) + 1)) - set(per_layer))
    if missing:
        raise ValueError(f"circuit-tracer needs a transcoder at every layer from 0; {root} has none at "
                         f"layer(s) {', '.join(map(str, missing))}")
    skips = {r.sae.architecture for r in per_layer.values()}
    if len(skips) > 1:
        raise ValueError("circuit-tracer reads one kind of transcoder per set; the chosen ones mix plain and skip "
                         "transcoders (pick one kind per layer, e.g. a release of only one)")
    models = {r.config.get("model") for r in per_layer.values()}
    if model_name is None:
        if len(models) > 1:
            raise ValueError(f"the chosen transcoders name several models ({', '.join(map(str, models))}): pass model_name")
        model_name = models.pop()
        if model_name == defaults.DEFAULT_MODEL:
            model_name = str(defaults.gemma_270m_folder())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    provenance = {"release": str(root.resolve()), "format_of": f"circuit-tracer {ct.CIRCUIT_TRACER_VERSION}",
                  "layers": {}}
    for layer, r in sorted(per_layer.items()):
        save_file(ct.tensors(r.sae), str(out / ct.layer_file(layer)))
        provenance["layers"][layer] = {"sae": r.name, "architecture": r.sae.architecture, "l0": _l0(r)}
    with open(out / ct.CONFIG_YAML, "w") as f:
        yaml.safe_dump(ct.config_yaml(model_name, len(per_layer), provenance), f, sort_keys=False)
    return out


def _l0(released) -> float | None:
    for section in ("eval", "training"):
        value = (released.metrics.get(section) or {}).get("l0" if section == "eval" else "average_l0")
        if value is not None:
            return float(value)
    return None
