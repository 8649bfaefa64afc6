"""Sufficient statistics of Inception features as plain sums: what ranks, shards and jobs add up.

Of the generated samples' features ``x_i`` (``i = 1..n``, ``D = 2048``) FID needs only

    n,    s = sum_i x_i  (D),    S = sum_i x_i x_i^T  (D x D),

from which ``mu = s / n`` and the unbiased covariance ``Sigma = (S - n mu mu^T) / (n - 1)`` (as ``np.cov``).
These are exactly the fake-feature states of torchmetrics' ``FrechetInceptionDistance``
(``fake_features_sum``, ``fake_features_cov_sum``, ``fake_features_num_samples``), which torchmetrics
all-gathers and adds across DDP ranks; :class:`FeatureSums` is the same triple outside the metric, so a job
that evaluates one shard of a FID cell can write it (:meth:`FeatureSums.save`) and ``merge`` can add the
shards (:func:`merge_sums`, :func:`load_and_merge`). Addition is exact in exact arithmetic, so any split of
the cell's samples gives the one-job ``(n, s, S)`` up to float64 rounding of the additions (~1e-16
relative), and the merged FID equals the one-job FID to ~1e-12 (tests check 1e-9).

Precision of raw sums (versus the centred, Chan-style updates of :class:`~analytic_dpm.fid.FeatureStats`):
``S - n mu mu^T`` cancels about ``log10(1 + mu_j^2 / Sigma_jj)`` digits. Inception pool features are
non-negative averages with mean ~0.3 and standard deviation of the same order, so float64 keeps ~14 digits:
on 200 real CIFAR-10 feature vectors the two covariances agree to 3e-14 of the largest entry and the FIDs
to 4e-9 relative (the noise floor of a rank-deficient FID; ``bench/bench_fid.py explain``). Raw sums in
float32 would not be fine; they are always float64 here.

Sharding a cell across jobs (``eval.shard=i eval.num_shards=n``): the union of the shards' samples must be
the samples one job would draw, so **each sample's randomness must depend only on its global index in the
cell** (e.g. a generator seeded from ``(cell seed, global sample index)`` or per fixed-size block of
indices), never on the shard, the rank or how many samples were drawn before it in this process. Then shard
``i`` of ``n`` evaluates its own index range, writes ``FeatureSums`` with ``metadata={"shard": i,
"num_shards": n, ...}``, and :func:`load_and_merge` checks that the shards agree on everything else (weights,
feature extractor, cell) and that all ``n`` are present before adding them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..files import atomic_write

SUMS_FORMAT = "analytic_dpm.fid.FeatureSums/1"
#: Metadata keys that differ between the shards of one cell (everything else must be equal to merge).
SHARD_KEYS = ("shard",)

__all__ = ["SHARD_KEYS", "SUMS_FORMAT", "FeatureStats", "FeatureSums", "fid_from_stats", "fid_from_sums",
           "load_and_merge", "merge_sums"]


class FeatureStats:
    """The mean and unbiased covariance of ``count`` feature vectors, float64, with ``metadata``: what reference
    statistics are on disk (this package's cache, pytorch-fid's ``mu``/``sigma`` files) and in memory.

    Made from sums (:meth:`FeatureSums.to_feature_stats`), a file (:meth:`load`) or a mean and covariance
    (:meth:`from_mean_cov`); it does not accumulate features itself (that is :class:`FeatureSums`' job, the same
    sums torchmetrics' FID keeps).
    """

    def __init__(self, metadata: dict[str, Any] | None = None):
        self._count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None  # sum of (x - mean)(x - mean)^T
        self.metadata: dict[str, Any] = dict(metadata or {})

    @property
    def count(self) -> int:
        return self._count

    @property
    def dim(self) -> int | None:
        return None if self._mean is None else int(self._mean.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """float64 ``[D]``."""
        if self._mean is None:
            raise ValueError("FeatureStats is empty")
        return self._mean.cpu().numpy().copy()

    @property
    def cov(self) -> np.ndarray:
        """float64 ``[D, D]`` unbiased covariance (divides by ``count - 1``, like ``np.cov``)."""
        if self._count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self._count}")
        return (self._m2 / (self._count - 1)).cpu().numpy()

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mu``, ``sigma``, ``count`` and JSON ``metadata`` to an ``.npz`` (atomically)."""
        arrays = {"mu": self.mean, "sigma": self.cov, "count": np.int64(self._count),
                  "metadata": np.array(json.dumps(self.metadata, sort_keys=True))}
        # a file object: numpy does not append ".npz"; a temporary file of its own, so writers never collide
        atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        with np.load(path, allow_pickle=False) as z:
            mu = np.asarray(z["mu"], dtype=np.float64)
            sigma = np.asarray(z["sigma"], dtype=np.float64)
            count = int(z["count"])
            metadata = json.loads(str(z["metadata"])) if "metadata" in z.files else {}
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or count < 2:
            raise ValueError(
                f"{path}: malformed statistics (mu {mu.shape}, sigma {sigma.shape}, count {count})"
            )
        return cls.from_mean_cov(mu, sigma, count, metadata)

    @classmethod
    def from_mean_cov(cls, mean, cov, count: int = 2, metadata: dict[str, Any] | None = None) -> FeatureStats:
        """Statistics from a mean ``[D]`` and an unbiased covariance ``[D, D]`` of ``count`` features.

        For statistics of unknown size (pytorch-fid's ``mu``/``sigma`` files) keep the nominal ``count=2``: FID
        uses only the mean and the covariance, and ``cov`` is then stored exactly.
        """
        out = cls(metadata)
        out._count = int(count)
        out._mean = torch.as_tensor(np.asarray(mean, dtype=np.float64))
        out._m2 = torch.as_tensor(np.asarray(cov, dtype=np.float64) * (int(count) - 1))
        return out

    def __repr__(self) -> str:
        return f"FeatureStats(count={self._count}, dim={self.dim})"



def _as_f64(x) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x)) if not torch.is_tensor(x) else x.detach()
    return t.to(device="cpu", dtype=torch.float64)


