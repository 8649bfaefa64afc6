"""FID as a torchmetrics ``Metric``: float32 Inception, float64 statistics, cached reference, DDP sync.

:class:`InceptionFID` is torchmetrics' ``FrechetInceptionDistance`` (torchmetrics all-gathers and adds the
fake-feature sums across DDP ranks at ``compute``) with these choices:

- **Network**: torch-fidelity's ``inception-v3-compat`` via ``feature_extractor_weights_path`` (our offline
  weights, vetted with ``torch.load(weights_only=True)`` first), run through :class:`InceptionFeatures`:
  float32 convolutions, TF32 off on CUDA, chunks of ``batch_size``; images are ``[-1, 1]`` float or uint8,
  quantised by :func:`to_uint8_rgb` exactly as the old path. The network stays float32 whatever is done
  to the module (``.to(dtype)``, ``set_dtype``): torchmetrics' ``set_dtype(float64)`` would run the whole
  Inception in float64 (65 s instead of 26 s for 60k images on an H200) for no measurable gain.
  ``precision="tf32"|"bf16"`` and ``channels_last=True`` are :class:`InceptionFeatures`' speed options (bf16 is
  autocast around the forward only; the weights stay float32); non-default options are part of
  :attr:`InceptionFID.extractor_name`, so references and shard sums made with other options are refused.
- **Resize**: ``antialias=False``, i.e. torch-fidelity's TF1-compatible bilinear resize. torchmetrics'
  default ``antialias=True`` uses ``F.interpolate(mode="bilinear", antialias=True)``, which samples the
  image on half-pixel centres while TF1 (and so the original FID code and torch-fidelity) maps output pixel
  ``i`` to source ``i * 32 / 299``: for 32 -> 299 the two grids are offset by ~0.45 source pixel and treat
  the border differently. That is the 0.003 between torchmetrics' default (3.113) and the old path (3.116)
  on CIFAR-10 JPEG test 10k vs train 50k (H200). Measured on CPU with the real weights
  (``bench/bench_fid.py explain``, first 200 test vs 200 train JPEGs):

  ============================================  ====================  ===========================
  what differs                                   effect on features    FID (old path 111.796231)
  ============================================  ====================  ===========================
  resize: antialias=True vs TF1                  20 % (rel. L2)        110.460575 (-1.2e-2 rel.)
  eigvals(S1 S2) vs symmetric sqrt form          --                    -1.3e-7 rel.
  covariance from raw float64 sums vs centred    cov 3e-14 rel.        +4.4e-9 rel.
  float32 cast of torchmetrics' result           --                    +1.8e-8 rel.
  float64 network (set_dtype), 24 of 200 imgs    2.3e-6 (rel. L2)      +8.0e-9 rel.
  ============================================  ====================  ===========================

  Only the resize moves the FID by more than ~1e-7 relative, and it moves it down, as observed (at
  10k/50k the shift is 1e-3 relative: the small-sample bias dominates at 200). With ``antialias=False``
  the features are bit-identical to :class:`InceptionFeatures` and this metric's FID equals
  ``fid_of_stream``'s to ~1e-9 relative (~1e-7 with fewer images than 2048 dimensions, where the
  covariances are rank-deficient and the square roots of ~0 eigenvalues carry float64 noise). On CUDA
  torchmetrics' float32 network would also run TF32 convolutions (PyTorch's cuDNN default); here TF32 is
  off.
- **States**: float64 sums ``(n, sum x, sum x x^T)`` (torchmetrics' own states, kept float64 against any
  dtype cast), ``reset_real_features=False``. The real (reference) statistics are computed once, cached
  with the rules of :func:`reference_stats` (weights sha256, data fingerprint, count) and loaded into the
  real states (:meth:`InceptionFID.load_reference`) without running the network. Every rank loads the same
  reference, so the real states are *not* added across ranks: their reduction takes rank 0's value and
  raises if the ranks disagree (plain torchmetrics would add ``world_size`` copies, which leaves the mean
  but scales the covariance by ``W (n - 1) / (W n - 1)``).
- **compute** returns a float64 scalar tensor: :func:`fid_from_stats` (symmetric eigendecompositions, on
  the CPU) of the synced states.
- **Shards**: :meth:`InceptionFID.fake_sums` / :meth:`InceptionFID.add_fake_sums` move the fake states to
  and from :class:`~analytic_dpm.fid.sums.FeatureSums` (save, load, merge; see that module for the
  per-sample seeding rule).

Typical use (one rank or many)::

    fid = InceptionFID("weights/pt_inception-2015-12-05.pth", batch_size=250).to(device)
    fid.reference(train_images_u8, cache_path="outputs/fid_ref/cifar10_train_50000.npz")  # cached
    for x in my_share_of_the_samples():   # [-1, 1] float or uint8
        fid.update(x)
    value = float(fid.compute())          # synced across ranks
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from .inception_weights import DEFAULT_WEIGHTS_PATH, FEATURE_DIM, check_weights_file
from .metrics import (
    FeatureStats,
    InceptionFeatures,
    _require_weights_file,
    check_tensor_only_file,
    fid_from_stats,
    reference_stats,
)
from .sums import FeatureSums

__all__ = ["InceptionFID", "same_on_every_rank"]

_REAL = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
_FAKE = ("fake_features_sum", "fake_features_cov_sum", "fake_features_num_samples")


def same_on_every_rank(stacked: Tensor) -> Tensor:
    """Reduction for states every rank holds identically (the reference): rank 0's, after checking.

    ``stacked`` is ``[world_size, ...]``. Every rank sees the same gathered tensors, so every rank raises
    together (no hang) when they differ.
    """
    if not bool((stacked == stacked[0]).all()):
        raise RuntimeError(
            "FID reference statistics differ between ranks: load the same cached reference on every rank "
            "(InceptionFID.reference / load_reference) before compute()"
        )
    return stacked[0]


class InceptionFID(FrechetInceptionDistance):
    """torchmetrics FID with torch-fidelity's Inception in float32 and float64 statistics (module docstring).

    Args:
        weights_path: the converted Inception weights (``make fid-weights``); ``None`` lets torch-fidelity
            download its own (online only).
        batch_size: images per Inception forward inside :meth:`update`.
        precision: the Inception forward's precision, ``"fp32"`` (default: TF32 off, full fp32 like the TF
            reference), ``"tf32"`` or ``"bf16"`` (autocast; see :class:`InceptionFeatures`).
        channels_last: run the Inception in ``torch.channels_last`` memory format.
        allow_tf32: the older spelling of ``precision="tf32"``.
        check_hash: warn if the weights are not the recorded converted file.
        **kwargs: torchmetrics ``Metric`` options (``process_group``, ``dist_sync_fn``, ...).

    Call :meth:`update` and :meth:`compute`, not the metric itself: torchmetrics' ``forward`` computes a
    per-batch FID (two 2048-d eigendecompositions per batch). The Inception's parameters are in the
    module's ``state_dict`` (~96 MB), as with torchmetrics' own class: keep the metric out of checkpoints.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = DEFAULT_WEIGHTS_PATH,
        *,
        batch_size: int = 64,
        precision: str | None = None,
        channels_last: bool = False,
        allow_tf32: bool = False,
        check_hash: bool = True,
        **kwargs: Any,
    ):
        for k in ("feature", "reset_real_features", "normalize", "antialias", "feature_extractor_weights_path"):
            if k in kwargs:
                raise TypeError(f"InceptionFID fixes {k!r} (see its docstring); do not pass it")
        if weights_path is not None:
            weights_path = os.fspath(weights_path)
            _require_weights_file(weights_path)
            check_tensor_only_file(weights_path)  # torch-fidelity loads it with weights_only=False
            if check_hash:
                check_weights_file(weights_path)
        super().__init__(
            feature=FEATURE_DIM,
            reset_real_features=False,
            normalize=False,
            feature_extractor_weights_path=weights_path,
            antialias=False,  # torch-fidelity's TF1-compatible resize (the 0.003: module docstring)
            **kwargs,
        )
        self.inception.to(torch.float32)
        # every rank loads the same reference: take it once instead of adding world_size copies
        for name in _REAL:
            self.add_state(name, self._defaults[name].clone(), dist_reduce_fx=same_on_every_rank)
        self.features = InceptionFeatures(
            weights_path, batch_size=batch_size, precision=precision, channels_last=channels_last,
            allow_tf32=allow_tf32, check_hash=False, model=self.inception,
        )

    # -- dtype invariants -------------------------------------------------------------------------------

    def _apply(self, fn, exclude_state=""):
        # ``.to(dtype)``/``.type(dtype)`` (Lightning's true-precision plugins, say) would round the Inception
        # weights and the float64 sums; keep only the device part of such a cast. Plain ``.half()``/``.float()``
        # are already no-ops on a torchmetrics Metric.
        probe = fn(torch.zeros(1, device=self.device))
        if probe.dtype != torch.float32:
            device = probe.device

            def fn(t):
                return t.to(device)

        return super()._apply(fn, exclude_state)

    def set_dtype(self, dst_type) -> InceptionFID:
        """No-op for float64 (the sums already are); other dtypes are refused. The network stays float32."""
        if dst_type not in (torch.float64, "float64", "double", "torch.float64"):
            raise ValueError(
                f"InceptionFID keeps its statistics in float64 and its network in float32; "
                f"set_dtype({dst_type!r}) is not supported"
            )
        return self

    # -- identity ----------------------------------------------------------------------------------------

    @property
    def weights_id(self) -> str:
        return self.features.weights_id

    @property
    def extractor_name(self) -> str:
        """:attr:`InceptionFeatures.name`: ``inception-v3-compat:2048``, plus ``:<options>`` if not the defaults."""
        return self.features.name

    @property
    def options_id(self) -> str:
        """``""`` at the default Inception options, else e.g. ``"bf16"`` (:func:`feature_options_id`)."""
        return self.features.options_id

    # -- update / compute ------------------------------------------------------------------------------

    def update(self, imgs: Tensor | None = None, real: bool = False, *, features: Tensor | None = None) -> None:
        """Add images (``[B, 1|3, H, W]``, uint8 or ``[-1, 1]`` float) or their Inception ``features``.

        ``features``: ``[B, 2048]`` already computed by :class:`InceptionFeatures` with the same weights.
        """
        if (imgs is None) == (features is None):
            raise ValueError("InceptionFID.update: pass images or features=..., exactly one")
        feats = self.features(imgs) if features is None else features
        if feats.dim() != 2 or feats.shape[1] != FEATURE_DIM:
            raise ValueError(f"features must be [B, {FEATURE_DIM}], got {tuple(feats.shape)}")
        f = feats.to(device=self.fake_features_sum.device, dtype=torch.float64)
        names = _REAL if real else _FAKE
        # paper-free bookkeeping: s += sum_i x_i, S += sum_i x_i x_i^T, n += B (float64)
        setattr(self, names[0], getattr(self, names[0]) + f.sum(dim=0))
        setattr(self, names[1], getattr(self, names[1]) + f.T @ f)
        setattr(self, names[2], getattr(self, names[2]) + f.shape[0])

    def compute(self) -> Tensor:
        """FID of the (synced) fake sums against the real ones, a float64 scalar tensor."""
        fake, real = self.fake_sums(), self.real_sums()
        for what, s in (("generated", fake), ("reference", real)):
            if s.count < 2:
                raise RuntimeError(
                    f"InceptionFID: {s.count} {what} images; need at least 2 (load the reference with "
                    "reference()/load_reference() and update() with samples)"
                )
        return torch.tensor(fid_from_stats(fake.mean, fake.cov, real.mean, real.cov), dtype=torch.float64)

    # -- reference ---------------------------------------------------------------------------------------

    def reference(
        self,
        images,
        cache_path: str | os.PathLike | None = None,
        *,
        fingerprint: str | None = None,
        progress: bool = True,
    ) -> FeatureStats:
        """Reference statistics of ``images`` (cached at ``cache_path``, see :func:`reference_stats`), loaded.

        With a valid cache the Inception does not run. With ``cache_path`` the states are loaded from the file, so
        the process that computed the statistics holds the same bytes as the DDP ranks that read them (the real
        states are checked to be identical on every rank). Returns the :class:`FeatureStats`.
        """
        stats = reference_stats(
            images,
            self.features.weights_path,
            cache_path,
            fingerprint=fingerprint,
            features=self.features,
            progress=progress,
        )
        if cache_path is not None:
            stats = FeatureStats.load(cache_path)
        self.load_reference(stats)
        return stats

    def load_reference(self, ref: FeatureStats | FeatureSums | str | os.PathLike) -> None:
        """Put reference statistics (or a :meth:`FeatureStats.save` file) into the real-feature states.

        ``ValueError`` if their metadata names other Inception weights, or another feature extractor (other
        precision / memory-format options), than this metric's.
        """
        if isinstance(ref, (str, os.PathLike)):
            ref = FeatureStats.load(ref)
        sums = FeatureSums.from_feature_stats(ref) if isinstance(ref, FeatureStats) else ref
        if not isinstance(sums, FeatureSums):
            raise TypeError(f"expected FeatureStats, FeatureSums or a path, got {type(ref).__name__}")
        if sums.dim != FEATURE_DIM:
            raise ValueError(f"reference statistics have dim {sums.dim}, expected {FEATURE_DIM}")
        weights = sums.metadata.get("weights")
        if weights is not None and weights != self.weights_id:
            raise ValueError(
                f"reference statistics were made with Inception weights {weights}, this metric "
                f"uses {self.weights_id}; recompute them (delete the cache)"
            )
        extractor = sums.metadata.get("feature_extractor")
        if extractor is not None and extractor != self.extractor_name:
            raise ValueError(
                f"reference statistics were made with feature extractor {extractor}, this metric uses "
                f"{self.extractor_name}; recompute them with reference() (a cache is recomputed when they differ)"
            )
        self._set_sums(_REAL, sums)

    # -- sums in and out (shards, checks) ----------------------------------------------------------------

    def _sums(self, names, metadata) -> FeatureSums:
        total, outer, count = (getattr(self, n) for n in names)
        meta = {"feature_extractor": self.extractor_name, "weights": self.weights_id, **(metadata or {})}
        return FeatureSums(total.detach().cpu().clone(), outer.detach().cpu().clone(), int(count), meta)

    def _set_sums(self, names, sums: FeatureSums) -> None:
        dev = self.fake_features_sum.device
        setattr(self, names[0], sums.total.to(dev, torch.float64).clone())
        setattr(self, names[1], sums.outer.to(dev, torch.float64).clone())
        setattr(self, names[2], torch.tensor(sums.count, dtype=torch.long, device=dev))
        self._computed = None

    def fake_sums(self, metadata: dict[str, Any] | None = None) -> FeatureSums:
        """The generated images' sums as a CPU :class:`FeatureSums` (this rank's, unless called while synced,
        e.g. inside ``with metric.sync_context():``), with the weights and extractor in its metadata."""
        return self._sums(_FAKE, metadata)

    def real_sums(self) -> FeatureSums:
        return self._sums(_REAL, None)

    def add_fake_sums(self, sums: FeatureSums) -> None:
        """Add (merged) shard sums to the fake states; ``ValueError`` if made with other weights."""
        if sums.dim != FEATURE_DIM:
            raise ValueError(f"sums have dim {sums.dim}, expected {FEATURE_DIM}")
        for key, mine in (("weights", self.weights_id), ("feature_extractor", self.extractor_name)):
            theirs = sums.metadata.get(key)
            if theirs is not None and theirs != mine:
                raise ValueError(f"sums were made with {key} {theirs}, this metric uses {mine}")
        self._set_sums(_FAKE, self.fake_sums() + sums)
        self._update_count += 1
