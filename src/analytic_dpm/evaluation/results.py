"""Durable storage of the evaluation grid: one row per finished cell, in ``results.csv`` and ``results.json``.

A *cell* is one (method, trajectory, K) of one run; dataset, schedule and N are constant inside a run directory
but belong to the key as well, so rows of different runs can be merged (:mod:`analytic_dpm.evaluation.merge`).

Values of the metric columns (``nll_bpd``, ``fid``; also ``seconds``):

* a float: computed;
* ``None``: not computed, or failed (CSV: empty field, JSON: ``null``); the ``note`` says why (``FID: not computed:
  no Inception weights``, ``NLL: failed: network output not finite ...``); a rerun computes it again;
* ``NaN``: computed but not defined, e.g. the NLL of the DDIM forward process (eta = 0) is infinite; the ``note``
  column says why. CSV: ``nan``. JSON has no NaN, so the value is ``null`` and the row carries
  ``"nonfinite": {"nll_bpd": "nan"}`` (``inf``/``-inf`` are stored the same way), which :func:`load_rows` reads
  back, so NaN and None both survive a JSON round-trip.

Identity columns. ``model_id`` (hash of the evaluated network's weights and its conventions), ``model_step``
(training step of a checkpoint), ``gamma_hash`` (hash of the Gamma vector; ``gamma_M`` its M), ``seed``,
``precision`` (of the network for NLL and Gamma), ``gamma_policy``, ``version`` (of this package) describe the run;
``fid_precision`` is the network's precision while sampling for FID (``eval.fid.precision``, by default the run's
``precision``; empty in rows written before it existed); ``nll_id`` / ``fid_id`` hash
everything that determines that metric's value (the run's identity plus the metric's own settings: number of
images or samples, batch sizes, decoder, reference statistics, Inception weights, ...). A rerun reuses a metric of a
row only when its id equals the id the rerun would produce; anything else is a mismatch, which
``analytic_dpm.evaluation.run`` refuses (or redirects to a new directory) instead of showing it as current.

``results.json`` layout::

    {"format": "analytic_dpm.evaluation.results", "version": 2, "columns": [...COLUMNS],
     "rows": [{"dataset": "cifar10", ..., "note": ""}, ...]}

Both files are rewritten atomically (temporary file in the same directory, fsync, ``os.replace``) after every
:meth:`ResultStore.add`, so a crash loses at most the cell in progress and never leaves a truncated file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import atomic_write_text, file_lock
from ..methods import ALL_METHODS
from .provenance import ID_COLUMNS, IDENTITY_COLUMNS

#: The CSV header, in this order: the cell, its metrics and notes, then the identity columns of
#: :mod:`analytic_dpm.evaluation.provenance` (what produced the numbers; a rerun reuses a metric only when its id
#: matches; see the module docstring).
COLUMNS: list[str] = [
    "dataset",
    "schedule",
    "N",
    "forward",
    "method",
    "trajectory",
    "K",
    "nll_bpd",
    "fid",
    "num_nll_images",
    "num_fid_samples",
    "gamma_M",
    "seed",
    "seconds",
    "note",
    *IDENTITY_COLUMNS,
]
#: The columns that identify a cell (see :func:`cell_key`).
KEY_COLUMNS: tuple[str, ...] = ("dataset", "schedule", "N", "method", "trajectory", "K")
#: The metric columns (None = not computed, NaN = not defined).
METRIC_COLUMNS: tuple[str, ...] = ("nll_bpd", "fid")

STR_COLUMNS = frozenset({"dataset", "schedule", "forward", "method", "trajectory", "note",
                         *(c for c, kind in IDENTITY_COLUMNS.items() if kind is str)})
INT_COLUMNS = frozenset({"N", "K", "num_nll_images", "num_fid_samples", "gamma_M", "seed",
                         *(c for c, kind in IDENTITY_COLUMNS.items() if kind is int)})
FLOAT_COLUMNS = frozenset({"nll_bpd", "fid", "seconds"})

#: Canonical orders used for sorting and for the report tables (unknown names go last, alphabetically).
#: ddpm_beta, ddpm_beta_tilde, analytic_ddpm, ddim, analytic_ddim, then the head methods sn_ddpm, npr_ddpm, sn_ddim,
#: npr_ddim (spec section 11)
METHOD_ORDER: tuple[str, ...] = tuple(ALL_METHODS)
TRAJECTORY_ORDER: tuple[str, ...] = ("even", "quadratic", "optimal")

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
JSON_FORMAT = "analytic_dpm.evaluation.results"
JSON_VERSION = 2  # 2: identity columns (model_id ... fid_id)

CellKey = tuple  # (dataset, schedule, N, method, trajectory, K)


# ----------------------------------------------------------------------------------------------------------------
# value normalisation
# ----------------------------------------------------------------------------------------------------------------


def _scalar(value: Any) -> Any:
    """Unwrap 0-d tensors / numpy scalars into Python numbers."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (ValueError, RuntimeError):  # not a single element
            raise ValueError(f"expected a scalar, got {value!r}") from None
    return value


