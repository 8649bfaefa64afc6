"""Shared pieces of the datamodules: model-space conversion, the in-memory dataset and the base datamodule.

Every dataset in this package is held in memory as one tensor ``[N, C, H, W]`` per split: ``uint8`` for
images (decoded once), ``float32`` for synthetic data. Batches are plain tensors (no labels); images stay
``uint8`` until :func:`to_model_space` runs on the device, so host-to-device traffic is 4x smaller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..pixels import from_model_space, to_model_space  # re-exported: the datamodules' batch contract

__all__ = [
    "DatasetNotAvailableError",
    "InMemoryDataModule",
    "TensorBatchDataset",
    "collate_batch",
    "from_model_space",
    "to_model_space",
]


class DatasetNotAvailableError(UserError, RuntimeError):
    """The files of a dataset are missing and could not be obtained; the message says what to do."""


def _random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each item of the batch ``x`` [B, C, H, W] horizontally with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    if not bool(flip.any()):
        return x
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    return x


class TensorBatchDataset(Dataset):
    """A map-style dataset over one in-memory tensor ``[N, ...]``, fetched a whole batch at a time.

    ``DataLoader`` calls :meth:`__getitems__` with the batch's indices, so a batch is one fancy-indexing
    operation (no per-item Python work and no PIL). With ``flip=True`` each item of a batch is flipped
    horizontally with probability 1/2, using ``generator`` when given, otherwise torch's global RNG
    (which the DataLoader seeds differently in every worker).
    """

    def __init__(self, data: Tensor, flip: bool = False, generator: torch.Generator | None = None):
        if data.ndim < 2:
            raise ValueError(f"expected a tensor [N, ...], got shape {tuple(data.shape)}")
        self.data = data
        self.flip = flip
        self.generator = generator

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        batch = self.data[torch.as_tensor(indices, dtype=torch.long)]
        if self.flip:
            batch = _random_flip(batch, self.generator)
        return batch


def collate_batch(batch: Tensor | Sequence[Tensor]) -> Tensor:
    """Collate for :class:`TensorBatchDataset`: a batch tensor passes through; a list of items is stacked."""
    if isinstance(batch, Tensor):
        return batch
    return torch.stack(list(batch))


def _check_n(n: int | None, available: int, what: str) -> int:
    if n is None:
        return available
    n = int(n)
    if n < 0:
        raise ValueError(f"{what}: n must be >= 0, got {n}")
    if n > available:
        raise ValueError(f"{what}: asked for {n} examples but only {available} are available")
    return n


class InMemoryDataModule(LightningDataModule):
    """Base class: subclasses implement :meth:`_load_split` returning the ``train``/``heldout`` tensor.

    Construction is lazy (nothing is read); :meth:`setup` loads the splits a stage needs, and the helpers
    :meth:`train_pool` / :meth:`heldout` call it themselves when needed.
    """

    name: str = "in_memory"
    channels: int
    image_size: int
    data_range: tuple[float, float] | None = (-1.0, 1.0)

    def __init__(
        self,
        batch_size: int,
        flip: bool = False,
        num_workers: int = 0,
        pin_memory: bool = True,
        eval_batch_size: int | None = None,
    ):
        super().__init__()
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size else self.batch_size
        self.flip = bool(flip)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self._train: Tensor | None = None
        self._heldout: Tensor | None = None

    # ------------------------------------------------------------------ subclass interface
    def _load_split(self, split: str) -> Tensor:
        """Return the whole split (``"train"`` or ``"heldout"``) as a tensor [N, C, H, W]."""
        raise NotImplementedError

    # ------------------------------------------------------------------ loading
    def _check_loaded(self, x: Tensor, split: str) -> Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise RuntimeError(
                f"{self.name}: the {split} split has shape {tuple(x.shape)}, "
                f"expected [N, {', '.join(map(str, expected))}]"
            )
        if x.shape[0] == 0:
            raise RuntimeError(f"{self.name}: the {split} split is empty")
        return x

    def _ensure(self, split: str) -> Tensor:
        if split == "train":
            if self._train is None:
                self._train = self._check_loaded(self._load_split("train"), "train")
            return self._train
        if split == "heldout":
            if self._heldout is None:
                self._heldout = self._check_loaded(self._load_split("heldout"), "heldout")
            return self._heldout
        raise ValueError(f"unknown split {split!r}")

    def setup(self, stage: str | None = None) -> None:
        """Load the data (idempotent): ``fit``/``None`` load both splits, other stages the held-out one."""
        if stage in (None, "fit"):
            self._ensure("train")
        self._ensure("heldout")

    @property
    def num_train(self) -> int:
        return self._ensure("train").shape[0]

    @property
    def num_heldout(self) -> int:
        return self._ensure("heldout").shape[0]

    # ------------------------------------------------------------------ loaders
    def _loader(self, data: Tensor, batch_size: int, train: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            TensorBatchDataset(data, flip=self.flip and train),
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=workers,
            collate_fn=collate_batch,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (``drop_last=True``), randomly flipped when ``flip`` is on."""
        data = self._ensure("train")
        if data.shape[0] < self.batch_size:
            raise ValueError(
                f"{self.name}: batch_size {self.batch_size} exceeds the {data.shape[0]} training examples "
                "(drop_last=True would yield no batch)"
            )
        return self._loader(data, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        """The held-out split in order (used for NLL), never flipped or shuffled."""
        return self._loader(self._ensure("heldout"), self.eval_batch_size, train=False)

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader` (the held-out split)."""
        return self.val_dataloader()

    # ------------------------------------------------------------------ helpers for calibration / evaluation
    def train_pool(self, n: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``n`` training examples drawn at random without replacement (all, in order, when ``n`` is None).

        The result is never flipped. With ``n=None`` the stored tensor itself is returned: do not modify it.
        """
        data = self._ensure("train")
        if n is None:
            return data
        n = _check_n(n, data.shape[0], f"{self.name}.train_pool")
        idx = torch.randperm(data.shape[0], generator=generator)[:n]
        return data[idx]

    def heldout(self, n: int | None = None) -> Tensor:
        """The first ``n`` held-out examples (deterministic; all when ``n`` is None); do not modify."""
        data = self._ensure("heldout")
        n = _check_n(n, data.shape[0], f"{self.name}.heldout")
        return data[:n]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, channels={self.channels}, "
            f"image_size={self.image_size}, batch_size={self.batch_size}, flip={self.flip})"
        )


def check_geometry(name: str, channels: int | None, image_size: int | None, expected_c: int, expected_s: int):
    """Raise when a config's plain ``channels``/``image_size`` keys disagree with the dataset's geometry."""
    if channels is not None and int(channels) != expected_c:
        raise ValueError(f"{name}: channels={channels} but this dataset has {expected_c} channel(s)")
    if image_size is not None and int(image_size) != expected_s:
        raise ValueError(
            f"{name}: image_size={image_size} but this dataset's images are {expected_s}x{expected_s}"
        )
