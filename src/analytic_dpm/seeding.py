"""Seeds derived from a run's seed: every random stream of the package is a pure function of (seed, what, where).

* :func:`mix_seed`: a well-mixed 63-bit seed from integers and short strings (numpy's ``SeedSequence``). Training
  steps, data epochs, Gamma calibrations and the evaluation's sample blocks seed their generators with it, so a
  stream never depends on what ran before it (exact resume, shards, any number of ranks).
* :func:`cell_seed`: the seed of one evaluation cell (a CRC of the base seed and the cell's name), so a cell is
  reproducible when run alone (a multirun job, a resumed grid).
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["cell_seed", "mix_seed"]


def mix_seed(*parts: int | str) -> int:
    """A well-mixed 63-bit seed from integers and short strings (stable across runs and platforms)."""
    words: list[int] = []
    for p in parts:
        if isinstance(p, str):
            words.extend(p.encode())
            words.append(0x5EED)
        else:
            v = int(p)
            words.extend([v & 0xFFFFFFFF, (v >> 32) & 0xFFFFFFFF, 1 if v < 0 else 0])
    lo, hi = (int(w) for w in np.random.SeedSequence(words).generate_state(2, dtype=np.uint32))
    return ((hi << 32) | lo) & ((1 << 63) - 1)


def cell_seed(base: int, *parts) -> int:
    """A per-cell seed, so a cell is reproducible when run alone (multirun job, resume)."""
    return zlib.crc32("/".join(str(p) for p in (base, *parts)).encode()) & 0x7FFFFFFF
