"""Fashion-MNIST idx files: where torchvision reads them and how to fill that from Debian's package.

Shared by :class:`~analytic_dpm.data.FashionMNISTDataModule` and the ``fashion_mnist_setup`` command.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

__all__ = [
    "DEBIAN_DIR",
    "DEBIAN_PACKAGE",
    "RAW_FILES",
    "SETUP_COMMAND",
    "debian_files_present",
    "fill_raw_from_debian",
    "missing_raw_files",
    "raw_dir",
]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
# uncompressed file name -> idx magic number (2051: uint8 3-d images, 2049: uint8 1-d labels)
RAW_FILES = {
    "train-images-idx3-ubyte": 2051,
    "train-labels-idx1-ubyte": 2049,
    "t10k-images-idx3-ubyte": 2051,
    "t10k-labels-idx1-ubyte": 2049,
}
SETUP_COMMAND = "python -m analytic_dpm.data.fashion_mnist_setup"


def raw_dir(root: str | os.PathLike) -> Path:
    """``ROOT/FashionMNIST/raw``: where torchvision's ``FashionMNIST`` looks for the idx files."""
    return Path(root).expanduser() / "FashionMNIST" / "raw"


def missing_raw_files(root: str | os.PathLike) -> list[str]:
    d = raw_dir(root)
    return [name for name in RAW_FILES if not (d / name).is_file()]


def _check_idx(path: Path, magic: int) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) < 4 or struct.unpack(">i", head)[0] != magic:
        raise ValueError(f"{path} is not an idx file with magic number {magic}")


def debian_files_present(debian_dir: str | os.PathLike = DEBIAN_DIR) -> bool:
    d = Path(debian_dir)
    return all((d / f"{name}.gz").is_file() or (d / name).is_file() for name in RAW_FILES)


def fill_raw_from_debian(
    root: str | os.PathLike, debian_dir: str | os.PathLike = DEBIAN_DIR, verbose: bool = False
) -> bool:
    """Copy + gunzip the Debian idx files into ``ROOT/FashionMNIST/raw``; True when all four are then there.

    Files already present are kept. Returns False (changing nothing) when the Debian files are absent.
    """
    d, src = raw_dir(root), Path(debian_dir)
    missing = missing_raw_files(root)
    if not missing:
        return True
    if not debian_files_present(src):
        return False
    d.mkdir(parents=True, exist_ok=True)
    for name in missing:
        gz, plain, out = src / f"{name}.gz", src / name, d / name
        tmp = out.with_name(f".{name}.{os.getpid()}.tmp")
        try:
            if gz.is_file():
                with gzip.open(gz, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
                source = gz
            else:
                shutil.copyfile(plain, tmp)
                source = plain
            _check_idx(tmp, RAW_FILES[name])
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
        if verbose:
            print(f"  {source} -> {out}")
    return not missing_raw_files(root)
