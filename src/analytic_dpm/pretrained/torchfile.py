"""Reading another project's weights file safely (``weights_only``: a file can hold data, never code)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ..files import safe_torch_load
from .base import PretrainedError

__all__ = ["is_state_dict", "read_weights"]


def read_weights(source: str | os.PathLike, what: str) -> tuple[Path, Any]:
    """``torch.load(source, weights_only=True)`` on the CPU, with clear errors for a missing or unreadable file."""
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise PretrainedError(f"{what} weights file {str(path)!r} does not exist; pass the path of the downloaded file")
    if path.is_dir():
        raise PretrainedError(f"{what} expects a weights file, but {str(path)!r} is a directory; pass the file itself")
    try:
        obj = safe_torch_load(path, what=f"{what} weights file")
    except ValueError as exc:
        raise PretrainedError(
            f"cannot read {str(path)!r} with torch.load(weights_only=True): {exc} Files are loaded without running "
            "any code they may contain; re-save the weights as a plain state dict (a dict of tensors)."
        ) from exc
    return path, obj


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of string keys to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )
