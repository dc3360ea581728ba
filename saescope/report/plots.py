"""The report's figures: matplotlib (Agg backend, no display), one PNG per function.

Each function takes :class:`~saescope.report.data.ReportData` and an output path, and returns
the path, or None when the data holds nothing to draw (e.g. no corpus subsets).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from saescope.report.data import ReportData, SAEEntry

KIND_TITLES = {"resid_post": "residual stream (resid_post)", "attn_z": "attention (attn_z)",
               "mlp_out": "MLP output (mlp_out)", "mlp_in": "MLP input (mlp_in)",
               "transcoder": "transcoder (mlp_in → mlp_out)"}
KIND_COLORS = {"resid_post": "tab:blue", "attn_z": "tab:orange", "mlp_out": "tab:green", "mlp_in": "tab:olive",
               "transcoder": "tab:purple"}
DPI = 110


def _layer_colors(data: ReportData):
    n_layers = max(e.site.layer for e in data.entries) + 1
    cmap = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(vmin=0, vmax=max(n_layers - 1, 1))
    return (lambda layer: cmap(norm(layer))), matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)


def _columns(n: int, height: float = 3.8, rows: int = 1):
    fig, axes = plt.subplots(rows, n, figsize=(5.0 * n + 1.0, height * rows), squeeze=False, layout="constrained")
    return fig, axes


def _log_x(ax, base: int = 10) -> None:
    """A log x axis labelled with plain numbers (1, 2, 5, 10, 20, …), no crowded minor labels."""
    from matplotlib import ticker

    ax.set_xscale("log", base=base)
    if base == 10:
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _finite(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def tradeoff(data: ReportData, metric: str, label: str, path: Path, *, higher_is_better: bool = False) -> Path:
    """``metric`` against L0, one panel per site kind, one line per layer; canonical SAEs ringed."""
    color_of, mappable = _layer_colors(data)
    fig, axes = _columns(len(data.kinds))
    for ax, kind in zip(axes[0], data.kinds):
        entries = data.of_kind(kind)
        ax.set_title(KIND_TITLES.get(kind, kind))
        if not any(math.isfinite(e.get(metric)) and math.isfinite(e.get("l0")) and e.get("l0") > 0 for e in entries):
            ax.text(0.5, 0.5, f"no {metric} in these metrics.json files", ha="center", transform=ax.transAxes)
            continue
        for layer in sorted({e.site.layer for e in entries}):
            row = sorted((e for e in entries if e.site.layer == layer), key=lambda e: e.get("l0"))
            ax.plot([e.get("l0") for e in row], [e.get(metric) for e in row], "o-", ms=4, lw=1.4,
                    color=color_of(layer))
        canon = data.canonical_of_kind(kind)
        ax.scatter([e.get("l0") for e in canon], [e.get(metric) for e in canon], s=90, facecolors="none",
                   edgecolors="black", lw=1.2, label="canonical (L0 closest to target)", zorder=3)
        _log_x(ax)
        ax.set_title(KIND_TITLES.get(kind, kind))
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="best", fontsize=8)
    fig.colorbar(mappable, ax=axes[0].tolist(), label="layer", fraction=0.025, pad=0.01)
    fig.suptitle(f"{label} against L0 (one line per layer; {'higher' if higher_is_better else 'lower'} is better)")
    return _save(fig, path)


def canonical_by_layer(data: ReportData, path: Path) -> Path:
    """Delta loss and per-dimension FVU of the canonical SAEs across layers, a line per kind; the worst site marked."""
    fig, axes = _columns(2)
    for ax, (metric, label) in zip(axes[0], (("delta_loss", "delta LM loss (nats)"),
                                             ("fvu_std", "FVU (per-dim std.)"))):
        worst: tuple[float, SAEEntry] | None = None
        for kind in data.kinds:
            canon = data.canonical_of_kind(kind)
            values = [e.get(metric) for e in canon]
            ax.plot([e.site.layer for e in canon], values, "o-", color=KIND_COLORS.get(kind), label=kind)
            for e, v in zip(canon, values):
                if math.isfinite(v) and (worst is None or v > worst[0]):
                    worst = (v, e)
        if worst is not None:
            v, e = worst
            ax.scatter([e.site.layer], [v], s=200, facecolors="none", edgecolors="red", lw=2, zorder=3)
            right_half = e.site.layer > max(x.site.layer for x in data.entries) / 2
            ax.annotate(f"hardest: {e.site}\n{label.split(' (')[0]} = {v:.3g}", (e.site.layer, v),
                        textcoords="offset points", xytext=(-12 if right_half else 12, -10), color="red",
                        fontsize=9, va="top", ha="right" if right_half else "left")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]} of canonical SAEs by layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def by_position(data: ReportData, path: Path) -> Path | None:
    """Reconstruction loss and delta loss by token position, canonical SAEs, a line per layer."""
    if not any("by_position" in e.metrics for e in data.canonical.values()):
        return None
    color_of, mappable = _layer_colors(data)
    fig, axes = _columns(len(data.kinds), height=3.4, rows=2)
    for col, kind in enumerate(data.kinds):
        for e in data.canonical_of_kind(kind):
            pos = e.metrics.get("by_position")
            if not pos:
                continue
            x = np.array(pos["position_start"], dtype=float)
            # MSE relative to the site's variance per token (= overall FVU / overall MSE): comparable
            # across layers, and the bins average back to the SAE's FVU.
            variance = e.get("mse") / e.get("fvu") if e.get("fvu") else math.nan
            axes[0, col].plot(x, _finite(pos["mse"]) / variance, "o-", ms=3, color=color_of(e.site.layer))
            axes[1, col].plot(x, _finite(pos["delta_loss"]), "o-", ms=3, color=color_of(e.site.layer))
        axes[0, col].set_title(KIND_TITLES.get(kind, kind))
        axes[0, col].set_ylabel("MSE ÷ site variance")
        axes[1, col].set_ylabel("delta LM loss (nats)")
        axes[1, col].axhline(0, color="grey", lw=0.8)
        for ax in axes[:, col]:
            _log_x(ax, base=2)
            ax.set_xlabel("token position (bin start)")
            ax.grid(alpha=0.3, which="both")
    fig.colorbar(mappable, ax=axes.ravel().tolist(), label="layer", fraction=0.02, pad=0.02)
    fig.suptitle("Loss by token position (canonical SAEs)")
    return _save(fig, path)


def firing_frequency(data: ReportData, path: Path) -> Path | None:
    """Histograms of log10 firing density of the canonical SAEs' latents, a line per layer."""
    if not any("firing_histogram" in e.metrics for e in data.canonical.values()):
        return None
    color_of, mappable = _layer_colors(data)
    fig, axes = _columns(len(data.kinds))
    for ax, kind in zip(axes[0], data.kinds):
        dead = []
        for e in data.canonical_of_kind(kind):
            hist = e.metrics.get("firing_histogram")
            if not hist:
                continue
            edges = np.array(hist["log10_density_edges"])
            ax.stairs(np.array(hist["counts"]), edges, color=color_of(e.site.layer), lw=1.3)
            dead.append(hist["n_dead"])
        ax.axvline(-1, color="red", ls="--", lw=1, label="10% of tokens (high frequency)")
        ax.set_yscale("symlog", linthresh=1)
        dead_text = "" if not dead else f"{min(dead)}" if min(dead) == max(dead) else f"{min(dead)}–{max(dead)}"
        ax.set_title(KIND_TITLES.get(kind, kind) + (f"\ndead latents per SAE: {dead_text}" if dead else ""))
        ax.set_xlabel("log10(firing density)")
        ax.set_ylabel("latents")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.colorbar(mappable, ax=axes[0].tolist(), label="layer", fraction=0.025, pad=0.01)
    fig.suptitle("Latent firing frequency (canonical SAEs; dead latents not shown)")
    return _save(fig, path)


