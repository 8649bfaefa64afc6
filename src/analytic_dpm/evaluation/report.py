"""Paper-style report of an evaluation grid: markdown tables, the speed-up summary, plots, and W&B logging.

:func:`write_report` writes, into ``out_dir``:

* ``tables.md``: for each metric (NLL in bits/dim, FID) and each trajectory, a methods x K table like spec
  section 10 (rows in spec section 4's method order, columns sorted K, 2 decimals, the best value of each column
  in bold). ``n/a`` = computed but not defined (NaN; footnotes under the table list the ``note`` of each such
  cell), ``-`` = not computed (None). ``inf`` is printed as ``inf``.
* ``speedup.md`` / ``speedup.json``: see :func:`speedup_summary`.
* ``nll_vs_K.png``, ``fid_vs_K.png``: one subplot per trajectory, one line per method, log-x axis.
* ``heatmap_<nll|fid>_<trajectory>.png``: the tables as annotated heat maps.
* ``variance_maps.png`` (a model with a covariance head): its per-pixel variance beside analytic_ddpm's;
* ``gamma.png`` (if ``gamma`` is given) and ``variance_bounds.png`` (if ``bounds`` is given), drawn by
  :mod:`analytic_dpm.plots` (the same plots the training's Gamma callback writes).

Tables without any computed value (number or NaN) and plots without any finite value are skipped. When the rows
span several (dataset, schedule, N) groups, tables get one section per group and plot names get a
``_<dataset>-<schedule>-N<N>`` suffix.
"""

from __future__ import annotations

import html
import json
import math
import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..methods import ALL_METHODS
from ..plots import METHOD_STYLE, figure, plot_gamma, plot_variance_bounds, plot_variance_maps, save
from .results import (
    COLUMNS,
    METHOD_ORDER,
    TRAJECTORY_ORDER,
    atomic_write_text,
    is_finite_number,
    is_undefined,
    normalize_row,
)

#: metric column -> (short name used in file names and W&B keys, label)
METRICS: dict[str, tuple[str, str]] = {"nll_bpd": ("nll", "NLL (bits/dim)"), "fid": ("fid", "FID")}
#: baselines of the speed-up summary, per metric. NLL: only the DDPM ones (the DDIM bound is infinite).
BASELINES: dict[str, tuple[str, ...]] = {
    "nll_bpd": ("ddpm_beta", "ddpm_beta_tilde"),
    "fid": ("ddpm_beta", "ddpm_beta_tilde", "ddim"),
}
#: the methods the speed-up summary measures against the baselines: the analytic ones and the covariance heads
ANALYTIC = ("analytic_ddpm", "analytic_ddim", "sn_ddpm", "npr_ddpm", "sn_ddim", "npr_ddim")

Group = tuple  # (dataset, schedule, N)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _ordered(names: Iterable[str], canonical: Sequence[str]) -> list[str]:
    names = set(names)
    return [n for n in canonical if n in names] + sorted(names - set(canonical))


def _groups(rows: Sequence[Mapping[str, Any]]) -> dict[Group, list[dict[str, Any]]]:
    out: dict[Group, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["dataset"], r["schedule"], r["N"]), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][1], -1 if kv[0][2] is None else kv[0][2])))


def _group_title(group: Group) -> str:
    dataset, schedule, n = group
    parts = [p for p in (dataset, schedule) if p]
    if n is not None:
        parts.append(f"N = {n}")
    return ", ".join(parts) or "results"


def _group_tag(group: Group) -> str:
    dataset, schedule, n = group
    parts = [p for p in (dataset, schedule) if p]
    if n is not None:
        parts.append(f"N{n}")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in "-".join(parts)) or "results"


def _has_metric(rows: Iterable[Mapping[str, Any]], metric: str) -> bool:
    """Any computed value (a number or NaN)."""
    return any(r[metric] is not None for r in rows)


def _fmt(value: float | None, decimals: int = 2) -> str:
    if value is None:
        return "-"
    if is_undefined(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{decimals}f}"


