"""Merge the results of many run directories (e.g. every job of a Hydra multirun sweep) into one grid.

    python -m analytic_dpm.evaluation.merge MULTIRUN_DIR [MORE_DIRS ...] [--out OUT_DIR] [--title T]
           [--gamma GAMMA_FILE] [--no-plots]

finds every ``results.json`` below the given directories (recursively; a directory with only ``results.csv`` is
read from the CSV), merges the rows and writes ``results.csv``/``results.json`` plus the report
(:func:`analytic_dpm.evaluation.report.write_report`) into OUT_DIR (default: ``<first dir>/merged``; that
directory is never read as an input).

Merge rule per cell key (:func:`analytic_dpm.evaluation.results.cell_key`), for each metric (``nll_bpd``,
``fid``) separately: a computed value (a number, or NaN = not defined) beats ``None`` (not computed); among
computed ones, a finite number beats NaN/inf, then the most recent wins (results file modification time, then
row order in the file). So the NLL of one job and the FID of another end up in one row. The metric's companion
column (``num_nll_images`` / ``num_fid_samples``) comes with it; the other columns come from the most recent row
that has them; ``seconds`` is the sum over the rows the merged row took a metric from (or over all rows if it
took none); distinct non-empty notes are joined with "; ".

Cells split across shard jobs (``eval.shard=i eval.num_shards=n``) get their values here: the jobs' partial sums
(``shards/`` of each run directory) are added and turned into the value one job would have produced
(:mod:`.shards`). Rows of different models, Gamma or settings are refused unless ``--allow-mixed``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import MissingFileError
from .provenance import check_same_run
from .results import (
    COLUMNS,
    RESULTS_CSV,
    RESULTS_JSON,
    cell_key,
    is_finite_number,
    load_rows,
    sort_rows,
    write_results,
)
from .shards import complete_values, find_shards

_COMPANION = {"nll_bpd": "num_nll_images", "fid": "num_fid_samples"}


def find_result_files(paths: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Every results.json below ``paths`` (results.csv where a directory has no JSON), sorted, without those
    under any of ``exclude``."""
    excluded = [Path(p).resolve() for p in exclude]

    def skip(p: Path) -> bool:
        rp = p.resolve()
        return any(rp == e or e in rp.parents for e in excluded)

    found: dict[Path, Path] = {}
    for root in map(Path, paths):
        if root.is_file():
            if not skip(root):
                found.setdefault(root.parent.resolve(), root)
            continue
        if not root.is_dir():
            raise MissingFileError(f"no such run directory: {root}")
        for name in (RESULTS_JSON, RESULTS_CSV):  # JSON first: it wins for its directory
            for p in sorted(root.rglob(name)):
                if p.is_file() and not skip(p):
                    found.setdefault(p.parent.resolve(), p)
    return sorted(found.values())