def by_subset(data: ReportData, path: Path) -> Path | None:
    """Delta loss and FVU per corpus subset (columns) and canonical site (rows).

    Sites differ by orders of magnitude, so the colour is each cell relative to its site's
    overall value (which subsets are hard for this site); the numbers are absolute.
    """
    canon = [e for _, e in sorted(data.canonical.items(), key=lambda kv: (data.kinds.index(kv[0].kind), kv[0].layer))]
    subsets = sorted({s for e in canon for s in e.metrics.get("by_subset", {})})
    if not subsets:
        return None
    n_rows = len(canon)
    width = 2.5 + 0.5 * len(subsets)
    fig, axes = plt.subplots(1, 2, figsize=(2 * width, 2.2 + 0.26 * n_rows), squeeze=False, layout="constrained")
    for ax, (metric, label) in zip(axes[0], (("delta_loss", "delta LM loss (nats)"), ("fvu", "FVU"))):
        grid = np.array([[(e.metrics["by_subset"].get(s) or {}).get(metric) for s in subsets] for e in canon],
                        dtype=float)
        overall = np.array([e.get(metric) for e in canon])[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(np.abs(overall) > 0, grid / overall, np.nan)
        image = ax.imshow(relative, aspect="auto", cmap="RdBu_r", vmin=0.5, vmax=1.5)
        ax.set_xticks(range(len(subsets)), subsets, rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(n_rows), [str(e.site) for e in canon], fontsize=7 if n_rows > 20 else 9)
        ax.set_title(f"{label} by subset")
        if grid.size <= 400:
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    dark = np.isfinite(relative[i, j]) and abs(relative[i, j] - 1) > 0.3
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6 if grid.size > 150 else 7,
                            color="white" if dark else "black")
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, label="÷ the site's overall value")
    fig.suptitle("Metrics by corpus subset (canonical SAEs; red = harder than the site's average)")
    return _save(fig, path)
