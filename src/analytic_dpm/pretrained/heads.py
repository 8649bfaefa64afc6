"""The authors' released SN-DPM / NPR-DPM models (baofff/Extended-Analytic-DPM): flags, wrapper and file checks.

Their released models are plain state dicts of an improved-diffusion ``UNetModel4Pretrained`` or a DDPM
``Model4Pretrained``: the noise predictor they started from (its keys unchanged) plus a covariance head
(:mod:`analytic_dpm.nets.heads`). Their flags, taken by the ``improved_diffusion`` and ``ddpm`` loaders:

- ``method``: ``pred_eps_eps2_pretrained`` (SN: the head is h ~ E[eps^2 | x_t]) or ``pred_eps_epsc_pretrained``
  (NPR: the head is g ~ E[(eps - eps_hat)^2 | x_t]); None (default): a plain noise predictor, loaded as before.
- ``mode``: the head architecture, ``simple`` (their default) or ``complex``; only with ``method``.

With ``method`` the loaded :class:`~analytic_dpm.pretrained.PretrainedModel` has ``head_model`` (a
:class:`HeadAdapter`: ``head_model(x_t, t) -> (eps_hat, head)`` in our timestep convention, one network forward)
and ``eps_model``, the backbone alone, the same function as the plain load of the backbone's weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..nets.heads import HEAD_MODES, HeadUNet
from .base import EpsAdapter, PretrainedError

__all__ = ["HEAD_METHODS", "HeadAdapter", "head_hints", "parse_head_options"]

#: the authors' ``method`` flag -> what the head estimates (``HeadUNet.head_kind``)
HEAD_METHODS: dict[str, str] = {"pred_eps_eps2_pretrained": "sn", "pred_eps_epsc_pretrained": "npr"}
DEFAULT_MODE = "simple"  # their configs: hparams.get('mode', 'simple')


def parse_head_options(method: Any, mode: Any) -> dict[str, str] | None:
    """``{"method", "mode", "head_kind"}`` for the authors' flags, or None without ``method`` (a plain model)."""
    if method is None:
        if mode is not None:
            raise PretrainedError(
                f"mode={mode!r} is the covariance head's architecture and needs method=pred_eps_eps2_pretrained "
                "(SN-DPM) or method=pred_eps_epsc_pretrained (NPR-DPM); drop mode for a plain noise predictor"
            )
        return None
    if not isinstance(method, str) or method not in HEAD_METHODS:
        raise PretrainedError(
            f"unknown method {method!r}; the released covariance-head models use method=pred_eps_eps2_pretrained "
            "(SN-DPM) or method=pred_eps_epsc_pretrained (NPR-DPM); leave it unset for a plain noise predictor"
        )
    mode = DEFAULT_MODE if mode is None else mode
    if not isinstance(mode, str) or mode not in HEAD_MODES:
        raise PretrainedError(f"unknown covariance head mode {mode!r}; choose one of {', '.join(HEAD_MODES)}")
    return {"method": method, "mode": mode, "head_kind": HEAD_METHODS[method]}


def head_hints(keys: Iterable[str], head: Mapping[str, str] | None, prefixes: tuple[str, ...],
               complex_prefix: str) -> list[str]:
    """What the head flags probably should be, judging by the head keys present in a state dict."""
    head_keys = [k for k in keys if k.startswith(prefixes)]
    if head is None:
        if head_keys:
            return [f"no method given, but the file holds a covariance head ({head_keys[0]}, ...): pass "
                    "method=pred_eps_eps2_pretrained (SN-DPM) or method=pred_eps_epsc_pretrained (NPR-DPM), and mode"]
        return []
    if not head_keys:
        return [f"method={head['method']!r}, but the file holds no covariance head (no {'/'.join(prefixes)} keys): "
                "drop method to load it as a plain noise predictor"]
    found = "complex" if any(k.startswith(complex_prefix) for k in head_keys) else "simple"
    if found != head["mode"]:
        return [f"mode={head['mode']!r} (the weights look like mode={found!r})"]
    return []


class HeadAdapter(EpsAdapter):
    """``head_model(x, t) -> (eps_hat, head)`` in our convention around a :class:`~analytic_dpm.nets.HeadUNet`.

    The timestep rule is :class:`EpsAdapter`'s (``t_offset``, ``t_scale``); ``head`` is h (SN) or g (NPR) as the
    network outputs it (the identity map: see :mod:`analytic_dpm.nets.heads`). Attributes: ``head_kind``
    (``"sn"`` / ``"npr"``), ``mode``, and ``eps_model``, an :class:`EpsAdapter` of the backbone alone with the same
    timestep rule (the same parameters).
    """

    def __init__(self, net: HeadUNet, *, t_offset: int, t_scale: float = 1.0):
        super().__init__(net, t_offset=t_offset, t_scale=t_scale)
        self.head_kind = net.head_kind
        self.mode = net.mode
        self.eps_model = EpsAdapter(net.unet, t_offset=t_offset, t_scale=t_scale, eps_channels=net.eps_channels)

    def forward(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.net(x, self.network_timestep(t))