def _read(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a results file; a damaged ``results.json`` falls back to the ``results.csv`` beside it (as
    ``evaluate.py`` does), with a warning; None (skipped, with a warning) when nothing readable is there."""
    try:
        return load_rows(path)
    except (ValueError, json.JSONDecodeError, OSError) as err:
        csv_path = path.with_name(RESULTS_CSV)
        if path.name == RESULTS_JSON and csv_path.is_file():
            warnings.warn(f"{path} unreadable ({err}); reading {csv_path}", stacklevel=3)
            try:
                return load_rows(csv_path)
            except (ValueError, OSError) as err2:
                err = err2
        warnings.warn(f"skipping {path}: {err}", stacklevel=3)
        return None


def _metric_rank(value: Any) -> int:
    """2 = finite number, 1 = computed but not finite (NaN/inf), 0 = not computed."""
    if value is None:
        return 0
    return 2 if is_finite_number(value) else 1


def merge_rows(sources: Sequence[tuple[Any, Sequence[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Merge rows given as ``[(recency, rows), ...]`` (larger recency = more recent) by the rule of the module
    docstring; returns full rows in canonical order."""
    by_key: dict[tuple, list[tuple[tuple, dict[str, Any]]]] = {}
    for order, (recency, rows) in enumerate(sources):
        for i, row in enumerate(rows):
            by_key.setdefault(cell_key(row), []).append(((recency, order, i), row))
    merged = []
    for cands in by_key.values():
        cands.sort(key=lambda c: c[0])  # oldest first
        newest = [row for _, row in reversed(cands)]
        out: dict[str, Any] = {}
        used: list[int] = []  # indices into newest of the rows a metric came from
        for metric, companion in _COMPANION.items():
            best = max(range(len(newest)), key=lambda j: (_metric_rank(newest[j][metric]), -j))
            out[metric] = newest[best][metric]
            out[companion] = newest[best][companion]
            if newest[best][metric] is not None:
                used.append(best)
        for col in COLUMNS:
            if col in out or col in ("seconds", "note"):
                continue
            out[col] = next((r[col] for r in newest if r[col] is not None and r[col] != ""), newest[0][col])
        contributing = [newest[j] for j in dict.fromkeys(used)] or newest
        secs = [r["seconds"] for r in contributing if r["seconds"] is not None]
        out["seconds"] = sum(secs) if secs else None
        notes = [r["note"] for r in contributing if r["note"]]
        out["note"] = "; ".join(dict.fromkeys(notes))
        merged.append({c: out[c] for c in COLUMNS})
    return sort_rows(merged)


def _unreadable_note(unreadable: dict, row: dict[str, Any], metric: str) -> str | None:
    """The note about unreadable shard files of ``row``'s cell (FID: its own directory; NLL: the directory of its
    (trajectory, K) group, named after the group's first method)."""
    for (dir_name, m), note in unreadable.items():
        if m != metric:
            continue
        parts = dir_name.rsplit("-", 2)
        if len(parts) != 3:
            continue
        method, trajectory, k = parts
        if k == f"K{row['K']}" and trajectory == row["trajectory"] and (metric == "nll" or method == row["method"]):
            return note
    return None


def fill_from_shards(rows: list[dict[str, Any]], shard_files: Sequence[Path], exclude=None) -> list[dict[str, Any]]:
    """Put the values of cells computed in shards (``eval.num_shards > 1``, :mod:`.shards`) into their rows: a
    row's metric is filled when all its shards are present and were computed for the row's metric id."""
    if exclude is not None:
        ex = Path(exclude).resolve()
        shard_files = [p for p in shard_files if ex not in p.resolve().parents]
    values = complete_values(shard_files)
    unreadable = {(k[1], k[2]): v["note"] for k, v in values.items() if k[0] == "shard_dir"}
    for row in rows:
        key = cell_key(row)
        for metric, companion, id_col, name in (("nll_bpd", "num_nll_images", "nll_id", "NLL"),
                                                ("fid", "num_fid_samples", "fid_id", "FID")):
            got = values.get((key, metric))
            if got is None and row[metric] is None:  # shard files of this cell that could not be read at all
                found = _unreadable_note(unreadable, row, "nll" if metric == "nll_bpd" else "fid")
                got = None if found is None else {"note": found, id_col: row[id_col]}
            if got is None or row[metric] is not None or got[id_col] != row[id_col]:
                continue
            notes = [n for n in (row["note"] or "").split("; ") if n and not n.startswith(f"{name}:")]
            if metric in got:
                row[metric], row[companion] = got[metric], got[companion]
            else:
                notes.append(got["note"])
            row["note"] = "; ".join(notes)
    return rows


def merge_runs(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    title: str = "",
    gamma: Any = None,
    bounds: Any = None,
    abar: Any = None,
    plots: bool = True,
    allow_mixed: bool = False,
) -> list[dict[str, Any]]:
    """Read the results below every path in ``paths`` (run directories, sweep directories or results files),
    merge them (module docstring) and return the merged rows. With ``out_dir``, also write
    ``results.csv``/``results.json`` and the report there (``out_dir`` itself is excluded from the search)."""
    files = find_result_files(paths, exclude=[out_dir] if out_dir is not None else [])
    sources, names = [], []
    for f in files:
        rows = _read(f)
        if rows is not None:
            sources.append((f.stat().st_mtime_ns, rows))
            names.append(str(f.parent))
    if not allow_mixed:
        check_same_run(sources, names)
    merged = fill_from_shards(merge_rows(sources), find_shards([p for p in paths]),
                              exclude=out_dir)
    if out_dir is not None:
        write_results(merged, out_dir)
        from .report import write_report

        write_report(merged, out_dir, gamma=gamma, bounds=bounds, title=title, abar=abar, plots=plots)
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analytic_dpm.evaluation.merge",
        description="Merge the results.json of many run directories (e.g. a Hydra multirun) into one grid + report.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="multirun / run directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: FIRST_DIR/merged)")
    parser.add_argument("--title", default="", help="title of the report")
    parser.add_argument("--gamma", type=Path, default=None, help="gamma vector (.npy, .json, .pt) for gamma.png")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only (no PNGs)")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="merge results of different models/settings (newest value per cell wins)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else args.dirs[0] / "merged"
    try:
        from ..gamma import read_gamma_vector

        gamma = read_gamma_vector(args.gamma) if args.gamma is not None else None
        files = find_result_files(args.dirs, exclude=[out])
        if not files:
            print(f"error: no {RESULTS_JSON} / {RESULTS_CSV} found under {', '.join(map(str, args.dirs))}",
                  file=sys.stderr)
            return 2
        rows = merge_runs(args.dirs, out_dir=out, title=args.title, gamma=gamma, plots=not args.no_plots,
                          allow_mixed=args.allow_mixed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(rows)} cells from {len(files)} result files into {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
