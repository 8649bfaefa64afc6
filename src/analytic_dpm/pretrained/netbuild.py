"""Building our UNet for foreign weights: on the meta device first (no memory, no init), then filled in place."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..nets.heads import HeadUNet
from ..nets.unet import UNet
from .base import PretrainedError

__all__ = ["materialize", "meta_head_unet", "meta_unet"]


def meta_unet(what: str, **kwargs) -> UNet:
    """``UNet(**kwargs)`` on the meta device; an impossible configuration becomes a :class:`PretrainedError`."""
    try:
        with torch.device("meta"):
            return UNet(**kwargs)
    except ValueError as exc:
        raise PretrainedError(f"the {what} options describe no valid network: {exc}") from exc


def meta_head_unet(unet: UNet, head: Mapping[str, str], *, eps_channels: int, zero_init: bool) -> HeadUNet:
    """``HeadUNet`` (on the meta device) of the meta-device backbone ``unet`` for parsed head flags ``head``."""
    with torch.device("meta"):
        return HeadUNet(unet, head["head_kind"], head["mode"], eps_channels=eps_channels, zero_init=zero_init)


def materialize(unet: nn.Module, state_dict: Mapping[str, Tensor], device) -> nn.Module:
    """Give the meta-device ``unet`` (a UNet or a HeadUNet) the tensors of ``state_dict`` (complete, float32),
    move it, set eval mode."""
    unet.load_state_dict(dict(state_dict), strict=True, assign=True)
    leftover = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.device.type == "meta"]
    if leftover:  # pragma: no cover - the UNet has no buffers and the state dict is complete
        raise RuntimeError(f"tensors left on the meta device: {leftover[:5]}")
    return unet.to(device).eval()
