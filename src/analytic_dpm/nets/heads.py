"""Covariance heads on the noise-prediction UNet: SN-DPM and NPR-DPM (spec section 11).

A head is a second output branch of the UNet that reads the last decoder feature map ``h`` (the input of the
output GroupNorm) and the time embedding, so one backbone forward gives both eps_hat(x_t) and the head:

* SN ("squared noise"): the head is h(x_t) ~ E[eps^2 | x_t] elementwise;
* NPR ("noise prediction residual"): the head is g(x_t) ~ E[(eps - eps_hat(x_t))^2 | x_t] elementwise.

Architecture (baofff/Extended-Analytic-DPM, ``libs/iddpm/customized.py`` ``UNetModel4Pretrained.out2`` and
``libs/ddpm/customized.py`` ``Model4Pretrained``), ``mode``:

* ``"simple"``: GroupNorm(32) -> SiLU -> 3x3 conv to C channels;
* ``"complex"``: a time-conditioned ResBlock (same channels, the backbone's ResBlock options) first.

The conv is zero-initialised in the improved-diffusion variant (``zero_init=True``), PyTorch's default init in the
DDPM ``Model`` variant. The head's raw conv output IS h (SN) or g (NPR): the authors regress it directly on eps^2
and on stopgrad(eps - eps_hat)^2 (``core/criterions/ddpm.py`` ``dt_dsdm`` / ``dt_dsdm_err``) and use it as is in
``core/diffusion/dtdpm.py`` ``_predict_cov_x0`` (no square, no softplus; negative values are removed by the clip
of Chat at 0). So the map from the raw output to h / g is the identity, for both kinds.

Parameter layout (``HeadUNet``): ``unet.*`` (the backbone, unchanged) and ``head.{i}.*`` in the order of the list
above (simple: 0 GroupNorm, 1 SiLU, 2 conv; complex: 0 ResBlock, 1 GroupNorm, 2 SiLU, 3 conv), the same indices
as the authors' iDDPM ``out2``; ``analytic_dpm.pretrained.unet_mapping`` maps both of their formats onto it.
"""

from __future__ import annotations

import torch
from torch import nn

from analytic_dpm.nets.unet import ResBlock, TimestepSequential, UNet, group_norm, zero_module

__all__ = ["HEAD_KINDS", "HEAD_MODES", "CovarianceHead", "HeadUNet"]

HEAD_MODES = ("simple", "complex")
HEAD_KINDS = ("sn", "npr")


class CovarianceHead(TimestepSequential):
    """``[ResBlock ->] GroupNorm -> SiLU -> conv3x3`` from the decoder's last feature map to ``out_channels``.

    Args:
        channels: channels of the feature map it reads (``base_channels * channel_mult[0]``).
        out_channels: image channels C (one head value per pixel and channel).
        emb_channels: width of the time embedding (``4 * base_channels``); used by the complex ResBlock.
        mode: ``"simple"`` or ``"complex"`` (module docstring).
        dropout, use_scale_shift_norm, emb_act, norm_eps: the complex ResBlock's options (the backbone's own).
        zero_init: zero-initialise the output conv (the improved-diffusion variant).
    """

    def __init__(self, channels: int, out_channels: int, emb_channels: int, mode: str = "simple", *,
                 dropout: float = 0.0, use_scale_shift_norm: bool = False, emb_act: bool = True,
                 norm_eps: float = 1e-5, zero_init: bool = True):
        if mode not in HEAD_MODES:
            raise ValueError(f"unknown covariance head mode {mode!r}; choose one of {', '.join(HEAD_MODES)}")
        layers: list[nn.Module] = []
        if mode == "complex":
            layers.append(ResBlock(channels, emb_channels, dropout, use_scale_shift_norm=use_scale_shift_norm,
                                   emb_act=emb_act, norm_eps=norm_eps))
        conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        layers += [group_norm(channels, norm_eps), nn.SiLU(), zero_module(conv) if zero_init else conv]
        super().__init__(*layers)
        self.mode = mode


class HeadUNet(nn.Module):
    """A UNet with a covariance head: ``model(x, t) -> (eps_hat, head)`` in ONE backbone forward.

    ``t`` is fed to the backbone as given (a model trained here takes t in 1..N; the pretrained adapters put
    other networks in that convention). ``head`` is h (SN) or g (NPR), see the module docstring.

    Args:
        unet: the backbone noise predictor (kept as ``self.unet``; its function is unchanged).
        head_kind: ``"sn"`` or ``"npr"``: what the head estimates.
        mode: ``"simple"`` or ``"complex"`` head architecture.
        eps_channels: channels of eps_hat (default: the backbone's input channels; a learned-variance backbone
            outputs 2C channels and eps_hat is the first C).
        zero_init: zero-initialise the head's output conv (default; the improved-diffusion variant).

    Training a head on a frozen noise predictor (spec section 11): :meth:`freeze_backbone`, then optimise
    :meth:`head_parameters` only.
    """

    def __init__(self, unet: UNet, head_kind: str, mode: str = "simple", *, eps_channels: int | None = None,
                 zero_init: bool = True):
        super().__init__()
        if head_kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {head_kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        self.unet = unet
        self.head_kind = head_kind
        self.mode = mode
        self.eps_channels = int(eps_channels or unet.in_channels)
        if not 1 <= self.eps_channels <= unet.out_channels:
            raise ValueError(f"eps_channels={self.eps_channels} but the backbone outputs {unet.out_channels} channels")
        self.head = CovarianceHead(
            unet.base_channels * unet.channel_mult[0], unet.in_channels, 4 * unet.base_channels, mode,
            dropout=unet.dropout, use_scale_shift_norm=unet.use_scale_shift_norm, emb_act=unet.emb_act,
            norm_eps=unet.norm_eps, zero_init=zero_init,
        )  # fmt: skip

    @property
    def eps_model(self) -> UNet:
        """The backbone noise predictor, exactly as it was (one output; the same parameters)."""
        return self.unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, emb = self.unet.features(x, t)  # the decoder's last feature map, before the output GroupNorm
        eps = self.unet.out(h)[:, : self.eps_channels].to(x.dtype)
        head = self.head(h, emb).to(x.dtype)  # raw conv output = h (SN) or g (NPR): the identity map
        return eps, head

    def freeze_backbone(self) -> HeadUNet:
        """Stop gradients to the backbone (``requires_grad=False`` on its parameters); returns ``self``.

        Train / eval mode is left to the caller: the authors train the head with the whole network in train mode
        (the backbone's dropout active), which changes eps_hat during training but not the frozen weights.
        """
        self.unet.requires_grad_(False)
        return self

    def head_parameters(self):
        """The parameters a head-only trainer optimises."""
        return self.head.parameters()