def _grid(rows: Sequence[Mapping[str, Any]], metric: str) -> tuple[list[str], list[int], dict]:
    """methods (canonical order), sorted Ks, and {(method, K): row} for one group x trajectory."""
    methods = _ordered({r["method"] for r in rows}, METHOD_ORDER)
    ks = sorted({r["K"] for r in rows})
    cells = {(r["method"], r["K"]): r for r in rows}
    return methods, ks, cells


# ----------------------------------------------------------------------------------------------------------------
# markdown tables
# ----------------------------------------------------------------------------------------------------------------


def markdown_tables(rows: Sequence[Mapping[str, Any]], title: str = "", bold_best: bool = True) -> str:
    """The methods x K tables of every metric and trajectory (see the module docstring)."""
    rows = [normalize_row(r) for r in rows]
    lines: list[str] = [f"# {title}" if title else "# Evaluation results", ""]
    groups = _groups(rows)
    if not rows:
        lines.append("No results.")
    for group, grows in groups.items():
        if len(groups) > 1:
            lines += [f"## {_group_title(group)}", ""]
            level = "###"
        else:
            if any(group):
                lines += [f"{_group_title(group)}", ""]
            level = "##"
        precision = _precision_line(grows)
        if precision:
            lines += [precision, ""]
        for metric, (_, label) in METRICS.items():
            if not _has_metric(grows, metric):
                continue
            for traj in _ordered({r["trajectory"] for r in grows}, TRAJECTORY_ORDER):
                trows = [r for r in grows if r["trajectory"] == traj]
                if not _has_metric(trows, metric):
                    continue
                lines += [f"{level} {label}, {traj} trajectory", ""]
                lines += _one_table(trows, metric, bold_best)
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _precision_line(rows: Sequence[Mapping[str, Any]]) -> str:
    """``Network precision: fp32.``, or per metric when they differ (``eval.fid.precision``); empty for rows that
    record none (older results, hand-made rows)."""
    def values(metric: str, column: str) -> str:
        found = {r.get(column) or r.get("precision") for r in rows if r[metric] is not None}
        return ", ".join(sorted(v for v in found if v))

    nll, fid = values("nll_bpd", "precision"), values("fid", "fid_precision")
    if not (nll or fid):
        return ""
    if nll == fid or not (nll and fid):
        return f"Network precision: {nll or fid}."
    return f"Network precision: NLL {nll}; FID sampling {fid}."


def _one_table(rows: Sequence[Mapping[str, Any]], metric: str, bold_best: bool) -> list[str]:
    methods, ks, cells = _grid(rows, metric)
    best: dict[int, float] = {}
    for k in ks:
        vals = [cells[(m, k)][metric] for m in methods if (m, k) in cells and is_finite_number(cells[(m, k)][metric])]
        # bold only where there is something to compare
        if len(vals) > 1:
            best[k] = min(vals)
    header = "| method | " + " | ".join(f"K={k}" for k in ks) + " |"
    sep = "|---|" + "|".join("---:" for _ in ks) + "|"
    out = [header, sep]
    reasons: dict[str, list[str]] = {}
    failures: dict[str, list[str]] = {}
    missing: dict[str, list[str]] = {}
    for m in methods:
        cols = []
        for k in ks:
            row = cells.get((m, k))
            value = None if row is None else row[metric]
            note = _metric_note(row, metric)
            text = _fmt(value)
            if is_undefined(value):
                reasons.setdefault(note or "no reason recorded", []).append(f"{m} K={k}")
            elif value is None and note.startswith("failed"):
                text = "failed"
                failures.setdefault(note.removeprefix("failed:").strip(), []).append(f"{m} K={k}")
            elif value is None and note:
                missing.setdefault(note, []).append(f"{m} K={k}")
            elif bold_best and k in best and value == best[k]:
                text = f"**{text}**"
            cols.append(text)
        out.append(f"| {m} | " + " | ".join(cols) + " |")
    for title, notes in (("n/a = not defined:", reasons), ("failed (never a value):", failures),
                         ("`-` = not computed:", missing)):
        if notes:
            out += ["", title] + [f"- {reason} ({_compress(where)})" for reason, where in notes.items()]
    legend = ([] if missing else ["`-` = not computed."]) + (["Bold: best of its column."] if best else [])
    if legend:
        out += ["", " ".join(legend)]
    return out


