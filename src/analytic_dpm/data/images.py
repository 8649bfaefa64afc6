"""Image datamodules. Each split is decoded once and held in memory as ``uint8`` [N, C, H, W].

=================  ============  ============================  ==================================
datamodule         geometry      training split                held-out split (NLL)
=================  ============  ============================  ==================================
CIFAR10            3 x 32 x 32   torchvision train (50k)       torchvision test (10k)
FashionMNIST       1 x 28 x 28   train (60k)                   t10k (10k)
CelebA64           3 x 64 x 64   ``train`` (162,770)           ``test`` (19,962), or ``valid``
ImageFolder        C x S x S     every image under train_dir   every image under test_dir
=================  ============  ============================  ==================================
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import MissingFileError
from .common import DatasetNotAvailableError, InMemoryDataModule, check_geometry
from .fashion_mnist_files import DEBIAN_DIR, SETUP_COMMAND, fill_raw_from_debian, missing_raw_files, raw_dir
from .sources import cached_decode, list_images, resample_filter

__all__ = [
    "CIFAR10DataModule",
    "CelebA64DataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
]


# ---------------------------------------------------------------- CIFAR-10
class CIFAR10DataModule(InMemoryDataModule):
    """CIFAR-10 via torchvision (``root/cifar-10-batches-py``): train=True trains, the test batch is held out.

    Args:
        root: directory holding (or receiving) ``cifar-10-batches-py``.
        batch_size: training batch size; ``eval_batch_size`` (default: the same) for the held-out loader.
        flip: random horizontal flips of training batches (default on, as in DDPM / Analytic-DPM).
        download: let torchvision download the archive when the files are missing.
        num_workers, pin_memory: DataLoader options (pinning only happens when CUDA is available).
        channels, image_size: optional checks (3, 32) so configs can carry them as plain keys.
    """

    name = "cifar10"
    channels = 3
    image_size = 32

    def __init__(
        self,
        root: str | os.PathLike = "data",
        batch_size: int = 128,
        flip: bool = True,
        download: bool = True,
        num_workers: int = 0,
        pin_memory: bool = True,
        eval_batch_size: int | None = None,
        channels: int | None = 3,
        image_size: int | None = 32,
    ):
        check_geometry(self.name, channels, image_size, 3, 32)
        super().__init__(batch_size, flip, num_workers, pin_memory, eval_batch_size)
        self.root = Path(root).expanduser()
        self.download = bool(download)

    def _not_available(self, cause: BaseException | None) -> DatasetNotAvailableError:
        root = self.root
        why = f" (download failed: {type(cause).__name__}: {cause})" if cause is not None else ""
        return DatasetNotAvailableError(
            f"CIFAR-10 not found under {root}/cifar-10-batches-py{why}. To fix it, either\n"
            "  - connect to the internet and keep download=True (the archive is fetched once), or\n"
            f"  - put the python version of CIFAR-10 (the folder `cifar-10-batches-py`) under {root}, or\n"
            "  - use images in folders instead: data=image_folder data.train_dir=DIR data.test_dir=DIR\n"
            "    (for example, a development copy kept in a shared checkout can be unpacked with\n"
            "    `python ../shared/data/cifar10/prepare.py OUT` and then used with\n"
            "    data.train_dir=OUT/jpeg_q75/train data.test_dir=OUT/lossless/test)."
        )

    def _dataset(self, train: bool):
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(str(self.root), train=train, download=False)
        except RuntimeError:
            if not self.download:
                raise self._not_available(None) from None
        try:
            return CIFAR10(str(self.root), train=train, download=True)
        except Exception as e:  # URLError, OSError, RuntimeError (bad checksum), ...
            raise self._not_available(e) from e

    def prepare_data(self) -> None:
        # Lightning runs this on one process first: download here so ranks don't race.
        self._dataset(train=True)

    def _load_split(self, split: str) -> Tensor:
        ds = self._dataset(train=split == "train")
        return torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------- Fashion-MNIST
class FashionMNISTDataModule(InMemoryDataModule):
    """Fashion-MNIST (1 x 28 x 28) from ``root/FashionMNIST/raw`` (torchvision's layout, uncompressed idx).

    When the files are missing it copies + gunzips Debian's ``dataset-fashion-mnist`` files from
    ``debian_dir``, then tries torchvision's download, then raises an error naming
    ``python -m analytic_dpm.data.fashion_mnist_setup ROOT``.

    ``flip`` defaults to True: clothes are (nearly) left-right symmetric, so flips are a valid augmentation.
    ``image_size`` may be larger than 28 (e.g. 32 for a U-Net that halves the resolution three times): the
    images are then zero-padded symmetrically (background is 0), which needs ``image_size - 28`` even.
    """

    name = "fashion_mnist"
    channels = 1

    def __init__(
        self,
        root: str | os.PathLike = "data",
        batch_size: int = 128,
        flip: bool = True,
        download: bool = True,
        num_workers: int = 0,
        pin_memory: bool = True,
        eval_batch_size: int | None = None,
        channels: int | None = 1,
        image_size: int | None = 28,
        debian_dir: str | os.PathLike = DEBIAN_DIR,
    ):
        image_size = 28 if image_size is None else int(image_size)
        if image_size < 28 or (image_size - 28) % 2:
            raise ValueError(
                f"fashion_mnist: image_size must be 28 or 28 + an even padding, got {image_size}"
            )
        check_geometry(self.name, channels, None, 1, image_size)
        super().__init__(batch_size, flip, num_workers, pin_memory, eval_batch_size)
        self.image_size = image_size
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.debian_dir = Path(debian_dir)

    def _ensure_files(self) -> None:
        if not missing_raw_files(self.root):
            return
        if fill_raw_from_debian(self.root, self.debian_dir):
            return
        error: BaseException | None = None
        if self.download:
            from torchvision.datasets import FashionMNIST

            try:
                FashionMNIST(str(self.root), train=True, download=True)
            except Exception as e:  # network errors of all kinds
                error = e
        missing = missing_raw_files(self.root)
        if missing:
            why = f"\n(torchvision's download failed: {type(error).__name__}: {error})" if error else ""
            raise DatasetNotAvailableError(
                f"Fashion-MNIST files missing from {raw_dir(self.root)}: {', '.join(missing)}.{why}\n"
                f"Run `{SETUP_COMMAND} {self.root}` (copies Debian's dataset-fashion-mnist files, "
                "installing the package with apt when possible), or put the four uncompressed idx files "
                "there, or connect to the internet with download=True."
            )

    def prepare_data(self) -> None:
        self._ensure_files()

    def _load_split(self, split: str) -> Tensor:
        from torchvision.datasets import FashionMNIST

        self._ensure_files()
        ds = FashionMNIST(str(self.root), train=split == "train", download=False)
        x = ds.data
        if x.dtype != torch.uint8 or x.ndim != 3:
            raise RuntimeError(f"unexpected Fashion-MNIST data: dtype {x.dtype}, shape {tuple(x.shape)}")
        x = x.unsqueeze(1).contiguous()
        pad = (self.image_size - x.shape[-1]) // 2
        if pad:
            x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=0)
        return x


# ---------------------------------------------------------------- CelebA 64
# DDIM's crop of the aligned 178 x 218 CelebA images: a 128 x 128 box, rows 57..184 and columns 25..152.
CELEBA_CROP_BOX = (25, 57, 153, 185)  # PIL (left, upper, right, lower)
_CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}


class _CelebATransform:
    def __init__(self, image_size: int, resample: str):
        self.image_size = image_size
        self.resample = resample_filter(resample)

    def __call__(self, img):
        img = img.convert("RGB").crop(CELEBA_CROP_BOX)
        return img.resize((self.image_size, self.image_size), resample=self.resample)


class CelebA64DataModule(InMemoryDataModule):
    """CelebA (aligned) with DDIM's preprocessing: crop rows 57..184 and columns 25..152 (128 x 128), resize.

    Reads ``root/celeba/img_align_celeba/*.jpg`` and ``root/celeba/list_eval_partition.txt`` (torchvision's
    layout; ``download=True`` asks torchvision to fetch them, which needs gdown and Google Drive quota).
    The resize is Pillow's antialiased bilinear filter (``resample``), which is what torchvision's
    ``Resize(64)`` does on PIL images in DDIM's pipeline. The decoded splits (~2.4 GB for ``train``) are
    cached as ``.npy`` in ``cache_dir`` (default ``root/celeba/.cache``), so only the first run decodes.
    """

    name = "celeba64"
    channels = 3

    def __init__(
        self,
        root: str | os.PathLike = "data",
        batch_size: int = 64,
        flip: bool = True,
        download: bool = False,
        num_workers: int = 0,
        pin_memory: bool = True,
        eval_batch_size: int | None = None,
        channels: int | None = 3,
        image_size: int | None = 64,
        heldout_split: str = "test",
        cache_dir: str | os.PathLike | None = None,
        resample: str = "bilinear",
        decode_workers: int | None = None,
    ):
        image_size = 64 if image_size is None else int(image_size)
        check_geometry(self.name, channels, None, 3, image_size)
        if heldout_split not in ("valid", "test"):
            raise ValueError(f"celeba64: heldout_split must be 'valid' or 'test', got {heldout_split!r}")
        resample_filter(resample)
        super().__init__(batch_size, flip, num_workers, pin_memory, eval_batch_size)
        self.image_size = image_size
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.heldout_split = heldout_split
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.root / "celeba" / ".cache"
        self.resample = resample
        self.decode_workers = decode_workers

    @property
    def base(self) -> Path:
        return self.root / "celeba"

    def _files_present(self) -> bool:
        return (self.base / "img_align_celeba").is_dir() and (self.base / "list_eval_partition.txt").is_file()

    def _ensure_files(self) -> None:
        if self._files_present():
            return
        error: BaseException | None = None
        if self.download:
            from torchvision.datasets import CelebA

            try:
                CelebA(str(self.root), split="all", target_type=[], download=True)
            except Exception as e:
                error = e
        if not self._files_present():
            why = f" (download failed: {type(error).__name__}: {error})" if error else ""
            raise DatasetNotAvailableError(
                f"CelebA not found: expected {self.base}/img_align_celeba/ and "
                f"{self.base}/list_eval_partition.txt{why}. Put the aligned CelebA images "
                "(img_align_celeba.zip, unpacked) and list_eval_partition.txt there, or set "
                "data.download=true (torchvision downloads from Google Drive; needs gdown and network "
                "access), or use data=image_folder with a folder of face images."
            )

    def prepare_data(self) -> None:
        self._ensure_files()

    def _split_files(self, split: str) -> list[Path]:
        code = _CELEBA_SPLITS[split]
        names = []
        with open(self.base / "list_eval_partition.txt") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1].lstrip("-").isdigit() and int(parts[1]) == code:
                    names.append(parts[0])
        if not names:
            raise RuntimeError(f"{self.base / 'list_eval_partition.txt'} lists no image of split {split!r}")
        img_dir = self.base / "img_align_celeba"
        paths = [img_dir / n for n in sorted(names)]
        missing = [p for p in paths[:10] + paths[-10:] if not p.is_file()]
        if missing:
            raise DatasetNotAvailableError(
                f"CelebA images missing, e.g. {missing[0]} (is img_align_celeba unpacked?)"
            )
        return paths

    def _load_split(self, split: str) -> Tensor:
        self._ensure_files()
        celeba_split = "train" if split == "train" else self.heldout_split
        paths = self._split_files(celeba_split)
        data, _ = cached_decode(
            self.base / "img_align_celeba",
            paths,
            self.cache_dir,
            tag=f"celeba-{celeba_split}",
            image_size=self.image_size,
            channels=3,
            transform=_CelebATransform(self.image_size, self.resample),
            transform_id=f"ddim_crop{CELEBA_CROP_BOX}",
            resample=self.resample,
            workers=self.decode_workers,
        )
        return data


# ---------------------------------------------------------------- image folders
class ImageFolderDataModule(InMemoryDataModule):
    """Any folder tree of images (ImageNet 64, LSUN, CIFAR-10 unpacked as PNG/JPEG ...), flat or ``<class>/``.

    Every image under ``train_dir`` trains and every image under ``test_dir`` is held out (sorted by relative
    path, so ``heldout(n)`` is deterministic). Images are converted to RGB (``channels=3``) or L
    (``channels=1``), center-cropped to a square when not square and resized to ``image_size`` when needed
    (Pillow's ``resample`` filter, antialiased). Each split is decoded once into memory and cached as ``.npy``
    in ``cache_dir`` (default ``<train_dir>/../.cache``) under a name that hashes the file list and the
    preprocessing, so later runs start at once; ``cache_dir=false``/``None`` with ``use_cache=False`` turns
    caching off. ``max_train_images``/``max_test_images`` keep a fixed random subset (seed 0) for small runs.
    """

    name = "image_folder"

    def __init__(
        self,
        train_dir: str | os.PathLike,
        test_dir: str | os.PathLike,
        image_size: int,
        channels: int = 3,
        batch_size: int = 128,
        flip: bool = True,
        num_workers: int = 0,
        pin_memory: bool = True,
        eval_batch_size: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        resample: str = "bilinear",
        decode_workers: int | None = None,
        max_train_images: int | None = None,
        max_test_images: int | None = None,
        name: str | None = None,
    ):
        if channels not in (1, 3):
            raise ValueError(f"image_folder: channels must be 1 or 3, got {channels}")
        if int(image_size) <= 0:
            raise ValueError(f"image_folder: image_size must be positive, got {image_size}")
        resample_filter(resample)
        super().__init__(batch_size, flip, num_workers, pin_memory, eval_batch_size)
        self.train_dir = Path(train_dir).expanduser()
        self.test_dir = Path(test_dir).expanduser()
        self.image_size = int(image_size)
        self.channels = int(channels)
        if not use_cache:
            self.cache_dir = None
        else:
            self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.train_dir.parent / ".cache"
        self.resample = resample
        self.decode_workers = decode_workers
        self.max_images = {"train": max_train_images, "heldout": max_test_images}
        if name:
            self.name = name
        self.last_cache_files: dict[str, Path | None] = {}

    def _dir(self, split: str) -> Path:
        return self.train_dir if split == "train" else self.test_dir

    def _load_split(self, split: str) -> Tensor:
        directory = self._dir(split)
        key = "train_dir" if split == "train" else "test_dir"
        if not directory.is_dir():
            raise MissingFileError(f"{self.name}: {key} {directory} does not exist (set data.{key}=...)")
        paths = list_images(directory)
        limit = self.max_images[split]
        if limit is not None and limit < len(paths):
            keep = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0))[: int(limit)]
            paths = [paths[i] for i in sorted(keep.tolist())]
        tag = "-".join(part for part in (directory.parent.name, directory.name) if part) or "images"
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)
        data, cache_file = cached_decode(
            directory,
            paths,
            self.cache_dir,
            tag=tag,
            image_size=self.image_size,
            channels=self.channels,
            resample=self.resample,
            workers=self.decode_workers,
        )
        self.last_cache_files[split] = cache_file
        if cache_file is not None:
            print(f"{self.name}: {split} split {tuple(data.shape)} (cache {cache_file})", file=sys.stderr)
        return data
