"""LightningDataModules for Analytic-DPM: image datasets held in memory as uint8, and synthetic float data.

Batches are plain tensors (no labels): ``uint8`` [B, C, H, W] for images, ``float32`` for synthetic data;
:func:`to_model_space` (run on the device) maps uint8 ``k`` to ``2 * k / 255 - 1``. Besides the dataloaders
every datamodule has ``train_pool(n, generator)`` (random training examples, for calibrating Gamma) and
``heldout(n)`` (the first ``n`` held-out examples, for NLL). Hydra builds them from ``conf/data/*.yaml``.
"""

from __future__ import annotations

from .common import (
    DatasetNotAvailableError,
    InMemoryDataModule,
    TensorBatchDataset,
    collate_batch,
    from_model_space,
    to_model_space,
)
from .images import CelebA64DataModule, CIFAR10DataModule, FashionMNISTDataModule, ImageFolderDataModule
from .synthetic import GaussianDataModule, GaussianMixtureDataModule

__all__ = [
    "DATAMODULES",
    "CIFAR10DataModule",
    "CelebA64DataModule",
    "DatasetNotAvailableError",
    "FashionMNISTDataModule",
    "GaussianDataModule",
    "GaussianMixtureDataModule",
    "ImageFolderDataModule",
    "InMemoryDataModule",
    "TensorBatchDataset",
    "collate_batch",
    "from_model_space",
    "get_datamodule_class",
    "to_model_space",
]

# Dataset names (the file names of conf/data/*.yaml) -> datamodule classes.
DATAMODULES: dict[str, type[InMemoryDataModule]] = {
    "cifar10": CIFAR10DataModule,
    "fashion_mnist": FashionMNISTDataModule,
    "celeba64": CelebA64DataModule,
    "imagenet64": ImageFolderDataModule,
    "image_folder": ImageFolderDataModule,
    "gaussian": GaussianDataModule,
    "gmm": GaussianMixtureDataModule,
}


def get_datamodule_class(name: str) -> type[InMemoryDataModule]:
    """The datamodule class of a dataset name; ``ValueError`` listing the choices for an unknown name."""
    try:
        return DATAMODULES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATAMODULES))}"
        ) from None