def _metric_note(row: Mapping[str, Any] | None, metric: str) -> str:
    """The part of a row's note about ``metric`` (notes are ``"NLL: ...; FID: ..."``), without its prefix."""
    if row is None or not row.get("note"):
        return ""
    prefix = "NLL:" if metric == "nll_bpd" else "FID:"
    parts = [p.strip() for p in str(row["note"]).split("; ")]
    mine = [p[len(prefix):].strip() for p in parts if p.startswith(prefix)]
    if mine:
        return "; ".join(mine)
    return "" if any(p.startswith(("NLL:", "FID:")) for p in parts) else str(row["note"])


def _compress(where: list[str]) -> str:
    """'ddim K=10, ddim K=25' -> 'ddim: K=10, 25'."""
    by_method: dict[str, list[str]] = {}
    for w in where:
        m, k = w.split(" K=")
        by_method.setdefault(m, []).append(k)
    return "; ".join(f"{m}: K={', '.join(ks)}" for m, ks in by_method.items())


def parse_markdown_table(text: str, heading: str) -> dict[str, dict[int, str]]:
    """Parse the table under the heading line containing ``heading`` back into {method: {K: cell text}}.

    The inverse of :func:`markdown_tables` for tests and scripts; bold markers are removed.
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("#") and heading in line), None)
    if start is None:
        raise KeyError(f"no table under a heading containing {heading!r}")
    i = start + 1
    while i < len(lines) and not lines[i].startswith("|"):
        i += 1
    header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
    ks = [int(h.removeprefix("K=")) for h in header[1:]]
    table: dict[str, dict[int, str]] = {}
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
        table[cells[0]] = dict(zip(ks, cells[1:]))
    return table


# ----------------------------------------------------------------------------------------------------------------
# speed-up summary
# ----------------------------------------------------------------------------------------------------------------


def _reference(rows: Sequence[Mapping[str, Any]], metric: str, baselines: Sequence[str]) -> dict[str, Any] | None:
    """The best (lowest) finite baseline row at the largest K any of ``baselines`` was evaluated at."""
    base = [r for r in rows if r["method"] in baselines and is_finite_number(r[metric])]
    if not base:
        return None
    k_ref = max(r["K"] for r in base)
    return min((r for r in base if r["K"] == k_ref), key=lambda r: r[metric])


def speedup_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The paper's "20x to 80x" numbers (spec section 10), one entry per group x metric x analytic method x
    trajectory x reference that has values.

    Reference ``"best baseline"``: ``K_ref`` = the largest K at which a baseline (NLL: ddpm_beta,
    ddpm_beta_tilde; FID: those and ddim) has a finite value (K = N when the grid has it), and the best (lowest)
    baseline value at ``K_ref`` over all baselines and trajectories. Reference ``"same forward"`` (only where it
    is a different cell): the same with only the baselines of the analytic method's forward process (e.g.
    analytic_ddim vs ddim, the paper's FID comparison). For each analytic method and trajectory: the smallest K
    whose finite value is <= the reference value, and ``speedup = N / K`` (``None`` if N is unknown;
    ``speedup_vs_ref = K_ref / K`` is given too). ``status``: ``reached``, ``not reached``, ``not defined`` (only
    NaN values) or ``no baseline``.
    """
    rows = [normalize_row(r) for r in rows]
    out: list[dict[str, Any]] = []
    for group, grows in _groups(rows).items():
        dataset, schedule, n = group
        for metric in METRICS:
            best_ref = _reference(grows, metric, BASELINES[metric])
            for method in ANALYTIC:
                refs: list[tuple[str, dict[str, Any] | None]] = [("best baseline", best_ref)]
                forward = ALL_METHODS.get(method)
                same = [b for b in BASELINES[metric] if ALL_METHODS.get(b) == forward]
                same_ref = _reference(grows, metric, same) if same else None
                if same_ref is not None and best_ref is not None and same_ref is not best_ref:
                    refs.append(("same forward", same_ref))
                mrows = [r for r in grows if r["method"] == method and r[metric] is not None]
                for traj in _ordered({r["trajectory"] for r in mrows}, TRAJECTORY_ORDER):
                    trows = sorted((r for r in mrows if r["trajectory"] == traj), key=lambda r: r["K"])
                    finite = [r for r in trows if is_finite_number(r[metric])]
                    for reference, ref in refs:
                        entry: dict[str, Any] = {
                            "dataset": dataset,
                            "schedule": schedule,
                            "N": n,
                            "metric": metric,
                            "method": method,
                            "trajectory": traj,
                            "reference": reference,
                            "K": None,
                            "speedup": None,
                            "speedup_vs_ref": None,
                            "value": None,
                            "baseline_method": None if ref is None else ref["method"],
                            "baseline_trajectory": None if ref is None else ref["trajectory"],
                            "baseline_K": None if ref is None else ref["K"],
                            "baseline_value": None if ref is None else ref[metric],
                            "status": "not reached",
                        }
                        if not finite:
                            entry["status"] = "not defined"
                        elif ref is None:
                            entry["status"] = "no baseline"
                        else:
                            hit = next((r for r in finite if r[metric] <= ref[metric]), None)
                            if hit is not None:
                                entry.update(
                                    K=hit["K"],
                                    value=hit[metric],
                                    speedup=None if n is None else n / hit["K"],
                                    speedup_vs_ref=ref["K"] / hit["K"],
                                    status="reached",
                                )
                        out.append(entry)
    return out


