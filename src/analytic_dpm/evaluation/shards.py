"""One cell split across several jobs (``eval.shard=i eval.num_shards=n``): partial statistics and their merge.

Each shard job evaluates the blocks ``j = i (mod n)`` of a cell (:mod:`.modules`; a block's randomness depends on
its global index only) and writes, instead of a value, its partial sufficient statistics under
``<run dir>/shards/<method>-<trajectory>-K<K>/``:

* ``nll-<i>-of-<n>.json``: per method the sum of bits/dim and of each NELBO term, and the number of images;
* ``fid-<i>-of-<n>.npz``: :class:`~analytic_dpm.fid.FeatureSums` of the shard's samples (n, sum x, sum x x^T).

Sums add exactly, so :func:`complete_values` (used by ``python -m analytic_dpm.evaluation.merge``) turns the
``n`` shards of a cell into exactly the number one job would have produced (up to float64 rounding of the
additions). Shards are matched by the metric's identity (``nll_id`` / ``fid_id``): shards of other settings never
mix, and a cell with a shard missing stays "not computed", saying which.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..files import atomic_write_text

SHARD_DIR = "shards"
_NAME = re.compile(r"^(nll|fid)-(\d+)-of-(\d+)\.(json|npz)$")


def shard_path(run_dir: Path, cell_dir_name: str, metric: str, shard: int, num_shards: int) -> Path:
    ext = "json" if metric == "nll" else "npz"
    return Path(run_dir) / SHARD_DIR / cell_dir_name / f"{metric}-{shard}-of-{num_shards}.{ext}"


def write_nll_shard(path: Path, *, nll_id: str, key: Mapping[str, Any], methods: list[str], bpd_sums: list[float],
                    term_sums: list[list[float]], count: int, taus: list[int], shard: int, num_shards: int,
                    nll_ids: Mapping[str, str] | None = None) -> Path:
    """``nll_id``: the id of the pass (its first method's); ``nll_ids``: per method, where they differ (a head
    method's id has its own part, spec section 11)."""
    doc = {"format": "analytic_dpm.nll_shard/1", "nll_id": nll_id, "cell": dict(key), "methods": methods,
           "bpd_sums": bpd_sums, "term_sums": term_sums, "count": count, "trajectory": taus, "shard": shard,
           "num_shards": num_shards}
    if nll_ids and any(v != nll_id for v in nll_ids.values()):
        doc["nll_ids"] = dict(nll_ids)
    return atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def read_shard_id(path: Path, method: str | None = None) -> str | None:
    """The metric id a shard file was written for (that of ``method`` for an NLL shard; None if unreadable)."""
    try:
        if path.suffix == ".json":
            doc = json.loads(path.read_text())
            return (doc.get("nll_ids") or {}).get(method, doc["nll_id"])
        from ..fid import FeatureSums

        return FeatureSums.load(path).metadata.get("fid_id")
    except Exception:  # noqa: BLE001 - a damaged shard is recomputed
        return None


def find_shards(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for root in map(Path, paths):
        base = root if root.is_dir() else root.parent
        out += [p for p in base.rglob(f"{SHARD_DIR}/*/*") if _NAME.match(p.name)]
    return sorted(set(out))


def shard_count(num_items: int, block_size: int, shard: int, num_shards: int) -> int:
    """How many items (images, samples) shard ``shard`` of ``num_shards`` covers: the blocks ``j = shard (mod n)`` of
    the fixed blocks of ``block_size`` (:func:`.modules.block_ranges`)."""
    starts = range(0, int(num_items), int(block_size))
    return sum(min(int(block_size), int(num_items) - s) for j, s in enumerate(starts) if j % num_shards == shard)


def _identities(run_dir: Path, cache: dict) -> dict:
    """``identities.json`` of a run directory (id -> identity), read once per directory; {} when absent."""
    if run_dir not in cache:
        try:
            cache[run_dir] = json.loads((run_dir / "identities.json").read_text())
        except (OSError, ValueError):
            cache[run_dir] = {}
    return cache[run_dir]


def _finite(values) -> bool:
    import math

    if isinstance(values, (list, tuple)):
        return all(_finite(v) for v in values)
    return isinstance(values, (int, float)) and not isinstance(values, bool) and math.isfinite(values)


def _read_shard(path: Path, metric: str) -> tuple[str, dict[str, Any]]:
    """``(metric id, what to check and add)`` of a shard file; ``ValueError`` saying why it cannot be used."""
    if metric == "nll":
        try:
            doc = json.loads(path.read_text())
            ident, count = doc["nll_id"], doc["count"]
            sums = [doc["bpd_sums"], doc["term_sums"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"unreadable ({type(e).__name__}: {e})") from None
        if not _finite(sums):
            raise ValueError("it holds non-finite sums (NaN or inf: damaged)")
        return ident, {"doc": doc, "count": count, "cell": doc.get("cell"), "methods": doc.get("methods")}
    from ..fid import FeatureSums

    try:
        sums = FeatureSums.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable ({e})") from None
    import torch

    if not (bool(torch.isfinite(sums.total).all()) and bool(torch.isfinite(sums.outer).all())):
        raise ValueError("it holds non-finite sums (NaN or inf: damaged)")
    return sums.metadata.get("fid_id"), {"sums": sums, "count": sums.count, "cell": sums.metadata.get("cell")}


def complete_values(shard_files: Iterable[Path]) -> dict[tuple, dict[str, Any]]:
    """Values of every cell whose shards are all present and check out, keyed by ``(cell key tuple, metric column)``.

    NLL: ``{"nll_bpd": mean bits/dim, "num_nll_images": n, "nll_id": ...}`` per method; FID: ``{"fid": value,
    "num_fid_samples": n, "fid_id": ...}`` computed against the reference statistics named in the shards.

    Each shard is checked before it is added: readable, finite sums, written for the same cell and metric id as
    the others, and its count equal to the items of its blocks (``j = i (mod n)`` of the cell's fixed blocks, from
    the identity of its id in the run's ``identities.json``: number of images or samples and the block size), so
    the counts add up to the cell's. A cell with a shard missing, unreadable or failing a check stays "not computed"
    with a note saying which file and why (``{"note": ...}``); notes about shard files whose cell cannot be read are
    returned under ``("shard_dir", <cell directory name>, metric)``.
    """
    groups: dict[tuple, dict[int, tuple[Path, dict]]] = {}
    problems: dict[tuple, list[str]] = {}  # (cell dir, metric) -> notes
    ids_cache: dict = {}
    for p in shard_files:
        m = _NAME.match(p.name)
        metric, i, n = m.group(1), int(m.group(2)), int(m.group(3))
        label = f"{'NLL' if metric == 'nll' else 'FID'}: shard file {p}"
        try:
            ident, content = _read_shard(p, metric)
        except ValueError as e:
            problems.setdefault((p.parent.name, metric), []).append(
                f"{label} cannot be used: {e}; rerun that shard job")
            continue
        identity = _identities(p.parents[2], ids_cache).get(ident)
        if identity is not None:
            items = identity["num_images"] if metric == "nll" else identity["num_samples"]
            want = shard_count(items, identity["batch_size"], i, n)
            if content["count"] != want:
                problems.setdefault((p.parent.name, metric), []).append(
                    f"{label} cannot be used: its count {content['count']} is not the {want} items of its blocks "
                    "(damaged, or written with other settings); rerun that shard job")
                continue
        groups.setdefault((p.parent.name, metric, ident, n), {})[i] = (p, content)
    out: dict[tuple, dict[str, Any]] = {}
    for (dir_name, metric, ident, n), parts in groups.items():
        first = parts[min(parts)][1]
        odd = [str(parts[i][0]) for i in sorted(parts) if parts[i][1]["cell"] != first["cell"]
               or parts[i][1].get("methods") != first.get("methods")]
        notes = list(problems.get((dir_name, metric), []))
        notes += [f"{'NLL' if metric == 'nll' else 'FID'}: shard file {f} was written for another cell" for f in odd]
        missing = sorted(set(range(n)) - set(parts))
        if missing:
            notes.append(f"{'NLL' if metric == 'nll' else 'FID'}: shard(s) {missing} of {n} missing")
        if metric == "nll":
            key = tuple(first["cell"][c] for c in ("dataset", "schedule", "N", "trajectory", "K"))
            for k, method in enumerate(first["methods"]):
                cell = (key[0], key[1], key[2], method, key[3], key[4])
                if notes:
                    out[(cell, "nll_bpd")] = {"note": "; ".join(notes),
                                              "nll_id": (first["doc"].get("nll_ids") or {}).get(method, ident)}
                    continue
                docs = [parts[i][1]["doc"] for i in sorted(parts)]
                count = sum(d["count"] for d in docs)
                total = sum(d["bpd_sums"][k] for d in docs)
                method_id = (first["doc"].get("nll_ids") or {}).get(method, ident)
                out[(cell, "nll_bpd")] = {"nll_bpd": total / count, "num_nll_images": int(count), "nll_id": method_id}
        else:
            from ..fid import fid_from_sums, merge_sums

            sums = [parts[i][1]["sums"] for i in sorted(parts)]
            meta = sums[0].metadata
            cell = tuple(meta["cell"][c] for c in ("dataset", "schedule", "N", "method", "trajectory", "K"))
            if notes:
                out[(cell, "fid")] = {"note": "; ".join(notes), "fid_id": ident}
                continue
            merged = merge_sums(sums)
            from .reference import load_reference

            ref = load_reference(meta["reference_path"])
            out[(cell, "fid")] = {"fid": fid_from_sums(merged, ref), "num_fid_samples": int(merged.count),
                                  "fid_id": ident}
    grouped = {(d, m) for (d, m, _, _) in groups}
    for (dir_name, metric), notes in problems.items():
        if (dir_name, metric) not in grouped:  # no readable shard of that cell: its rows are found by directory
            out[("shard_dir", dir_name, metric)] = {"note": "; ".join(notes)}
    return out