def _to_int(col: str, value: Any) -> int | None:
    value = _scalar(value)
    if value is None or value == "":
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if not value.is_integer():
            raise ValueError(f"column {col!r} needs an integer, got {value!r}")
    if isinstance(value, str):
        value = value.strip()
        if value.lower() in ("nan", "none", "null"):
            return None
        return int(float(value)) if any(c in value for c in ".eE") else int(value)
    return int(value)


def _to_float(col: str, value: Any) -> float | None:
    value = _scalar(value)
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if value == "" or value.lower() in ("none", "null"):
            return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"column {col!r} needs a number, None or NaN, got {value!r}") from None


def _to_str(value: Any) -> str:
    value = _scalar(value)
    return "" if value is None else str(value)


def normalize_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``row`` (keys must be a subset of :data:`COLUMNS`) and return a full row with typed values.

    Missing string columns become ``""``, missing numbers ``None``. ``forward`` is filled from the method when
    it is missing and the method is one of spec section 4's. ``method``, ``trajectory`` and ``K`` are required.
    """
    unknown = [k for k in row if k not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown result columns {unknown}; allowed: {COLUMNS}")
    out: dict[str, Any] = {}
    for col in COLUMNS:
        value = row.get(col)
        if col in STR_COLUMNS:
            out[col] = _to_str(value)
        elif col in INT_COLUMNS:
            out[col] = _to_int(col, value)
        else:
            out[col] = _to_float(col, value)
    for col in ("method", "trajectory"):
        if not out[col]:
            raise ValueError(f"a result row needs {col!r}: {dict(row)!r}")
    if out["K"] is None:
        raise ValueError(f"a result row needs 'K': {dict(row)!r}")
    if not out["forward"] and out["method"] in ALL_METHODS:
        out["forward"] = ALL_METHODS[out["method"]]
    return out


def cell_key(row: Mapping[str, Any]) -> CellKey:
    """The identity of a cell: ``(dataset, schedule, N, method, trajectory, K)`` with normalised types."""
    return (
        _to_str(row.get("dataset")),
        _to_str(row.get("schedule")),
        _to_int("N", row.get("N")),
        _to_str(row.get("method")),
        _to_str(row.get("trajectory")),
        _to_int("K", row.get("K")),
    )


def _as_key(key: Mapping[str, Any] | Sequence[Any]) -> CellKey:
    if isinstance(key, Mapping):
        return cell_key(key)
    key = tuple(key)
    if len(key) == 3:  # (method, trajectory, K): the short key within one run
        return (None, None, None, _to_str(key[0]), _to_str(key[1]), _to_int("K", key[2]))
    if len(key) == len(KEY_COLUMNS):
        return cell_key(dict(zip(KEY_COLUMNS, key)))
    raise ValueError(f"a cell key is a row, (method, trajectory, K) or {KEY_COLUMNS}; got {key!r}")


def _key_matches(short: CellKey, full: CellKey) -> bool:
    """A key whose first three entries are None matches any dataset/schedule/N."""
    if short[0] is None and short[1] is None and short[2] is None:
        return short[3:] == full[3:]
    return short == full


def is_undefined(value: Any) -> bool:
    """True for NaN (a metric that was computed but is not defined)."""
    return isinstance(value, float) and math.isnan(value)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sort_key(row: Mapping[str, Any]) -> tuple:
    """Sort by dataset, schedule, N, trajectory (even, quadratic, optimal), method (spec section 4 order), K."""

    def order(name: str, canonical: Sequence[str]) -> tuple[int, str]:
        return (canonical.index(name), "") if name in canonical else (len(canonical), name)

    n = row.get("N")
    return (
        row.get("dataset") or "",
        row.get("schedule") or "",
        -1 if n is None else n,
        order(row.get("trajectory") or "", TRAJECTORY_ORDER),
        order(row.get("method") or "", METHOD_ORDER),
        row.get("K") or 0,
    )


def sort_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(r) for r in sorted(rows, key=sort_key)]


# ----------------------------------------------------------------------------------------------------------------
# serialisation
# ----------------------------------------------------------------------------------------------------------------


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # shortest string that round-trips exactly
    return str(value)


def rows_to_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in COLUMNS])
    return buf.getvalue()


def rows_from_csv(text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text))
    return [normalize_row({k: v for k, v in rec.items() if k in COLUMNS}) for rec in reader]


def _json_row(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    nonfinite: dict[str, str] = {}
    for col in COLUMNS:
        value = row.get(col)
        if isinstance(value, float) and not math.isfinite(value):
            nonfinite[col] = _csv_cell(value)
            value = None
        out[col] = value
    if nonfinite:
        out["nonfinite"] = nonfinite
    return out


def rows_to_json(rows: Iterable[Mapping[str, Any]]) -> str:
    doc = {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "columns": COLUMNS,
        "rows": [_json_row(r) for r in rows],
    }
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


def rows_from_json(text: str) -> list[dict[str, Any]]:
    doc = json.loads(text)
    if isinstance(doc, Mapping):
        if "rows" not in doc:
            raise ValueError("not a results.json: no 'rows'")
        records = doc["rows"]
    elif isinstance(doc, list):
        records = doc
    else:
        raise ValueError("not a results.json")
    rows = []
    for rec in records:
        if not isinstance(rec, Mapping):
            raise ValueError(f"not a result row: {rec!r}")
        rec = dict(rec)
        nonfinite = rec.pop("nonfinite", None) or {}
        for col, text_value in nonfinite.items():
            rec[col] = float(text_value)
        rows.append(normalize_row({k: v for k, v in rec.items() if k in COLUMNS}))
    return rows


def write_results(rows: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json`` and ``results.csv`` (atomically) into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    rows = [normalize_row(r) for r in rows]
    paths = {"results_json": out_dir / RESULTS_JSON, "results_csv": out_dir / RESULTS_CSV}
    atomic_write_text(paths["results_json"], rows_to_json(rows))
    atomic_write_text(paths["results_csv"], rows_to_csv(rows))
    return paths


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a run directory (``results.json``, else ``results.csv``) or of one such file.

    A directory without results gives ``[]``. An unreadable JSON next to a readable CSV falls back to the CSV
    with a warning.
    """
    path = Path(path)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        return rows_from_csv(text) if path.suffix == ".csv" else rows_from_json(text)
    json_path, csv_path = path / RESULTS_JSON, path / RESULTS_CSV
    if json_path.is_file():
        try:
            return rows_from_json(json_path.read_text(encoding="utf-8"))
        except (ValueError, json.JSONDecodeError) as err:
            if not csv_path.is_file():
                raise
            warnings.warn(f"{json_path} unreadable ({err}); reading {csv_path}", stacklevel=2)
    if csv_path.is_file():
        return rows_from_csv(csv_path.read_text(encoding="utf-8"))
    return []


