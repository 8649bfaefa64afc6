"""Analytic-DPM for pretrained noise predictors of other projects (no retraining).

    from analytic_dpm import pretrained
    m = pretrained.load("improved_diffusion", "cifar10_uncond_50M_500K.pt", image_size=32, num_channels=128, ...)
    m.eps_model(x, t)    # our convention: integer t in 1..N, images in [-1, 1]
    m.schedule           # the model's own betas as a float64 NoiseSchedule

Kinds (each a module of this package with ``load(source, *, device, **options)``):

- ``diffusers``: a diffusers UNet2DModel + scheduler config (pipeline directory, flat directory or hub id).
- ``improved_diffusion``: an openai/improved-diffusion state dict with that project's flags; also the official
  Analytic-DPM CIFAR-10 checkpoints (their dict layout, no t - 1 shift).
- ``ddpm``: the DDPM/DDIM ``Model`` format (pesser/pytorch_diffusion conversions, ermongroup/ddim checkpoints).

The kind is chosen from this fixed table, never from anything read from a file.

Covariance-head models (SN-DPM / NPR-DPM, baofff/Extended-Analytic-DPM's released ones): the ``improved_diffusion``
and ``ddpm`` kinds take their flags ``method`` (``pred_eps_eps2_pretrained`` | ``pred_eps_epsc_pretrained``) and
``mode`` (``simple`` | ``complex``); the result then has ``head_model(x_t, t) -> (eps_hat, head)`` (see
:mod:`.heads`), and ``eps_model`` is the backbone alone.
"""

from __future__ import annotations

import importlib

from .base import EpsAdapter, PretrainedError, PretrainedModel, file_sha256

__all__ = ["KINDS", "EpsAdapter", "PretrainedError", "PretrainedModel", "file_sha256", "load"]

#: kind -> module of this package that implements it (an allow list: nothing else is ever imported)
KINDS: dict[str, str] = {
    "diffusers": "diffusers_format",
    "improved_diffusion": "improved_diffusion",
    "ddpm": "ddpm",
}


def load(kind: str, source, *, device="cpu", **options) -> PretrainedModel:
    """Load a pretrained noise predictor of format ``kind`` from ``source``; see the module docstring."""
    if kind not in KINDS:
        raise PretrainedError(f"unknown pretrained kind {kind!r}; choose one of {', '.join(KINDS)}")
    module = importlib.import_module(f".{KINDS[kind]}", __name__)
    return module.load(source, device=device, **options)
