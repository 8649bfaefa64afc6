"""Synthetic float data with known densities, for end-to-end tests against exact oracles.

* :class:`GaussianDataModule`: ``x = mean + std * z``, ``z ~ N(0, I)`` (mean/std scalars or broadcastable to
  the data shape [C, H, W]); matches ``analytic_dpm.oracles.GaussianOracle(schedule, mean, std, shape)``.
* :class:`GaussianMixtureDataModule`: component ``j ~ Categorical(weights)``, ``x = means[j] + stds[j] * z``;
  ``means``/``stds`` are [J] (one value per component, broadcast over the data) or [J, C, H, W] (or anything
  broadcastable to it); matches
  ``analytic_dpm.oracles.GaussianMixtureOracle(schedule, means, stds, weights)``.

Both are generated deterministically from ``seed`` (training and held-out sets use separate streams, so
changing ``num_train`` does not change the held-out set); ``data_range`` is None (unbounded).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import InMemoryDataModule

__all__ = ["GaussianDataModule", "GaussianMixtureDataModule", "resolve_shape"]

_STREAMS = {"train": 0, "heldout": 1}


def resolve_shape(
    dim_shape: Sequence[int] | None,
    channels: int | None,
    image_size: int | None,
    name: str,
    default: Sequence[int] | None = None,
) -> tuple[int, int, int]:
    """The data shape (C, H, W) from ``dim_shape`` or from ``channels``/``image_size``, checked for agreement.

    ``default`` is used when none of the three is given.
    """
    if dim_shape is None and channels is None and image_size is None and default is not None:
        dim_shape = default
    if dim_shape is not None:
        shape = tuple(int(s) for s in dim_shape)
        if len(shape) != 3 or shape[1] != shape[2] or min(shape) <= 0:
            raise ValueError(
                f"{name}: dim_shape must be (C, S, S) with positive sizes, got {tuple(dim_shape)}"
            )
        if channels is not None and int(channels) != shape[0]:
            raise ValueError(f"{name}: channels={channels} disagrees with dim_shape={shape}")
        if image_size is not None and int(image_size) != shape[1]:
            raise ValueError(f"{name}: image_size={image_size} disagrees with dim_shape={shape}")
        return shape  # type: ignore[return-value]
    if channels is None or image_size is None:
        raise ValueError(f"{name}: give dim_shape=(C, S, S) or both channels and image_size")
    return (int(channels), int(image_size), int(image_size))


def _generator(seed: int, split: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + _STREAMS[split])


class _SyntheticDataModule(InMemoryDataModule):
    data_range = None

    def __init__(
        self,
        shape: tuple[int, int, int],
        num_train: int,
        num_test: int,
        batch_size: int,
        seed: int,
        flip: bool,
        num_workers: int,
        pin_memory: bool,
        eval_batch_size: int | None,
    ):
        if int(num_train) <= 0 or int(num_test) <= 0:
            raise ValueError(
                f"{self.name}: num_train and num_test must be positive, got {num_train}, {num_test}"
            )
        super().__init__(batch_size, flip, num_workers, pin_memory, eval_batch_size)
        self.shape = shape
        self.channels, self.image_size = shape[0], shape[1]
        self.num_train_examples = int(num_train)
        self.num_test_examples = int(num_test)
        self.seed = int(seed)

    def _count(self, split: str) -> int:
        return self.num_train_examples if split == "train" else self.num_test_examples

    def _load_split(self, split: str) -> Tensor:
        return self.sample(self._count(split), _generator(self.seed, split))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError


def _as_float(value, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    return t


class GaussianDataModule(_SyntheticDataModule):
    """``x = mean + std * z``, ``z ~ N(0, I)`` of shape ``dim_shape`` (C, S, S); float32, deterministic."""

    name = "gaussian"

    def __init__(
        self,
        dim_shape: Sequence[int] | None = (1, 4, 4),
        mean: float | Sequence = 0.0,
        std: float | Sequence = 0.5,
        num_train: int = 10_000,
        num_test: int = 2_000,
        batch_size: int = 256,
        seed: int = 0,
        flip: bool = False,
        num_workers: int = 0,
        pin_memory: bool = True,
        eval_batch_size: int | None = None,
        channels: int | None = None,
        image_size: int | None = None,
    ):
        shape = resolve_shape(dim_shape, channels, image_size, self.name)
        super().__init__(
            shape, num_train, num_test, batch_size, seed, flip, num_workers, pin_memory, eval_batch_size
        )
        self.mean = _as_float(mean, "mean")
        self.std = _as_float(std, "std")
        if (self.std <= 0).any():
            raise ValueError("gaussian: std must be positive")
        try:
            torch.broadcast_shapes(self.mean.shape, self.std.shape, shape)
        except RuntimeError as e:
            raise ValueError(
                f"gaussian: mean {tuple(self.mean.shape)} / std {tuple(self.std.shape)} "
                f"do not broadcast to {shape}"
            ) from e

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn((n, *self.shape), generator=generator)
        return self.mean + self.std * z


class GaussianMixtureDataModule(_SyntheticDataModule):
    """Mixture of isotropic/diagonal Gaussians: ``j ~ Categorical(weights)``, ``x = means[j] + stds[j] * z``.

    ``means``: [J] or [J, C, H, W] (broadcastable); ``stds``: [J] or [J, C, H, W] (default 0.1 each);
    ``weights``: [J], normalised here (default uniform). The shape comes from ``dim_shape``, or
    ``channels``/``image_size``, or ``means`` when it is [J, C, S, S], else (1, 4, 4).
    """

    name = "gmm"

    def __init__(
        self,
        means: Sequence = (-0.5, 0.5),
        stds: float | Sequence | None = None,
        weights: Sequence[float] | None = None,
        dim_shape: Sequence[int] | None = None,
        num_train: int = 10_000,
        num_test: int = 2_000,
        batch_size: int = 256,
        seed: int = 0,
        flip: bool = False,
        num_workers: int = 0,
        pin_memory: bool = True,
        eval_batch_size: int | None = None,
        channels: int | None = None,
        image_size: int | None = None,
    ):
        m = _as_float(means, "means")
        if m.ndim == 0:
            m = m[None]
        J = m.shape[0]
        if dim_shape is None and (channels is None or image_size is None) and m.ndim == 4:
            dim_shape = tuple(m.shape[1:])
        shape = resolve_shape(dim_shape, channels, image_size, self.name, default=(1, 4, 4))
        super().__init__(
            shape, num_train, num_test, batch_size, seed, flip, num_workers, pin_memory, eval_batch_size
        )
        s = _as_float(0.1 if stds is None else stds, "stds")
        if s.ndim == 0:
            s = s.expand(J)
        w = torch.full((J,), 1.0 / J) if weights is None else _as_float(weights, "weights")
        if w.shape != (J,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"gmm: weights must be {J} non-negative numbers with a positive sum, got {w.tolist()}"
            )
        if s.shape[0] != J or (s <= 0).any():
            raise ValueError(
                f"gmm: stds must be positive with one entry per component ({J}), got {tuple(s.shape)}"
            )
        self.means = self._per_component(m, "means")
        self.stds = self._per_component(s, "stds")
        self.weights = w / w.sum()

    def _per_component(self, t: Tensor, name: str) -> Tensor:
        """[J] -> [J, 1, 1, 1]; [J, ...] checked to broadcast to [J, C, H, W]."""
        if t.ndim == 1:
            t = t.view(-1, 1, 1, 1)
        try:
            torch.broadcast_shapes(t.shape, (t.shape[0], *self.shape))
        except RuntimeError as e:
            raise ValueError(
                f"gmm: {name} of shape {tuple(t.shape)} does not broadcast to [J, {self.shape}]"
            ) from e
        return t

    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    def sample_with_components(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        j = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.shape), generator=generator)
        means = self.means.expand(self.num_components, *self.shape)
        stds = self.stds.expand(self.num_components, *self.shape)
        return means[j] + stds[j] * z, j

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.sample_with_components(n, generator)[0]