# ----------------------------------------------------------------------------------------------------------------
# the store
# ----------------------------------------------------------------------------------------------------------------


class DamagedResultsError(UserError, ValueError):
    """A run directory's results files cannot be read; the message says which and what to do."""


class ResultStore:
    """The finished cells of one run directory, persisted after every :meth:`add`.

    ``ResultStore(run_dir)`` creates the directory if needed and loads any results already there, so rerunning
    into the same directory resumes: ``store.done(key, metrics, ids)`` is True for cells whose metrics were
    computed by the same model and settings (the ``*_id`` columns). Keys are rows (dicts), full keys
    (:func:`cell_key`) or the short ``(method, trajectory, K)`` of one run.

    Several processes may share a run directory (two ``evaluate.py`` on one directory, a multirun on a shared
    file system): every :meth:`add` takes an exclusive lock on ``.results.lock``, re-reads the files, merges its row
    into what is on disk and rewrites them, so no process loses another's rows. :meth:`refresh` re-reads the files
    (call it before starting a costly cell: another process may have finished it).
    """

    LOCK_NAME = ".results.lock"

    def __init__(self, run_dir: str | os.PathLike, lock_timeout: float | None = 600.0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock_timeout = lock_timeout
        self._rows: dict[CellKey, dict[str, Any]] = {}
        self.refresh()

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> ResultStore:
        """The store of ``run_dir`` with its existing results (empty if there are none yet)."""
        return cls(run_dir)

    def lock(self):
        """The store's exclusive lock (a context manager); :meth:`add` takes it itself."""
        return file_lock(self.run_dir / self.LOCK_NAME, timeout=self.lock_timeout, what=f"results in {self.run_dir}")

    def refresh(self) -> ResultStore:
        """Re-read the results files (other processes may have added rows); :class:`DamagedResultsError` when
        neither file is readable."""
        try:
            rows = load_rows(self.run_dir)
        except (ValueError, OSError) as err:
            raise DamagedResultsError(
                f"{self.json_path} is damaged ({err}) and no readable {RESULTS_CSV} is beside it: move it away "
                f"(the grid is then computed again into {self.run_dir}) or restore it from a copy"
            ) from None
        self._rows = {cell_key(row): row for row in rows}
        return self

    # -- queries ---------------------------------------------------------------------------------------------
    @property
    def rows(self) -> list[dict[str, Any]]:
        """Copies of the stored rows, in insertion order."""
        return [dict(r) for r in self._rows.values()]

    @property
    def json_path(self) -> Path:
        return self.run_dir / RESULTS_JSON

    @property
    def csv_path(self) -> Path:
        return self.run_dir / RESULTS_CSV

    def __len__(self) -> int:
        return len(self._rows)

    def _find(self, key: Mapping[str, Any] | Sequence[Any]) -> CellKey | None:
        k = _as_key(key)
        if k in self._rows:
            return k
        matches = [full for full in self._rows if _key_matches(k, full)]
        if len(matches) > 1:
            raise KeyError(f"short key {key!r} is ambiguous in {self.run_dir}: {matches}")
        return matches[0] if matches else None

    def get(self, key: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any] | None:
        k = self._find(key)
        return None if k is None else dict(self._rows[k])

    def done(self, key: Mapping[str, Any] | Sequence[Any], metrics: Iterable[str] = (),
             ids: Mapping[str, str] | None = None) -> bool:
        """True if the cell has a row; with ``metrics`` (e.g. ``("nll_bpd",)``) each of them must also be
        computed (a float; NaN counts: computed, not defined; None = not computed or failed), and with ``ids``
        (``{"nll_bpd": nll_id}``) computed by that identity (the row's ``nll_id`` / ``fid_id``)."""
        row = self.get(key)
        if row is None:
            return False
        for m in metrics:
            if m not in COLUMNS:
                raise ValueError(f"unknown column {m!r}")
            if row[m] is None:
                return False
            if ids is not None and m in ids and row[ID_COLUMNS[m]] != ids[m]:
                return False
        return True

    # -- updates ---------------------------------------------------------------------------------------------
    def add(self, row: Mapping[str, Any], merge: bool = False) -> dict[str, Any]:
        """Store a finished cell and persist both files; a row with the same key is replaced.

        With ``merge=True`` the columns the new row leaves at None/"" keep the old row's values (e.g. add the
        FID of a cell whose NLL is already stored; ``note`` is always the new row's), unless the old metric came
        from another identity (then it is dropped, with its id). Under the store's lock the files are re-read
        first, so rows that other processes added meanwhile are kept. Returns the stored row.
        """
        new = normalize_row(row)
        key = cell_key(new)
        with self.lock():
            self.refresh()
            if merge and key in self._rows:
                old = dict(self._rows[key])
                for metric, id_col in ID_COLUMNS.items():
                    if new[id_col] and old[id_col] and old[id_col] != new[id_col]:
                        old[metric], old[id_col] = None, ""  # computed by something else: never mixed in
                new = {c: (old[c] if c != "note" and (new[c] is None or new[c] == "") else new[c]) for c in COLUMNS}
            self._rows.pop(key, None)  # a replaced row moves to the end: insertion order = completion order
            self._rows[key] = new
            self.flush()
        return dict(new)

    def flush(self) -> None:
        write_results(self._rows.values(), self.run_dir)

    def cell_dir(self, key: Mapping[str, Any] | Sequence[Any], create: bool = True) -> Path:
        """``run_dir/cells/<method>-<trajectory>-K<K>/`` (created unless ``create=False``) for a cell's artifacts."""
        k = _as_key(key)
        method, trajectory, K = k[3], k[4], k[5]
        path = self.run_dir / "cells" / f"{_safe(method)}-{_safe(trajectory)}-K{K}"
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def __repr__(self) -> str:
        return f"ResultStore({str(self.run_dir)!r}, {len(self)} rows)"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_." else "_" for c in name) or "_"
