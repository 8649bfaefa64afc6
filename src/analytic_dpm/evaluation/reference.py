"""Where the FID reference comes from: the Inception weights, the user's statistics file, or the training split's
statistics computed once and cached under a name that identifies the images.

* :func:`fid_context`: torchmetrics' FID (:class:`~analytic_dpm.fid.InceptionFID`) with the reference statistics
  loaded, and its identity (:func:`.provenance.fid_features_identity`);
* :func:`reference_images`: the training images the statistics are computed from;
* :func:`reference_cache_path`: ``<dataset>_train_<n>_<data>[_<options>].npz``; a cache under the older name
  without the images' digest is adopted when it holds the same images;
* :func:`load_reference` / :func:`pytorch_fid_stats`: statistics files (this package's cache or a pytorch-fid
  ``.npz``), also read by ``merge`` for the FID of a sharded cell.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..files import atomic_write
from ..identity import file_sha256
from .context import FidContext
from .provenance import fid_features_identity
from .settings import EvalSettings

log = logging.getLogger(__name__)

__all__ = ["fid_context", "load_reference", "pytorch_fid_stats", "reference_cache_path", "reference_images"]


def fid_context(s: EvalSettings, datamodule, device) -> FidContext | None:
    """torchmetrics' FID (:class:`~analytic_dpm.fid.InceptionFID`) with the reference statistics loaded: the
    user's pytorch-fid ``.npz`` (``eval.fid.reference_stats``) or the training split's, computed once and cached.
    None when the weights are missing and ``eval.fid.skip_if_missing_weights`` is set."""
    from ..fid import InceptionFID, data_fingerprint

    f = s.fid
    weights = f.weights_path
    if weights and not Path(weights).expanduser().is_file():
        if f.skip_if_missing_weights:
            log.warning("FID not computed: Inception weights %s not found (make fid-weights)", weights)
            return None
        raise UserError(
            f"FID Inception weights not found at {weights}. Build them offline with `make fid-weights`, pass "
            "eval.fid.weights_path=FILE, set eval.fid.weights_path=null to let torch-fidelity download them "
            "(online), or drop FID with eval.metrics=[nll]."
        )
    try:
        metric = InceptionFID(weights, batch_size=f.feature_batch_size, precision=f.feature_precision,
                              channels_last=f.channels_last).to(device)
    except OSError as e:  # torch-fidelity's download (weights_path=null) fails offline
        raise UserError(
            f"could not get the FID Inception weights ({type(e).__name__}: {e}); offline, build them with "
            "`make fid-weights` and pass eval.fid.weights_path=FILE, or drop FID with eval.metrics=[nll]"
        ) from None
    if f.reference_stats:
        path = Path(f.reference_stats).expanduser()
        if not path.is_file():
            raise UserError(f"eval.fid.reference_stats: no such file {path}")
        try:
            ref = pytorch_fid_stats(path)
        except (ValueError, OSError) as e:
            raise UserError(f"eval.fid.reference_stats: {e}") from None
        metric.load_reference(ref)
        return FidContext(metric=metric, reference_path=str(path.resolve()),
                          identity=fid_features_identity(metric, {"file": file_sha256(path)}))
    ref_images = reference_images(s, datamodule)
    fingerprint = data_fingerprint(ref_images)
    cache = None
    if f.reference_cache:
        name, n = getattr(datamodule, "name", "data"), len(ref_images)
        cache = reference_cache_path(f.reference_cache, name, fingerprint, n, metric.options_id)
        legacy = reference_cache_path(f.reference_cache, name, None, n, metric.options_id)
        _adopt_unfingerprinted_cache(legacy, cache, fingerprint)
    ref = metric.reference(ref_images, cache_path=cache, fingerprint=fingerprint)
    reference = {k: ref.metadata.get(k) for k in ("fingerprint", "num_images", "weights")}
    return FidContext(metric=metric, reference_path=str(cache.resolve()) if cache else None,
                      identity=fid_features_identity(metric, reference))


def reference_images(s: EvalSettings, datamodule) -> torch.Tensor:
    """The FID reference images: the whole training split, or ``eval.fid.reference_images`` of them drawn with a
    fixed generator (the same images in every process, run and seed)."""
    n = s.fid.reference_images
    if n is None:
        return datamodule.train_pool(None)
    return datamodule.train_pool(n, generator=torch.Generator().manual_seed(0))


def reference_cache_path(cache_dir: str | Path, dataset: str, fingerprint: str | None, num_images: int,
                         options_id: str = "") -> Path:
    """Where the reference statistics of ``num_images`` training images are cached (the directory is created):
    ``<dataset>_train_<n>_<data>[_<options>].npz``, with ``<data>`` the first 10 hex digits of the images' sha256
    (:func:`~analytic_dpm.fid.data_fingerprint`) and ``<options>`` the Inception's non-default options (e.g.
    ``bf16``). Two image folders of the same name and size, or two resolutions of one dataset, thus get files of
    their own instead of overwriting each other's at every run. ``fingerprint=None`` gives the name used before
    the digest was part of it (``<dataset>_train_<n>[_<options>].npz``)."""
    digest = f"_{fingerprint.split(':', 1)[-1][:10]}" if fingerprint else ""
    options = f"_{options_id}" if options_id else ""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir / f"{dataset}_train_{int(num_images)}{digest}{options}.npz"


def _adopt_unfingerprinted_cache(legacy: Path, cache: Path, fingerprint: str) -> None:
    """Statistics cached under the name without the data's digest are linked (or copied) to ``cache`` when they
    are of the same images, so an upgrade does not recompute them. The old name stays: FID shards written before
    the upgrade name it as their reference."""
    if cache.exists() or not legacy.is_file():
        return
    from ..fid import FeatureStats

    try:
        if FeatureStats.load(legacy).metadata.get("fingerprint") != fingerprint:
            return  # another folder's statistics
        try:
            os.link(legacy, cache)
        except FileExistsError:  # another process adopted it first
            return
        except OSError:  # a file system without hard links
            data = legacy.read_bytes()
            atomic_write(cache, lambda out: out.write(data))
    except Exception as e:  # noqa: BLE001 - unreadable: computed as usual
        log.warning("cannot reuse FID reference statistics %s (%s); computing them", legacy, e)
        return
    log.info("FID reference statistics %s reused as %s (same images)", legacy.name, cache.name)


def load_reference(path: str | Path):
    """Reference statistics: this package's cache (``FeatureStats.save``) or a pytorch-fid ``.npz`` (mu, sigma)."""
    from ..fid import FeatureStats

    p = Path(path)
    with np.load(p, allow_pickle=False) as z:
        has_count = "count" in z.files
    return FeatureStats.load(p) if has_count else pytorch_fid_stats(p)


def pytorch_fid_stats(path: str | Path):
    """A pytorch-fid / Analytic-DPM / DDIM statistics file (``mu``, ``sigma``) as FeatureStats (nominal count,
    exact mean and covariance)."""
    from ..fid import FeatureStats

    p = Path(path)
    with np.load(p, allow_pickle=False) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ValueError(f"{p} is not a FID statistics file: it needs arrays 'mu' and 'sigma' "
                             f"(found {', '.join(z.files) or 'none'})")
        mu, sigma = np.asarray(z["mu"], dtype=np.float64), np.asarray(z["sigma"], dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{p}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    return FeatureStats.from_mean_cov(mu, sigma, metadata={"source": "pytorch-fid npz", "path": str(p)})
