"""Pixel <-> model space (spec section 0): image level k in {0..255} is 2 (k / 255) - 1 in [-1, 1]."""

from __future__ import annotations

import torch
from torch import Tensor


def to_model_space(x: Tensor) -> Tensor:
    """Map a batch to the space the model works in.

    ``uint8`` images ``k`` become ``float32`` ``2 * (k / 255) - 1`` (0 -> -1 and 255 -> 1 exactly);
    floating tensors (synthetic data, already converted images) are returned unchanged.
    """
    if x.dtype == torch.uint8:
        # k / 127.5 - 1 is 2 * (k / 255) - 1; 127.5 is exact in binary so both ends are exact.
        return x.to(torch.float32).div_(127.5).sub_(1.0)
    if x.is_floating_point():
        return x
    raise TypeError(f"to_model_space expects uint8 images or a floating tensor, got dtype {x.dtype}")


def from_model_space(x: Tensor) -> Tensor:
    """Inverse of :func:`to_model_space` for images: float in [-1, 1] -> uint8 ``round((x + 1) * 127.5)``,
    clamped (the same quantisation as saving a PNG)."""
    return ((x.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
