#!/usr/bin/env python3
"""Write a CIFAR-10 JPEG archive (``jpeg_q75.npz``) out as ImageFolder trees: OUT/{train,test}/<class>/<k>.jpg.

The archive keeps, per split, one shared JPEG header and the concatenated bodies: ``{split}_header``,
``{split}_bodies``, ``{split}_offsets`` (len + 1), ``{split}_labels``, plus ``classes`` (see the data README of the
development machines). Header + body is the original file, byte for byte. Used by ``tools/gpu_session.sh`` on a
machine that has only the archive; any ImageFolder tree of CIFAR-10 works the same with ``data=image_folder``.

    python tools/unpack_cifar_npz.py ARCHIVE.npz OUT [--splits train,test] [--limit N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def unpack(archive: Path, out: Path, splits=("train", "test"), limit: int | None = None) -> dict[str, int]:
    with np.load(archive) as z:
        missing = [k for s in splits for k in (f"{s}_header", f"{s}_bodies", f"{s}_offsets", f"{s}_labels")
                   if k not in z.files] + ([] if "classes" in z.files else ["classes"])
        if missing:
            raise ValueError(f"{archive} is not a CIFAR JPEG archive: missing {', '.join(missing)}")
        classes = [str(c) for c in z["classes"]]
        written = {}
        for split in splits:
            header = z[f"{split}_header"].tobytes()
            bodies = z[f"{split}_bodies"].tobytes()
            offsets, labels = z[f"{split}_offsets"], z[f"{split}_labels"]
            if len(offsets) != len(labels) + 1:
                raise ValueError(f"{archive}: {split}_offsets must have one entry more than {split}_labels")
            n = len(labels) if limit is None else min(limit, len(labels))
            per_class = dict.fromkeys(classes, 0)
            for cls in classes:
                (out / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                cls = classes[int(labels[i])]
                path = out / split / cls / f"{per_class[cls]:04d}.jpg"
                path.write_bytes(header + bodies[int(offsets[i]):int(offsets[i + 1])])
                per_class[cls] += 1
            written[split] = n
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archive", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--splits", default="train,test")
    ap.add_argument("--limit", type=int, default=None, help="at most this many images per split (smoke runs)")
    args = ap.parse_args(argv)
    if not args.archive.is_file():
        print(f"error: no such archive {args.archive}", file=sys.stderr)
        return 2
    try:
        written = unpack(args.archive, args.out, tuple(s for s in args.splits.split(",") if s), args.limit)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in written.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
