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
                    term_sums: list[list[float]], count: int, taus: list[int], shard: int, num_shards: int) -> Path:
    doc = {"format": "analytic_dpm.nll_shard/1", "nll_id": nll_id, "cell": dict(key), "methods": methods,
           "bpd_sums": bpd_sums, "term_sums": term_sums, "count": count, "trajectory": taus, "shard": shard,
           "num_shards": num_shards}
    return atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def read_shard_id(path: Path) -> str | None:
    """The metric id a shard file was written for (None if unreadable)."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())["nll_id"]
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


def complete_values(shard_files: Iterable[Path]) -> dict[tuple, dict[str, Any]]:
    """Values of every cell whose shards are all present, keyed by ``(cell key tuple, metric column)``.

    NLL: ``{"nll_bpd": mean bits/dim, "num_nll_images": n, "nll_id": ...}`` per method; FID: ``{"fid": value,
    "num_fid_samples": n, "fid_id": ...}`` computed against the reference statistics named in the shards.
    Incomplete groups give ``{"note": "... shard(s) missing"}`` instead.
    """
    groups: dict[tuple, dict[int, Path]] = {}
    for p in shard_files:
        m = _NAME.match(p.name)
        metric, i, n = m.group(1), int(m.group(2)), int(m.group(3))
        ident = read_shard_id(p)
        if ident is None:
            continue
        gk = (p.parent.name, metric, ident, n)
        groups.setdefault(gk, {})[i] = p
    out: dict[tuple, dict[str, Any]] = {}
    for (_, metric, ident, n), parts in groups.items():
        missing = sorted(set(range(n)) - set(parts))
        if metric == "nll":
            docs = [json.loads(parts[i].read_text()) for i in sorted(parts)]
            key = tuple(docs[0]["cell"][c] for c in ("dataset", "schedule", "N", "trajectory", "K"))
            for k, method in enumerate(docs[0]["methods"]):
                cell = (key[0], key[1], key[2], method, key[3], key[4])
                if missing:
                    out[(cell, "nll_bpd")] = {"note": f"NLL: shard(s) {missing} of {n} missing", "nll_id": ident}
                    continue
                count = sum(d["count"] for d in docs)
                total = sum(d["bpd_sums"][k] for d in docs)
                out[(cell, "nll_bpd")] = {"nll_bpd": total / count, "num_nll_images": int(count), "nll_id": ident}
        else:
            from ..fid import FeatureSums, fid_from_sums, merge_sums

            sums = [FeatureSums.load(parts[i]) for i in sorted(parts)]
            meta = sums[0].metadata
            cell = tuple(meta["cell"][c] for c in ("dataset", "schedule", "N", "method", "trajectory", "K"))
            if missing:
                out[(cell, "fid")] = {"note": f"FID: shard(s) {missing} of {n} missing", "fid_id": ident}
                continue
            merged = merge_sums(sums)
            from .reference import load_reference

            ref = load_reference(meta["reference_path"])
            out[(cell, "fid")] = {"fid": fid_from_sums(merged, ref), "num_fid_samples": int(merged.count),
                                  "fid_id": ident}
    return out
