"""``report/report.html``: a static page (no server) with the evaluation's plots and a table of
every SAE's metrics.  PNGs sit next to the page and are linked relatively, so the folder can be
moved or zipped as a whole."""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

from saescope.release.layout import width_label
from saescope.report import plots
from saescope.report.data import ReportData, load_report_data

#: table columns: (metrics.json key, header, format, higher is worse)
COLUMNS = (  # what the model feels first (loss), then reconstruction
    ("l0", "L0", "{:.1f}", None),
    ("delta_loss", "Δ loss", "{:.4f}", True),
    ("ce_loss_score", "CE recovered", "{:.4f}", False),
    ("kl_div", "KL", "{:.4f}", True),
    ("kl_div_score", "KL score", "{:.4f}", False),  # SAEBench's
    ("fvu_std", "FVU (per-dim std.)", "{:.4f}", True),
    ("fvu", "FVU", "{:.4f}", True),
    ("mse", "MSE", "{:.4g}", None),
    ("cossim", "cos(x, x̂)", "{:.4f}", False),
    ("l2_ratio", "‖x̂‖/‖x‖", "{:.3f}", None),
    ("relative_reconstruction_bias", "rel. bias", "{:.3f}", None),  # SAEBench's Σ‖x̂‖²/Σx·x̂
    ("frac_dead", "dead", "{:.2%}", True),
    ("frac_high_freq", ">10% freq", "{:.2%}", True),
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
.meta { color: #555; } .hard { color: #b00; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
td.l { text-align: left; } tr.canonical td:first-child::after { content: " ★"; color: #c80; }
.note { color: #666; font-size: 13px; }
"""

SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], asc = th.dataset.asc !== 'true';
  th.dataset.asc = asc;
  const value = row => row.cells[i].dataset.v ?? row.cells[i].textContent;
  [...body.rows].sort((a, b) => {
    const x = value(a), y = value(b), nx = parseFloat(x), ny = parseFloat(y);
    const c = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
    return asc ? c : -c;
  }).forEach(row => body.appendChild(row));
}));
"""


def _fmt(value: float, fmt: str) -> str:
    return fmt.format(value) if math.isfinite(value) else "–"


def _heat(value: float, lo: float, hi: float, worse_high: bool | None) -> str:
    """A background colour from white (best) to red (worst) for the 'higher is worse' columns."""
    if worse_high is None or not math.isfinite(value) or hi <= lo:
        return ""
    t = (value - lo) / (hi - lo)
    t = t if worse_high else 1 - t
    return f' style="background: rgba(220, 40, 40, {0.55 * max(0.0, min(1.0, t)):.2f})"'


def _table(data: ReportData) -> str:
    ranges = {}
    for key, *_ in COLUMNS:
        values = [v for v in (e.get(key) for e in data.entries) if math.isfinite(v)]
        ranges[key] = (min(values), max(values)) if values else (0.0, 0.0)
    canonical = {id(e) for e in data.canonical.values()}
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("site", "width", *[c[1] for c in COLUMNS], "folder"))
    rows = []
    for e in data.entries:
        cells = [f'<td class="l" data-v="{e.site.kind} {e.site.layer:04d}">{html.escape(str(e.site))}</td>',
                 f'<td data-v="{e.d_sae}">{width_label(e.d_sae)}</td>']
        for key, _, fmt, worse_high in COLUMNS:
            v = e.get(key)
            cells.append(f'<td data-v="{v if math.isfinite(v) else ""}"{_heat(v, *ranges[key], worse_high)}>'
                         f"{_fmt(v, fmt)}</td>")
        cells.append(f'<td class="l">{html.escape(e.path)}</td>')
        cls = ' class="canonical"' if id(e) in canonical else ""
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(rows)
            + "\n</tbody></table>")


def _hardest(data: ReportData, key: str, label: str, n: int = 3) -> str:
    ranked = sorted((e for e in data.canonical.values() if math.isfinite(e.get(key))), key=lambda e: -e.get(key))
    if not ranked:
        return ""
    items = ", ".join(f'<span class="hard">{html.escape(str(e.site))}</span> ({_fmt(e.get(key), "{:.3g}")})'
                      for e in ranked[:n])
    easiest = ranked[-1]
    return (f"<li>Highest {label}: {items}; lowest: {html.escape(str(easiest.site))} "
            f"({_fmt(easiest.get(key), '{:.3g}')}).</li>")


def _kind_summary(data: ReportData) -> str:
    rows = []
    for kind in data.kinds:
        canon = data.canonical_of_kind(kind)

        def mean(key, canon=canon):
            values = [e.get(key) for e in canon if math.isfinite(e.get(key))]
            return sum(values) / len(values) if values else math.nan

        def low(key, canon=canon):
            values = [e.get(key) for e in canon if math.isfinite(e.get(key))]
            return min(values) if values else math.nan

        rows.append(f"<tr><td class='l'>{kind}</td><td>{len(canon)}</td><td>{_fmt(mean('l0'), '{:.1f}')}</td>"
                    f"<td>{_fmt(mean('delta_loss'), '{:.4f}')}</td><td>{_fmt(mean('ce_loss_score'), '{:.3f}')}</td>"
                    f"<td>{_fmt(low('ce_loss_score'), '{:.3f}')}</td><td>{_fmt(mean('fvu_std'), '{:.4f}')}</td>"
                    f"<td>{_fmt(mean('fvu'), '{:.4f}')}</td></tr>")
    note = ("<p class='note'>transcoder: reads the MLP's input (mlp_in) and predicts its output (mlp_out); its FVU "
            "is of mlp_out, its Δ loss splices the prediction in place of mlp_out, and CE recovered is against "
            "zeroing mlp_out.</p>" if "transcoder" in data.kinds else "")
    return ("<table><thead><tr><th>site kind</th><th>sites</th><th>mean L0</th><th>mean Δ loss</th>"
            "<th>mean CE recovered</th><th>worst CE recovered</th><th>mean FVU (per-dim std.)</th>"
            "<th>mean FVU</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>" + note)


def write_report(run_or_release: str | Path, out_dir: str | Path | None = None, *,
                 canonical_l0: float | None = None) -> Path:
    """Write ``report.html`` and its PNGs into ``out_dir`` (default: ``<run>/report``) and return
    the page's path.  Reads every ``metrics.json`` under the release folder (``<run>/release``
    or the folder given).  Canonical SAE per site: measured L0 closest to ``canonical_l0``; when
    not given, the release's ``canonical.json`` if any, else L0 closest to 100."""
    data = load_report_data(run_or_release, canonical_l0)
    if out_dir is None:
        out_dir = data.release.parent / "report" if data.release.name == "release" else data.release / "report"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    figures = [
        ("Delta LM loss against L0", plots.tradeoff(data, "delta_loss", "delta LM loss (nats)", out / "delta_loss_vs_l0.png"),
         "Cross-entropy increase when the SAE's reconstruction replaces the site (spliced at every position but BOS)."),
        ("CE loss recovered against L0", plots.tradeoff(data, "ce_loss_score", "CE loss recovered",
                                                       out / "ce_recovered_vs_l0.png", higher_is_better=True),
         "(CE with the site zero-ablated − CE spliced) / (CE zero-ablated − CE clean): 1 is perfect, 0 is as bad as deleting the site."),
        ("FVU after per-dimension standardisation against L0",
         plots.tradeoff(data, "fvu_std", "FVU (per-dim std.)", out / "fvu_std_vs_l0.png"),
         "Each dimension's FVU, averaged over dimensions: a few massive dimensions cannot dominate it."),
        ("FVU against L0", plots.tradeoff(data, "fvu", "FVU", out / "fvu_vs_l0.png"),
         "Fraction of variance unexplained, variance taken about the mean activation."),
        ("Canonical SAEs across layers", plots.canonical_by_layer(data, out / "canonical_by_layer.png"),
         ("One SAE per site (the canonical one: average L0 closest to the target, 100 unless the run chose "
          "another). The hardest site is circled.")),
        ("Loss by token position", plots.by_position(data, out / "by_position.png"),
         "Positions binned 1, 2–3, 4–7, …; position 0 (BOS) is never scored."),
        ("Firing frequency", plots.firing_frequency(data, out / "firing_frequency.png"),
         "How often each latent fires on the evaluation tokens; the dashed line marks 10%."),
        ("Metrics by corpus subset", plots.by_subset(data, out / "by_subset.png"),
         "Canonical SAEs on each subset of the evaluation corpus."),
    ]
    info = data.info
    meta = ", ".join(f"{k}: {html.escape(str(info[k]))}" for k in ("model", "corpus", "n_tokens", "seq_len") if info.get(k))
    release_link = html.escape(os.path.relpath(data.release, out))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>saescope report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>SAE evaluation report</h1>",
        (f"<p class='meta'>{len(data.entries)} SAEs on {len(data.canonical)} sites; release: "
         f"<code>{release_link}</code>{'; ' + meta if meta else ''}</p>"),
        "<h2>At a glance</h2><ul>",
        _hardest(data, "delta_loss", "delta loss"),
        _hardest(data, "fvu_std", "FVU after per-dimension standardisation"),
        _hardest(data, "fvu", "FVU"),
        "</ul>",
        _kind_summary(data),
    ]
    if data.unevaluated:
        parts.append(f"<p class='note'>{len(data.unevaluated)} SAE folders have no evaluation yet: "
                     f"{html.escape(', '.join(data.unevaluated[:10]))}{' …' if len(data.unevaluated) > 10 else ''}</p>")
    for title, path, caption in figures:
        if path is None:
            continue
        parts.append(f"<h2>{html.escape(title)}</h2><p class='note'>{html.escape(caption)}</p>"
                     f"<img src='{path.name}' alt='{html.escape(title)}'>")
    parts += [
        ("<h2>Every SAE</h2><p class='note'>Click a header to sort. ★ canonical SAE of its site. "
         "Red backgrounds: worse values within a column.</p>"),
        _table(data),
        f"<script>{SORT_SCRIPT}</script></body></html>",
    ]
    page = out / "report.html"
    page.write_text("\n".join(parts))
    return page

