"""FID with torch-fidelity's Inception: the feature extractor, the Frechet distance, cached reference statistics.

The one FID path of the package is :class:`~analytic_dpm.fid.InceptionFID` (torchmetrics): samples stream into its
float64 sums. This module gives it its pieces: :class:`InceptionFeatures` (torch-fidelity's network and resize),
:func:`fid_from_stats` (the Frechet distance, equal to torch-fidelity's ``fid_statistics_to_metric``), and
:func:`reference_stats` (the reference statistics, accumulated as the same sums (:class:`~.sums.FeatureSums`),
cached in a ``.npz`` with what identifies them). The earlier streaming path (centred Chan updates and
``fid_of_stream``) is kept only as the test suite's oracle (``tests/helpers/fid_oracle.py``).

Typical use::

    feats = InceptionFeatures("weights/pt_inception-2015-12-05.pth", device="cuda", batch_size=250)
    ref = reference_stats(train_images_u8, cache_path="outputs/fid_ref_cifar10.npz", features=feats)
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..accel import PRECISIONS, precision_scope
from ..errors import MissingFileError
from ..files import file_lock, safe_torch_load
from .inception_weights import (
    DEFAULT_WEIGHTS_PATH,
    FEATURE_DIM,
    FEATURE_EXTRACTOR_NAME,
    check_weights_file,
    weights_sha256,
)
from .sums import FeatureStats, FeatureSums, fid_from_stats

STATS_FORMAT = "analytic_dpm.fid.FeatureStats/1"
FEATURE_LAYER = "2048"
#: Identifies torch-fidelity's own download (``weights_path=None``) in cache metadata.
TORCH_FIDELITY_DEFAULT_WEIGHTS = "torch-fidelity:weights-inception-2015-12-05-6726825d.pth"
#: how long a process waits for another one computing the same cached reference statistics (50k images on a CPU
#: take about an hour); a holder that dies releases the lock at once
REFERENCE_LOCK_TIMEOUT_S = 4 * 3600.0
#: Numeric precisions of the Inception forward (:class:`InceptionFeatures`); fp32 (TF32 off) is the default.
FEATURE_PRECISIONS = PRECISIONS

__all__ = [
    "FEATURE_PRECISIONS",
    "FeatureStats",
    "check_tensor_only_file",
    "InceptionFeatures",
    "data_fingerprint",
    "feature_extractor_name",
    "feature_options_id",
    "fid_from_stats",
    "reference_stats",
    "to_uint8_rgb",
    "weights_identity",
]


# ---------------------------------------------------------------------------------------------------------
# Images and Inception features
# ---------------------------------------------------------------------------------------------------------


def to_uint8_rgb(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Images -> uint8 ``[B, 3, H, W]`` as torch-fidelity expects.

    uint8 input is kept as is; floating input is taken to be in ``[-1, 1]`` and quantised like saving
    a PNG: ``round((x + 1) * 127.5)`` clamped to ``[0, 255]``. One channel is repeated to three.
    """
    x = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
    if not torch.is_tensor(x):
        raise TypeError(f"expected a torch.Tensor or numpy array, got {type(images).__name__}")
    if x.dim() != 4:
        raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels (NCHW), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        pass
    elif x.is_floating_point():
        if x.dtype != torch.float64:
            x = x.to(torch.float32)
        x = torch.round((x + 1) * 127.5).clamp_(0, 255).to(torch.uint8)
    else:
        raise TypeError(f"images must be uint8 in [0, 255] or float in [-1, 1], got {x.dtype}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def weights_identity(weights_path: str | os.PathLike | None) -> str:
    """What identifies the Inception weights in cache metadata: ``sha256:<hex>`` of the file."""
    if weights_path is None:
        return TORCH_FIDELITY_DEFAULT_WEIGHTS
    _require_weights_file(weights_path)
    return f"sha256:{weights_sha256(weights_path)}"


def _require_weights_file(weights_path: str | os.PathLike) -> None:
    if not os.path.isfile(weights_path):
        raise MissingFileError(
            f"FID Inception weights not found at {os.fspath(weights_path)!r}. Run `make fid-weights` "
            f"(python -m analytic_dpm.fid.inception_weights --out {DEFAULT_WEIGHTS_PATH}) or pass "
            "`fid.weights_path=<file>`."
        )


@functools.lru_cache(maxsize=16)
def _tensor_only_cached(path: str, size: int, mtime_ns: int) -> None:
    try:
        obj = safe_torch_load(path, what="Inception weights file", mmap=True)
    except ValueError as e:
        raise ValueError(
            f"{path} is not a plain tensor state dict (torch.load(weights_only=True) refused it: {e}). Rebuild the "
            "weights with `make fid-weights`; never point fid.weights_path at a file you do not trust."
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise ValueError(f"{path} is not a state dict of tensors; rebuild it with `make fid-weights`")


def check_tensor_only_file(weights_path: str | os.PathLike) -> None:
    """Refuse a weights file that ``torch.load(weights_only=True)`` cannot read as ``{str: Tensor}``.

    torch-fidelity opens ``feature_extractor_weights_path`` with ``weights_only=False`` (full pickle), so the
    file is vetted here first (memoised on path, size and mtime; ``mmap`` keeps it cheap).
    """
    path = os.path.realpath(weights_path)
    st = os.stat(path)
    _tensor_only_cached(path, st.st_size, st.st_mtime_ns)


def feature_options_id(precision: str = "fp32", channels_last: bool = False) -> str:
    """What the Inception options add to the feature extractor's identity: ``""`` at the defaults.

    Otherwise the precision, plus ``"+cl"`` for channels_last: ``"tf32"``, ``"bf16"``, ``"fp32+cl"``,
    ``"bf16+cl"``. TF32 and bf16 change the features (bf16: 3e-2 relative L2 with the real weights, measured on a
    CPU); channels_last computes the same numbers in exact arithmetic but through other convolution kernels, so its
    rounding differs (2e-6 relative on a CPU, like another batch size). It is named anyway: a result or a cached
    reference then says exactly how its features were made, at no cost to the defaults -- every result and cache
    made before these options existed keeps its identity. (The batch size is not named: it never was, and naming it
    now would change every existing identity for float32 noise.)
    """
    precision = _check_precision(precision)
    if precision == "fp32" and not channels_last:
        return ""
    return precision + ("+cl" if channels_last else "")


def feature_extractor_name(options_id: str = "") -> str:
    """``inception-v3-compat:2048`` (the defaults), with ``:<options_id>`` appended otherwise (``...:2048:bf16``).

    Recorded as ``feature_extractor`` in cached reference statistics and shard sums, and compared when they are
    reused: statistics made with other options are recomputed, never mixed.
    """
    base = f"{FEATURE_EXTRACTOR_NAME}:{FEATURE_LAYER}"
    return f"{base}:{options_id}" if options_id else base


def _check_precision(precision: str) -> str:
    if not isinstance(precision, str) or precision not in FEATURE_PRECISIONS:
        raise ValueError(
            f"Inception precision={precision!r}: choose one of fp32 (float32 with TF32 off, the default), tf32 "
            "(TF32 convolutions on CUDA) or bf16 (bfloat16 autocast)"
        )
    return precision


def _resolve_precision(precision: str | None, allow_tf32: bool) -> str:
    """``precision`` checked (None: fp32), with the older ``allow_tf32=True`` read as ``"tf32"``; a precision other
    than tf32 given together with ``allow_tf32=True`` is a contradiction, refused."""
    if not allow_tf32:
        return _check_precision("fp32" if precision is None else precision)
    if precision not in (None, "tf32"):
        raise ValueError(
            f"InceptionFeatures: allow_tf32=True asks for TF32 but precision={precision!r} for something else; pass "
            "only one of them (allow_tf32=True is the older spelling of precision='tf32')"
        )
    return "tf32"


class InceptionFeatures:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (``inception-v3-compat``), 2048-d pool features.

    ``weights_path=None`` uses torch-fidelity's standard download (needs internet); a given path must
    exist (``FileNotFoundError`` otherwise), must hold only tensors (it is opened with
    ``torch.load(weights_only=True)`` before torch-fidelity, which loads it with ``weights_only=False``, sees
    it) and is checked against the recorded hash of the converted weights (a warning if it differs). Call it
    on images ``[B, 1|3, H, W]``, uint8 or float in ``[-1, 1]`` (see :func:`to_uint8_rgb`), any ``H, W``
    (torch-fidelity resizes to 299x299 with TF1-compatible bilinear interpolation); returns float32
    ``[B, 2048]`` on the network's device, computed in chunks of ``batch_size``.

    Speed options (``bench/bench_fid.py features`` measures their speed and their effect on FID):

    - ``precision="fp32"`` (the default, None): float32 with TF32 off on CUDA, so features are full fp32 like the
      TensorFlow reference. ``"tf32"``: TF32 convolutions and matmuls on CUDA (identical to fp32 on a CPU).
      ``"bf16"``: ``torch.autocast(device_type, torch.bfloat16)`` around the network call (cuda and cpu only);
      the weights stay float32. The TF32 switches and the autocast state are set for each call and restored
      afterwards (:func:`analytic_dpm.accel.precision_scope`); an outer autocast does not reach the network.
      ``allow_tf32=True`` is the older spelling of ``precision="tf32"``.
    - ``channels_last``: the network's weights (converted once, in place, also for a given ``model``) and each
      input chunk in ``torch.channels_last`` memory format.

    Features are float32 whatever the options. Options other than the defaults are part of :attr:`name`
    (:func:`feature_options_id`), so cached reference statistics are only reused with the same options.

    ``model``: an already built network to use instead of building one (the torchmetrics metric passes its
    own ``NoTrainInceptionV3``, which returns the features as a tensor rather than a 1-tuple); it is
    neither moved nor reloaded, and ``device`` follows it.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = DEFAULT_WEIGHTS_PATH,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        *,
        precision: str | None = None,
        channels_last: bool = False,
        allow_tf32: bool = False,
        check_hash: bool = True,
        model: torch.nn.Module | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.precision = _resolve_precision(precision, allow_tf32)
        if not isinstance(channels_last, bool):
            raise ValueError(f"channels_last must be True or False, got {channels_last!r}")
        self.channels_last = channels_last
        if weights_path is not None:
            weights_path = os.fspath(weights_path)
            _require_weights_file(weights_path)
            if model is None:
                check_tensor_only_file(weights_path)
            if check_hash:
                check_weights_file(weights_path)
        self.weights_path = weights_path
        self.weights_id = weights_identity(weights_path)
        self.batch_size = int(batch_size)
        if model is None:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            model = FeatureExtractorInceptionV3(
                FEATURE_EXTRACTOR_NAME, [FEATURE_LAYER], feature_extractor_weights_path=weights_path
            ).to(device)
        self.model = model
        self.model.eval().requires_grad_(False)
        self._apply_memory_format()
        #: Images passed through the network so far (lets callers/tests see whether it ran).
        self.num_images = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def allow_tf32(self) -> bool:
        """Whether TF32 is on (``precision == "tf32"``); kept for callers of the older argument."""
        return self.precision == "tf32"

    @property
    def options_id(self) -> str:
        """``""`` at the default options, else e.g. ``"bf16"``, ``"fp32+cl"`` (:func:`feature_options_id`)."""
        return feature_options_id(self.precision, self.channels_last)

    @property
    def name(self) -> str:
        """``inception-v3-compat:2048``, with ``:<options_id>`` appended for non-default options."""
        return feature_extractor_name(self.options_id)

    def _apply_memory_format(self) -> None:
        """channels_last: the 4-d weights in that format, once (``.to(device)`` keeps a tensor's memory format)."""
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _check_device(self, device: torch.device) -> None:
        if self.precision == "bf16" and device.type not in ("cuda", "cpu"):
            raise ValueError(
                f"Inception precision='bf16' needs a cuda or cpu device, the network is on {device}; use fp32"
            )

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        x = to_uint8_rgb(images)
        device = self.device
        if x.shape[0] == 0:
            return torch.empty(0, FEATURE_DIM, device=device)
        self._check_device(device)
        out = []
        with precision_scope(self.precision, device.type):
            for start in range(0, x.shape[0], self.batch_size):
                chunk = x[start : start + self.batch_size].to(device, non_blocking=True)
                if self.channels_last:
                    chunk = chunk.contiguous(memory_format=torch.channels_last)
                feats = self.model(chunk)
                if isinstance(feats, (tuple, list)):  # torch-fidelity: a tuple of the requested layers
                    (feats,) = feats
                out.append(feats.to(torch.float32))
                self.num_images += chunk.shape[0]
        return torch.cat(out) if len(out) > 1 else out[0]


# ---------------------------------------------------------------------------------------------------------
# Reference statistics (cached) and streamed FID
# ---------------------------------------------------------------------------------------------------------


def data_fingerprint(images: torch.Tensor | np.ndarray) -> str:
    """sha256 of an image tensor's dtype, shape and bytes."""
    a = (
        images.detach().cpu().contiguous().numpy()
        if torch.is_tensor(images)
        else np.ascontiguousarray(images)
    )
    h = hashlib.sha256(f"{a.dtype.str}|{a.shape}|".encode())
    h.update(memoryview(a).cast("B"))
    return f"sha256:{h.hexdigest()}"


def _batch_tensor(batch) -> torch.Tensor:
    """A batch from a DataLoader may be ``(images, labels)``: take the images."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    return torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch


def _iter_batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    if torch.is_tensor(images) or isinstance(images, np.ndarray):
        for start in range(0, images.shape[0], batch_size):
            yield _batch_tensor(images[start : start + batch_size])
    else:
        for batch in images:
            yield _batch_tensor(batch)


def _metadata_mismatch(cached: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [
        f"{k}: cached {cached.get(k)!r} != {v!r}"
        for k, v in wanted.items()
        if v is not None and cached.get(k) != v
    ]


def reference_stats(
    images,
    weights_path: str | os.PathLike | None = DEFAULT_WEIGHTS_PATH,
    cache_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    *,
    fingerprint: str | None = None,
    features: InceptionFeatures | None = None,
    progress: bool = True,
) -> FeatureStats:
    """Inception statistics of reference images, cached in ``cache_path`` (``.npz``).

    ``images``: a uint8 (or [-1, 1] float) tensor/array ``[N, C, H, W]``, or an iterable of such
    batches (e.g. a DataLoader; ``(images, labels)`` tuples are fine). The cache metadata records the
    number of images, the data ``fingerprint`` (default: sha256 of the tensor; required for an
    iterable when caching), the Inception weights' sha256 and the feature extractor's name (which names
    non-default precision / memory-format options, :attr:`InceptionFeatures.name`); the cache is reused
    when they match and recomputed (with a warning) when they do not. ``features`` reuses an already
    loaded extractor (then ``weights_path``/``device``/``batch_size`` and the options are taken from it);
    otherwise one with the default options is only built when the statistics must be computed.
    """
    is_array = torch.is_tensor(images) or isinstance(images, np.ndarray)
    if fingerprint is None and is_array:
        fingerprint = data_fingerprint(images)
    if fingerprint is None and cache_path is not None:
        raise ValueError(
            "reference_stats: pass fingerprint=... to cache statistics of an iterable of batches"
        )
    weights_id = features.weights_id if features is not None else weights_identity(weights_path)
    # without ``features`` the extractor built below has the default options, hence the default name
    extractor = features.name if features is not None else feature_extractor_name()
    wanted = {
        "format": STATS_FORMAT,
        "feature_extractor": extractor,
        "weights": weights_id,
        "fingerprint": fingerprint,
        "num_images": int(images.shape[0]) if is_array else None,
    }

    if cache_path is None:
        return _compute_reference(images, features, weights_path, device, batch_size, wanted, is_array, progress)
    # one process computes, the others (DDP ranks started by srun, shard jobs) wait and then read its file
    with file_lock(f"{os.fspath(cache_path)}.lock", timeout=REFERENCE_LOCK_TIMEOUT_S,
                   what=f"the FID reference statistics {cache_path}"):
        if os.path.exists(cache_path):
            try:
                cached = FeatureStats.load(cache_path)
            except Exception as e:  # noqa: BLE001 - a corrupt cache is recomputed
                warnings.warn(f"cannot read reference statistics {cache_path} ({e!r}); recomputing", stacklevel=2)
            else:
                problems = _metadata_mismatch(cached.metadata, wanted)
                if not problems:
                    return cached
                warnings.warn(
                    f"reference statistics {cache_path} do not match ({'; '.join(problems)}); recomputing",
                    stacklevel=2,
                )
        stats = _compute_reference(images, features, weights_path, device, batch_size, wanted, is_array, progress)
        stats.save(cache_path)
    return stats


def _compute_reference(images, features, weights_path, device, batch_size, wanted, is_array, progress
                       ) -> FeatureStats:
    if features is None:
        features = InceptionFeatures(weights_path, device=device, batch_size=batch_size)
    total = wanted["num_images"] if is_array else None
    with tqdm(total=total, desc="FID reference", unit="img", disable=not progress, leave=False) as bar:

        def feature_batches():
            for batch in _iter_batches(images, features.batch_size):
                yield features(batch)
                bar.update(batch.shape[0])

        # the float64 sums (n, sum x, sum x x^T) torchmetrics' FID keeps for the samples: one way to accumulate
        sums = FeatureSums.accumulate(feature_batches())
    if sums.count < 2:
        raise ValueError(f"reference statistics need at least 2 images, got {sums.count}")
    stats = sums.to_feature_stats()
    stats.metadata = {**wanted, "num_images": stats.count}
    return stats