@dataclass
class FeatureSums:
    """``count`` = n, ``total`` = sum_i x_i ``[D]``, ``outer`` = sum_i x_i x_i^T ``[D, D]`` (float64, CPU)."""

    total: torch.Tensor
    outer: torch.Tensor
    count: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.total = _as_f64(self.total)
        self.outer = _as_f64(self.outer)
        self.count = int(self.count)
        d = self.total.shape[0] if self.total.dim() == 1 else -1
        if self.total.shape != (d,) or self.outer.shape != (d, d):
            raise ValueError(
                f"FeatureSums: total {tuple(self.total.shape)} and outer {tuple(self.outer.shape)}"
                " must be [D] and [D, D]"
            )
        if self.count < 0:
            raise ValueError(f"FeatureSums: count must be >= 0, got {self.count}")
        self.metadata = dict(self.metadata)

    # -- construction ------------------------------------------------------------------------------------

    @classmethod
    def zeros(cls, dim: int, metadata: dict[str, Any] | None = None) -> FeatureSums:
        return cls(torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64), 0, metadata or {})

    @classmethod
    def accumulate(cls, batches: Iterable, metadata: dict[str, Any] | None = None) -> FeatureSums:
        """Sums of the rows of every ``[N, D]`` batch, accumulated in float64 on the first batch's device (where the
        features are: no transfer per batch), returned on the CPU. The arithmetic of torchmetrics' FID states."""
        total = outer = None
        count = 0
        for features in batches:
            x = torch.from_numpy(np.asarray(features)) if not torch.is_tensor(features) else features.detach()
            if x.dim() != 2:
                raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
            x = x.to(device=total.device if total is not None else x.device, dtype=torch.float64)
            if total is not None and x.shape[1] != total.shape[0]:
                raise ValueError(f"feature dim {x.shape[1]} != {total.shape[0]}")
            # s += sum_i x_i, S += sum_i x_i x_i^T, n += N
            total = x.sum(dim=0) if total is None else total + x.sum(dim=0)
            outer = x.T @ x if outer is None else outer + x.T @ x
            count += x.shape[0]
        if total is None:
            raise ValueError("FeatureSums.accumulate: no batches")
        return cls(total, outer, count, metadata or {})

    @classmethod
    def from_features(cls, features, metadata: dict[str, Any] | None = None) -> FeatureSums:
        """Sums of the rows of ``features`` ``[N, D]`` (cast to float64 before any arithmetic)."""
        return cls.accumulate([features], metadata)

    @classmethod
    def from_feature_stats(cls, stats: FeatureStats) -> FeatureSums:
        """``s = n mu``, ``S = (n - 1) Sigma + n mu mu^T``: the sums that give back ``stats``' mean and cov.

        The round trip through ``(S - n mu mu^T) / (n - 1)`` returns ``Sigma`` to ~1e-16 relative.
        """
        n = stats.count
        mu = torch.from_numpy(stats.mean)
        return cls(n * mu, (n - 1) * torch.from_numpy(stats.cov) + n * torch.outer(mu, mu), n, dict(stats.metadata))

    # -- values --------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self.total.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """``mu = s / n``, float64 ``[D]``."""
        if self.count < 1:
            raise ValueError("FeatureSums is empty")
        return (self.total / self.count).numpy()

    @property
    def cov(self) -> np.ndarray:
        """``Sigma = (S - n mu mu^T) / (n - 1)``, float64 ``[D, D]`` (unbiased, like ``np.cov``)."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        mu = self.total / self.count
        return ((self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)).numpy()

    def to_feature_stats(self) -> FeatureStats:
        """The equivalent :class:`FeatureStats` (same mean and covariance)."""
        out = FeatureStats(self.metadata)
        out._count = self.count
        out._mean = torch.from_numpy(self.mean)
        out._m2 = torch.from_numpy(self.cov * (self.count - 1))
        return out

    # -- arithmetic ----------------------------------------------------------------------------------------

    def add_features(self, features) -> FeatureSums:
        """Fold rows ``[N, D]`` in (in place); returns ``self``."""
        other = FeatureSums.from_features(features)
        if other.dim != self.dim:
            raise ValueError(f"feature dim {other.dim} != {self.dim}")
        self.total += other.total
        self.outer += other.outer
        self.count += other.count
        return self

    def __add__(self, other: FeatureSums) -> FeatureSums:
        if not isinstance(other, FeatureSums):
            return NotImplemented
        if other.dim != self.dim:
            raise ValueError(f"cannot add FeatureSums of dims {self.dim} and {other.dim}")
        return FeatureSums(self.total + other.total, self.outer + other.outer, self.count + other.count, self.metadata)

    # -- files ---------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``total``, ``outer``, ``count`` and JSON ``metadata`` to an ``.npz``, atomically.

        About ``8 D^2`` bytes (32 MiB for D = 2048; the full matrix is kept so loading is bit-exact).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:  # a file object: numpy does not append ".npz"
                np.savez(
                    f,
                    format=np.array(SUMS_FORMAT),
                    total=self.total.numpy(),
                    outer=self.outer.numpy(),
                    count=np.int64(self.count),
                    metadata=np.array(json.dumps(self.metadata, sort_keys=True)),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureSums:
        """Read a file written by :meth:`save` (``allow_pickle=False``); ``ValueError`` if malformed."""
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt = str(z["format"]) if "format" in z.files else None
                if fmt != SUMS_FORMAT:
                    raise ValueError(f"format {fmt!r}, expected {SUMS_FORMAT!r}")
                total, outer, count = z["total"], z["outer"], int(z["count"])
                metadata = json.loads(str(z["metadata"]))
        except (KeyError, OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a FeatureSums file ({e})") from None
        except ValueError as e:
            raise ValueError(f"{path}: not a FeatureSums file ({e})") from None
        if total.dtype != np.float64 or outer.dtype != np.float64 or not isinstance(metadata, dict):
            raise ValueError(f"{path}: malformed FeatureSums (dtypes {total.dtype}, {outer.dtype})")
        return cls(torch.from_numpy(total), torch.from_numpy(outer), count, metadata)


def merge_sums(parts: Sequence[FeatureSums], *, require_complete: bool = True) -> FeatureSums:
    """Add the sums of the shards of one cell (in shard order, for a reproducible rounding).

    All parts must have equal metadata apart from ``shard`` (weights, feature extractor, cell, ...; a
    mismatch is a ``ValueError`` naming the key). With ``num_shards`` in the metadata the shard indices must
    be distinct and, if ``require_complete``, cover ``0 .. num_shards - 1``. The result's metadata is the
    common metadata plus ``shards`` (the merged indices).
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_sums: nothing to merge")

    def common(m: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in m.items() if k not in SHARD_KEYS}

    ref = common(parts[0].metadata)
    for i, p in enumerate(parts[1:], start=1):
        other = common(p.metadata)
        bad = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
        if bad:
            k = bad[0]
            raise ValueError(
                f"merge_sums: part {i} differs from part 0 in {k!r}: {other.get(k)!r} != "
                f"{ref.get(k)!r} (shards of different cells, weights or settings?)"
            )
    shards = [p.metadata.get("shard") for p in parts]
    if any(s is not None for s in shards):
        if any(s is None for s in shards):
            raise ValueError("merge_sums: some parts have a 'shard' index and some do not")
        if len(set(shards)) != len(shards):
            dup = sorted({s for s in shards if shards.count(s) > 1})
            raise ValueError(f"merge_sums: shard(s) {dup} given more than once")
        num = ref.get("num_shards")
        if num is not None:
            outside = sorted(s for s in shards if not 0 <= int(s) < int(num))
            if outside:
                raise ValueError(f"merge_sums: shard(s) {outside} outside 0..{int(num) - 1}")
            missing = sorted(set(range(int(num))) - {int(s) for s in shards})
            if missing and require_complete:
                raise ValueError(f"merge_sums: shard(s) {missing} of {int(num)} missing; run them first")
        parts = [p for _, p in sorted(zip(shards, parts, strict=True), key=lambda sp: int(sp[0]))]
    out = FeatureSums.zeros(parts[0].dim, ref)
    for p in parts:
        out = out + p
    out.metadata = dict(ref)
    if any(s is not None for s in shards):
        out.metadata["shards"] = sorted(int(s) for s in shards)
    return out


