#!/usr/bin/env python3
"""Compare the training-loss curves of two runs of train.py (Lightning CSV logs, ``train/loss``).

Made for A/B runs that differ in one speed option (issue 9: the UNet's attention in fp32 vs bf16) and share the
seed, so both see the same images, timesteps and noise at every step: the curves then differ only through the
numerics, and their paired difference is a sensitive test of "the loss curve is unchanged".

    python tools/compare_loss_curves.py A/metrics.csv B/metrics.csv [--labels a,b] [--tolerance 0.02] [--out x.json]

Reports, over the steps both runs logged: the mean loss of each run over the last quarter, its relative
difference (the verdict: ``unchanged`` if below ``--tolerance``), and the mean / max relative paired difference
after the first 10 % of the steps (the start, where the loss falls fast, is left out).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

LOSS = "train/loss"


def read_loss(path: Path) -> dict[int, float]:
    """``{step: loss}`` from a Lightning CSVLogger ``metrics.csv`` (rows without a loss are other metrics)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or LOSS not in reader.fieldnames or "step" not in reader.fieldnames:
            raise ValueError(f"{path}: no '{LOSS}' and 'step' columns (is it a train.py CSV log?)")
        out = {}
        for row in reader:
            if row.get(LOSS) not in (None, ""):
                out[int(float(row["step"]))] = float(row[LOSS])
    if not out:
        raise ValueError(f"{path}: no {LOSS} values logged")
    return out


def compare(a: dict[int, float], b: dict[int, float], tolerance: float = 0.02) -> dict:
    steps = sorted(set(a) & set(b))
    if len(steps) < 4:
        raise ValueError(f"the runs share only {len(steps)} logged steps; need at least 4")
    tail = steps[len(steps) * 3 // 4:]
    body = steps[len(steps) // 10:]
    mean_a = sum(a[s] for s in tail) / len(tail)
    mean_b = sum(b[s] for s in tail) / len(tail)
    rel = [abs(b[s] - a[s]) / abs(a[s]) for s in body if a[s] != 0]
    tail_rel = abs(mean_b - mean_a) / abs(mean_a) if mean_a else math.inf
    return {
        "steps_compared": len(steps), "last_step": steps[-1],
        "last_quarter_mean": [mean_a, mean_b], "last_quarter_relative_difference": tail_rel,
        "paired_relative_difference_mean": sum(rel) / len(rel) if rel else None,
        "paired_relative_difference_max": max(rel) if rel else None,
        "tolerance": tolerance, "verdict": "unchanged" if tail_rel <= tolerance else "changed",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--labels", default="a,b")
    ap.add_argument("--tolerance", type=float, default=0.02, help="relative difference of the last-quarter losses")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    labels = [s.strip() for s in args.labels.split(",")]
    if len(labels) != 2:
        ap.error("--labels needs two comma-separated names")
    try:
        res = compare(read_loss(args.a), read_loss(args.b), args.tolerance)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = {"labels": labels, "files": [str(args.a), str(args.b)], **res}
    (ma, mb), d = res["last_quarter_mean"], res["last_quarter_relative_difference"]
    print(f"{labels[0]}: {ma:.5f}  {labels[1]}: {mb:.5f}  (last quarter of {res['steps_compared']} logged steps, "
          f"relative difference {d:.2%}; paired mean {res['paired_relative_difference_mean']:.2%}, max "
          f"{res['paired_relative_difference_max']:.2%}) -> {res['verdict']}")
    if args.out:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
