"""Reading image files into one in-memory ``uint8`` tensor, with an on-disk ``.npy`` cache.

Decoding goes through Pillow once (threads: Pillow releases the GIL while decoding and resizing), with a
tqdm progress bar; the result is saved as ``.npy`` under a name that hashes the file list (relative path,
size, mtime) and the preprocessing, so a later run with the same files loads it in about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import MissingFileError

__all__ = [
    "IMAGE_EXTENSIONS",
    "cached_decode",
    "center_crop_resize",
    "decode_images",
    "list_images",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
_CACHE_VERSION = 1
_RESAMPLE = {"nearest": 0, "box": 4, "bilinear": 2, "hamming": 5, "bicubic": 3, "lanczos": 1}


def resample_filter(name: str) -> int:
    try:
        return _RESAMPLE[name.lower()]
    except KeyError:
        raise ValueError(f"unknown resample filter {name!r}; choose one of {sorted(_RESAMPLE)}") from None


def list_images(directory: str | os.PathLike) -> list[Path]:
    """All image files under ``directory`` (recursively, hidden entries skipped), sorted by relative path.

    Works for a class-folder tree (``dir/<class>/*.png``) and for a flat folder alike.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise MissingFileError(f"image directory not found: {root}")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / f)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    if not found:
        raise MissingFileError(
            f"no images found under {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return found


def center_crop_resize(img, image_size: int, channels: int, resample: str = "bilinear"):
    """Convert to RGB/L, center-crop to a square if needed, resize to ``image_size`` if needed."""
    img = img.convert("RGB" if channels == 3 else "L")
    w, h = img.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), resample=resample_filter(resample))
    return img


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def decode_images(
    paths: Sequence[Path],
    image_size: int,
    channels: int,
    transform: Callable | None = None,
    desc: str = "decoding",
    workers: int | None = None,
    resample: str = "bilinear",
) -> Tensor:
    """Decode ``paths`` into a ``uint8`` tensor [N, channels, image_size, image_size].

    ``transform(pil_image) -> pil_image`` replaces the default center-crop + resize; its output must be
    ``image_size`` square with the right mode.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    out = np.empty((len(paths), channels, image_size, image_size), dtype=np.uint8)

    def one(i: int) -> None:
        path = paths[i]
        try:
            with Image.open(path) as img:
                if transform is None:
                    img = center_crop_resize(img, image_size, channels, resample)
                else:
                    img = transform(img)
                a = np.asarray(img, dtype=np.uint8)
        except Exception as e:  # re-raised with the file name, as a user error (no traceback in the CLIs)
            from .common import DatasetNotAvailableError

            raise DatasetNotAvailableError(
                f"could not decode image {path} ({type(e).__name__}: {e}); the image folder must hold only "
                "readable images (png, jpg, ...): remove or convert that file"
            ) from None
        if a.ndim == 2:
            a = a[:, :, None]
        if a.shape != (image_size, image_size, channels):
            raise RuntimeError(
                f"{path}: decoded to shape {a.shape}, expected {(image_size, image_size, channels)}"
            )
        out[i] = a.transpose(2, 0, 1)

    workers = workers or _default_workers()
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=len(paths) < 2000, file=sys.stderr)
    with bar:
        if workers == 1:
            for i in range(len(paths)):
                one(i)
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(one, range(len(paths)), chunksize=64):
                    bar.update()
    return torch.from_numpy(out)


def file_list_digest(root: Path, paths: Sequence[Path], extra: dict) -> str:
    """Hash of the file list (relative path, size, mtime) and the preprocessing settings."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": _CACHE_VERSION, **extra}, sort_keys=True).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cached_decode(
    root: str | os.PathLike,
    paths: Sequence[Path],
    cache_dir: str | os.PathLike | None,
    tag: str,
    image_size: int,
    channels: int,
    transform: Callable | None = None,
    transform_id: str = "center_crop_resize",
    resample: str = "bilinear",
    workers: int | None = None,
) -> tuple[Tensor, Path | None]:
    """Decode ``paths`` (all under ``root``) once; reuse ``cache_dir/<tag>-<shape>-<hash>.npy`` afterwards.

    Returns the tensor and the cache file (None when caching is off, ``cache_dir=None``). A cache directory
    that cannot be written only costs a warning.
    """
    root = Path(root)
    cache_file = None
    if cache_dir is not None:
        digest = file_list_digest(
            root,
            paths,
            {"size": image_size, "channels": channels, "transform": transform_id, "resample": resample},
        )
        shape = f"{len(paths)}x{channels}x{image_size}x{image_size}"
        cache_file = Path(cache_dir).expanduser() / f"{tag}-{shape}-{digest}.npy"
        if cache_file.is_file():
            try:
                arr = np.load(cache_file)
                if arr.shape == (len(paths), channels, image_size, image_size) and arr.dtype == np.uint8:
                    return torch.from_numpy(arr), cache_file
            except (OSError, ValueError):
                pass  # corrupt or partial: decode again
    data = decode_images(
        paths,
        image_size,
        channels,
        transform=transform,
        desc=f"decoding {tag}",
        workers=workers,
        resample=resample,
    )
    if cache_file is not None:
        try:
            _save_npy_atomic(cache_file, data.numpy())
        except OSError as e:
            print(f"warning: could not write the image cache {cache_file}: {e}", file=sys.stderr)
            cache_file = None
    return data, cache_file