def load_and_merge(paths: Iterable[str | os.PathLike], *, require_complete: bool = True) -> FeatureSums:
    """:func:`merge_sums` of the files written by :meth:`FeatureSums.save`."""
    return merge_sums([FeatureSums.load(p) for p in paths], require_complete=require_complete)


def fid_from_sums(fake: FeatureSums, ref: FeatureStats | FeatureSums) -> float:
    """FID (float64) of the samples summarised by ``fake`` against reference statistics ``ref``."""
    return fid_from_stats(fake.mean, fake.cov, ref.mean, ref.cov)


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between Gaussians: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)``, float64.

    torch-fidelity's ``fid_statistics_to_metric`` takes tr sqrt(S1 S2) as the sum of square roots of the
    (non-symmetric) eigenvalues of S1 S2. The same eigenvalues are those of the symmetric PSD matrix
    sqrt(S1) S2 sqrt(S1), so two symmetric eigendecompositions give the same number several times faster
    (tests check the agreement with torch-fidelity).
    """

    def arr(a):
        return torch.as_tensor(np.asarray(a.detach().cpu().numpy() if torch.is_tensor(a) else a, dtype=np.float64))

    mu1, sigma1, mu2, sigma2 = arr(mu1), arr(sigma1), arr(mu2), arr(sigma2)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"inconsistent shapes: mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}"
        )
    sym1 = (sigma1 + sigma1.T) / 2
    w, V = torch.linalg.eigh(sym1)
    root1 = (V * w.clamp(min=0).sqrt()) @ V.T  # sqrt(S1)
    inner = root1 @ ((sigma2 + sigma2.T) / 2) @ root1
    ev = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0)
    diff = mu1 - mu2
    fid = diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2 * ev.sqrt().sum()
    return float(fid)
