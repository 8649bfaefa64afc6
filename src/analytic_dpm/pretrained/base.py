"""What every pretrained-format adapter returns, and the wrapper that puts a foreign network in our convention.

Our convention (spec section 0): ``eps_model(x_t, t)`` with integer ``t`` in 1..N (index 0 = data) and images in
[-1, 1], returning epsilon with the shape of ``x_t``. Each format feeds its network a different timestep
(``t - 1``, times ``1000 / N``, or ``t`` itself) and may output more channels (a learned variance): the
:class:`EpsAdapter` applies the format's own rule, so the core never sees the difference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..identity import file_sha256  # re-exported: the identity of a weights file
from ..schedule import NoiseSchedule

__all__ = ["EpsAdapter", "PretrainedError", "PretrainedModel", "file_sha256"]


class PretrainedError(UserError, ValueError):
    """A pretrained source cannot be used as given; the message says what to do."""


class EpsAdapter(nn.Module):
    """``eps_model(x, t)`` in our convention around a network ``net`` of another format.

    Args:
        net: the foreign network; called as ``net(x, t_in)``.
        t_offset: added to our integer t before anything else (-1 for the usual t - 1 shift, 0 for none).
        t_scale: multiplies the shifted timestep (improved-diffusion's ``rescale_timesteps``: 1000 / N); when it
            is 1 the network gets an integer (long) tensor, else float32.
        eps_channels: keep the first ``eps_channels`` output channels (learned-variance networks output 2C).
        output: ``callable(raw_output) -> Tensor`` for networks that return a structure (diffusers: ``.sample``).
    """

    def __init__(self, net: nn.Module, *, t_offset: int, t_scale: float = 1.0, eps_channels: int | None = None,
                 output: Callable[[Any], Tensor] | None = None):
        super().__init__()
        self.net = net
        self.t_offset = int(t_offset)
        self.t_scale = float(t_scale)
        self.eps_channels = eps_channels
        self._output = output

    def network_timestep(self, t: Tensor) -> Tensor:
        """The timestep the wrapped network is fed for our integer ``t`` (1..N)."""
        t = torch.as_tensor(t).long() + self.t_offset
        return t if self.t_scale == 1.0 else t.float() * self.t_scale

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.net(x, self.network_timestep(t))
        if self._output is not None:
            out = self._output(out)
        if self.eps_channels is not None and out.shape[1] != self.eps_channels:
            out = out[:, : self.eps_channels]
        return out


@dataclass
class PretrainedModel:
    """A loaded pretrained noise predictor, ready for ``estimate_gamma`` / ``sample`` / ``nll_bpd``.

    Attributes:
        eps_model: our convention (module docstring); eval mode, on the requested device.
        schedule: the model's own forward process, rebuilt in float64 from the format's formula.
        image_size, channels: the images it was trained on (square, ``channels`` x ``image_size`` x ``image_size``).
        kind: the format (``diffusers``, ``improved_diffusion``, ``ddpm``, ``analytic_dpm_official``).
        source: the path (or hub id) it was loaded from.
        options: the completed options actually used (the user's flags plus the format's defaults).
        identity: JSON-able facts that identify the network for result rows (kind, weights sha256, options).
        timestep_convention: one line saying what the network is fed (e.g. ``"t - 1"``, ``"(t - 1) * 1000 / N"``).
        head_model: for a covariance-head model (SN / NPR-DPM, loaded with ``method=...``): ``head_model(x_t, t)
            -> (eps_hat, head)`` in our convention, one network forward, with ``head_kind`` (``"sn"``: head = h ~
            E[eps^2|x_t]; ``"npr"``: head = g ~ E[(eps - eps_hat)^2|x_t]) and ``eps_model`` (the same as
            ``eps_model`` above); None for a plain noise predictor.
    """

    eps_model: nn.Module
    schedule: NoiseSchedule
    image_size: int
    channels: int
    kind: str
    source: str
    options: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    timestep_convention: str = ""
    head_model: nn.Module | None = None

    @property
    def path(self) -> Path:
        return Path(self.source)