def _fmt_speedup(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}x" if abs(x - round(x)) < 1e-9 else f"{x:.1f}x"


def speedup_markdown(entries: Sequence[Mapping[str, Any]], title: str = "") -> str:
    lines = [f"# Speed-up: {title}" if title else "# Speed-up", ""]
    lines.append(
        "Smallest K at which the analytic method reaches (<=) the reference: the best baseline at the largest K "
        "evaluated (`best baseline`), or the best baseline of the same forward process (`same forward`, only where "
        "that is a different cell). N/K is the paper's speed-up (spec section 10)."
    )
    lines.append("")
    if not entries:
        lines.append("No analytic-method results.")
    groups: dict[Group, list[Mapping[str, Any]]] = {}
    for e in entries:
        groups.setdefault((e["dataset"], e["schedule"], e["N"]), []).append(e)
    for group, ges in groups.items():
        if len(groups) > 1 or any(group):
            lines += [f"## {_group_title(group)}", ""]
        lines.append(
            "| metric | method | trajectory | reference | K | N/K | value | baseline | baseline value | status |"
        )
        lines.append("|---|---|---|---|---:|---:|---:|---|---:|---|")
        for e in ges:
            base = "-"
            if e["baseline_method"] is not None:
                base = f"{e['baseline_method']} ({e['baseline_trajectory']}, K={e['baseline_K']})"
            k = "-" if e["K"] is None else str(e["K"])
            lines.append(
                f"| {METRICS[e['metric']][0]} | {e['method']} | {e['trajectory']} | {e['reference']} | {k}"
                f" | {_fmt_speedup(e['speedup'])}"
                f" | {_fmt(e['value'])} | {base} | {_fmt(e['baseline_value'])} | {e['status']} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------------


def plot_metric_vs_k(rows: Sequence[Mapping[str, Any]], metric: str, path: Path, title: str = "") -> Path | None:
    """One subplot per trajectory, one line per method (finite values only), log-x (and log-y for a wide range)."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    trajs = _ordered({r["trajectory"] for r in rows if is_finite_number(r[metric])}, TRAJECTORY_ORDER)
    if not trajs:
        return None
    fig = figure(4.6 * len(trajs), 3.8)
    axes = fig.subplots(1, len(trajs), squeeze=False)[0]
    for ax, traj in zip(axes, trajs):
        trows = [r for r in rows if r["trajectory"] == traj and is_finite_number(r[metric])]
        values = [r[metric] for r in trows]
        logy = min(values) > 0 and max(values) / min(values) > 20
        for m in _ordered({r["method"] for r in trows}, METHOD_ORDER):
            pts = sorted((r["K"], r[metric]) for r in trows if r["method"] == m)
            ks, vs = zip(*pts)
            ax.plot(ks, vs, label=m, **METHOD_STYLE.get(m, {"marker": "."}))
        ax.set_xscale("log")
        all_ks = sorted({r["K"] for r in trows})
        ax.set_xticks(all_ks, [str(k) for k in all_ks])
        ax.xaxis.set_minor_locator(NullLocator())
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "1235" else ""))
        ax.set_xlabel("K (number of steps)")
        ax.set_ylabel(METRICS[metric][1])
        ax.set_title(f"{traj} trajectory")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def plot_heatmap(rows: Sequence[Mapping[str, Any]], metric: str, path: Path, title: str = "") -> Path | None:
    """Methods x K grid of one trajectory, coloured by value (log colour scale), annotated like the tables.
    Skipped (None) when the metric has no finite value there."""
    from matplotlib.colors import LogNorm, Normalize

    if not any(is_finite_number(r[metric]) for r in rows):
        return None
    methods, ks, cells = _grid(rows, metric)
    grid = np.full((len(methods), len(ks)), np.nan)
    for i, m in enumerate(methods):
        for j, k in enumerate(ks):
            row = cells.get((m, k))
            if row is not None and is_finite_number(row[metric]):
                grid[i, j] = row[metric]
    finite = grid[np.isfinite(grid)]
    width = max(4.5, 1.6 + 0.9 * len(ks))  # room for the method names and a title of a few words per line
    fig = figure(width, 1.3 + 0.55 * len(methods))
    ax = fig.subplots()
    norm = None
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        norm = LogNorm(lo, hi) if lo > 0 and hi > lo else Normalize(lo, hi if hi > lo else lo + 1)
    masked = np.ma.masked_invalid(grid)
    image = ax.imshow(masked, cmap="viridis_r", norm=norm, aspect="auto")
    ax.set_facecolor("0.85")
    for i, m in enumerate(methods):
        for j, k in enumerate(ks):
            row = cells.get((m, k))
            text = _fmt(None if row is None else row[metric])
            color = "black"
            if np.isfinite(grid[i, j]) and norm is not None:
                color = "white" if norm(grid[i, j]) > 0.5 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(methods)), methods)
    ax.set_xlabel("K")
    # wrapped to the figure's width (about 10 characters per inch at this size): never clipped at the edges
    ax.set_title(textwrap.fill(title or METRICS[metric][1], width=max(20, int(width * 9))), fontsize=9)
    if finite.size:
        fig.colorbar(image, ax=ax, label=METRICS[metric][1])
    return save(fig, path)


# ----------------------------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------------------------


def write_report(
    rows: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    gamma: Any = None,
    bounds: Mapping[Any, Mapping[str, Any]] | None = None,
    title: str = "",
    abar: Any = None,
    plots: bool = True,
    variance_maps: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write tables, speed-up summary and plots of ``rows`` into ``out_dir``; returns {name: path}.

    Names: ``tables``, ``speedup_md``, ``speedup_json``, ``nll_vs_K``, ``fid_vs_K``,
    ``heatmap_<metric>_<trajectory>``, ``gamma``, ``variance_bounds`` (plot names get a group suffix when the
    rows span several dataset/schedule/N groups). ``gamma``: a length-(N+1) vector or {label: vector};
    ``abar``: the schedule's abar (length N+1), adds the U_n panel to ``gamma.png``. ``plots=False`` writes only
    the markdown/JSON files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [normalize_row(r) for r in rows]
    paths: dict[str, Path] = {}

    paths["tables"] = out_dir / "tables.md"
    atomic_write_text(paths["tables"], markdown_tables(rows, title=title))

    entries = speedup_summary(rows)
    paths["speedup_md"] = out_dir / "speedup.md"
    atomic_write_text(paths["speedup_md"], speedup_markdown(entries, title=title))
    paths["speedup_json"] = out_dir / "speedup.json"
    atomic_write_text(paths["speedup_json"], json.dumps(_json_safe(entries), indent=1, allow_nan=False) + "\n")

    if not plots:
        return paths
    groups = _groups(rows)
    for group, grows in groups.items():
        suffix = "" if len(groups) == 1 else f"_{_group_tag(group)}"
        gtitle = title if len(groups) == 1 else f"{title} {_group_title(group)}".strip()
        for metric, (short, _) in METRICS.items():
            name = f"{short}_vs_K{suffix}"
            p = plot_metric_vs_k(grows, metric, out_dir / f"{name}.png", title=gtitle)
            if p is not None:
                paths[name] = p
            for traj in _ordered({r["trajectory"] for r in grows}, TRAJECTORY_ORDER):
                trows = [r for r in grows if r["trajectory"] == traj]
                name = f"heatmap_{short}_{traj}{suffix}"
                label = f"{METRICS[metric][1]}, {traj} trajectory"
                htitle = f"{gtitle}: {label}" if gtitle else label
                p = plot_heatmap(trows, metric, out_dir / f"{name}.png", title=htitle)
                if p is not None:
                    paths[name] = p
    if gamma is not None:
        paths["gamma"] = plot_gamma(gamma, out_dir / "gamma.png", abar=abar, title=title)
    if bounds:
        paths["variance_bounds"] = plot_variance_bounds(bounds, out_dir / "variance_bounds.png", title=title)
    if variance_maps:
        paths["variance_maps"] = plot_variance_maps(variance_maps, out_dir / "variance_maps.png")
    return paths


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------------------------
# Weights & Biases
# ----------------------------------------------------------------------------------------------------------------


def summary_metrics(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """``{"nll/<method>/<trajectory>/K<k>": value, "fid/...": value}`` for finite values (prefixed with
    ``<dataset>-<schedule>-N<N>/`` when the rows span several groups), plus
    ``speedup/<metric>/<method>/<trajectory>`` = N/K for reached speed-ups (``speedup_same_forward/...`` for the
    same-forward reference)."""
    rows = [normalize_row(r) for r in rows]
    groups = _groups(rows)
    out: dict[str, float] = {}
    for group, grows in groups.items():
        prefix = "" if len(groups) == 1 else f"{_group_tag(group)}/"
        for r in grows:
            for metric, (short, _) in METRICS.items():
                if is_finite_number(r[metric]):
                    out[f"{prefix}{short}/{r['method']}/{r['trajectory']}/K{r['K']}"] = float(r[metric])
        for e in speedup_summary(grows):
            if e["status"] == "reached" and e["speedup"] is not None:
                short = METRICS[e["metric"]][0]
                kind = "speedup" if e["reference"] == "best baseline" else "speedup_same_forward"
                out[f"{prefix}{kind}/{short}/{e['method']}/{e['trajectory']}"] = float(e["speedup"])
    return out


def log_report_to_wandb(run: Any, rows: Iterable[Mapping[str, Any]], paths: Mapping[str, Any] | None = None) -> dict:
    """Log the grid to a W&B run (online or offline; this function never calls ``wandb.init``).

    Logs ``results`` (``wandb.Table`` with :data:`COLUMNS`; NaN/inf as empty cells, the note says why),
    ``speedup`` (a table), every PNG of ``paths`` as ``report/<name>`` (``wandb.Image``), every markdown file as
    ``report/<name>`` (``wandb.Html``), and the :func:`summary_metrics` into ``run.summary``.
    ``run=None`` uses ``wandb.run``; without a run nothing is logged. Returns what was passed to ``run.log``.
    """
    import wandb

    run = run if run is not None else wandb.run
    if run is None:
        return {}
    rows = [normalize_row(r) for r in rows]

    def cell(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    data = [[cell(r[c]) for c in COLUMNS] for r in rows]
    payload: dict[str, Any] = {"results": wandb.Table(columns=list(COLUMNS), data=data, allow_mixed_types=True)}

    entries = speedup_summary(rows)
    if entries:
        cols = list(entries[0])
        payload["speedup"] = wandb.Table(
            columns=cols, data=[[cell(e[c]) for c in cols] for e in entries], allow_mixed_types=True
        )
    for name, path in (paths or {}).items():
        path = Path(path)
        if not path.is_file():
            continue
        if path.suffix.lower() == ".png":
            payload[f"report/{name}"] = wandb.Image(str(path), caption=name)
        elif path.suffix.lower() == ".md":
            text = path.read_text(encoding="utf-8")
            payload[f"report/{name}"] = wandb.Html(f"<pre>{html.escape(text)}</pre>")
    run.log(payload)
    for key, value in summary_metrics(rows).items():
        run.summary[key] = value
    return payload
