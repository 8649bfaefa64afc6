"""The test suite's FID oracle: the package's earlier streaming FID path, kept here to check the live one.

:class:`StreamingStats` folds feature batches into a float64 mean and centred scatter matrix with Chan et al.'s
pairwise update (no ``E[xx^T] - mu mu^T`` cancellation, so it stays exact where raw sums would lose digits), and
:func:`fid_of_stream` is the FID of a stream of image batches against reference statistics. The package computes FID
one way only (torchmetrics' float64 sums, :class:`analytic_dpm.fid.InceptionFID`); tests compare it with this.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from analytic_dpm.fid import FeatureStats, fid_from_stats


class StreamingStats(FeatureStats):
    """:class:`~analytic_dpm.fid.FeatureStats` that accumulates: ``update(features [N, D])``, centred (Chan)."""

    def __init__(self, metadata: dict[str, Any] | None = None):
        super().__init__(metadata)

    @classmethod
    def from_features(cls, features, metadata: dict[str, Any] | None = None) -> StreamingStats:
        return cls(metadata).update(features)

    def update(self, features) -> StreamingStats:
        x = torch.from_numpy(np.asarray(features)) if not torch.is_tensor(features) else features.detach()
        if x.dim() != 2:
            raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
        if self._mean is not None:
            if x.shape[1] != self._mean.shape[0]:
                raise ValueError(f"feature dim {x.shape[1]} != {self._mean.shape[0]}")
            x = x.to(self._mean.device)
        n_b = x.shape[0]
        if n_b == 0:
            return self
        x = x.to(torch.float64)
        mean_b = x.mean(dim=0)
        xc = x - mean_b
        m2_b = xc.T @ xc
        if self._count == 0:
            self._mean, self._m2 = mean_b, m2_b
        else:  # Chan et al.: merge (n_a, mean_a, M2_a) with the batch's (n_b, mean_b, M2_b)
            n_a = self._count
            n = n_a + n_b
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (n_b / n)
            self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self._count += n_b
        return self


def _batch_tensor(batch) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    return torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch


def fid_of_stream(batches: Iterable, ref: FeatureStats, features, num_samples: int, *,
                  stats: StreamingStats | None = None, progress: bool = False) -> float:
    """FID of the first ``num_samples`` images of a stream of batches against ``ref``: batches are featurised and
    folded in one at a time, and the stream is not pulled past ``num_samples`` (a larger last batch is truncated).
    ``ValueError`` if it ends early. Pass ``stats`` (an empty :class:`StreamingStats`) to get the samples' back."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    if stats is None:
        stats = StreamingStats()
    elif stats.count:
        raise ValueError("stats must be empty")
    for batch in batches:
        x = _batch_tensor(batch)
        take = min(int(x.shape[0]), num_samples - stats.count)
        stats.update(features(x[:take]))
        if stats.count >= num_samples:
            break
    if stats.count < num_samples:
        raise ValueError(f"the sample stream ended after {stats.count} images, expected {num_samples}")
    stats.metadata.setdefault("num_images", stats.count)
    return fid_from_stats(stats.mean, stats.cov, ref.mean, ref.cov)
