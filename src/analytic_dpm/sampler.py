"""Ancestral sampling on a trajectory for every method (spec sections 3, 7 and 11).

One pure function parameterised by the method name; the model is an argument. Each step is
:func:`~analytic_dpm.moments.reverse_step` (the same definition as :func:`~analytic_dpm.reverse_moments`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .gamma import model_device
from .methods import check_method, head_kind, needs_gamma
from .moments import call_model, check_head_model, predict_x0, reverse_mean, reverse_step, trajectory_coefficients
from .schedule import NoiseSchedule
from .validation import FiniteWatch, check_gamma, validate_trajectory
from .variance import DataRange

__all__ = ["predict_x0", "reverse_mean", "sample"]  # predict_x0 / reverse_mean live in moments.py


@torch.no_grad()
def sample(
    eps_model,
    schedule: NoiseSchedule,
    trajectory: Sequence[int],
    method: str,
    shape: Sequence[int],
    gamma: Tensor | None = None,
    eta: float = 0.0,
    clip_x0: bool = True,
    clip_sigma_y: float | None = None,
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    callback: Callable[[int, int, Tensor, Tensor], None] | None = None,
    *,
    data_range: DataRange = (-1.0, 1.0),
    device=None,
    progress: bool = False,
    avg_cov: bool = False,
) -> Tensor:
    """Draw ``shape[0]`` samples with K = len(trajectory) network calls each.

    x_{tau_K} ~ N(0, I) (or ``x_T``); for each pair (s, t) from the end: epshat = eps_model(x, t),
    x0hat and the DDPM or DDIM mean mu; x = mu + sigma_{s|t} z, with no noise at s = 0.
    ``clip_x0`` clamps x0hat to ``data_range`` (images: [-1, 1]); ``clip_sigma_y`` is the paper's
    App. F.2 clip of the pair (tau_1, tau_2). ``callback(k, t, x_s, x0hat)`` runs after each step.
    ``eps_model`` may be a head model ``(x_t, t) -> (eps_hat, head)``: the head methods (sn_ddpm, npr_ddpm, sn_ddim,
    npr_ddim; spec section 11) need one and draw with a per-pixel sigma(x_t) (``avg_cov``: one value per image;
    ``clip_sigma_y`` clamps it elementwise); every other method uses its eps_hat.
    A network output that is NaN or inf raises :class:`~analytic_dpm.validation.NonFiniteOutputError` naming the
    first step and timestep where it appeared (tracked on the device: one host synchronisation per call).
    """
    check_method(method)
    kind = head_kind(method)
    taus = validate_trajectory(trajectory, schedule.N)
    gamma = check_gamma(gamma, schedule.N, required=needs_gamma(method), what=f"method {method!r}")
    check_head_model(eps_model, [method])
    steps = trajectory_coefficients(schedule, taus, method, gamma, eta, data_range, clip_sigma_y)
    device = torch.device(device) if device is not None else (
        x_T.device if x_T is not None else model_device(eps_model)
    )
    gen_device = generator.device if generator is not None else device
    clip_range = data_range if clip_x0 else None

    if x_T is None:
        x = torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)
    else:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)} was requested")
        x = x_T.to(device=device, dtype=torch.float32)

    watch = FiniteWatch("sample", device, sentinel=schedule.N + 1)  # NaN/inf network outputs, checked once
    for k in tqdm(range(len(taus), 0, -1), desc=f"sampling {method}", disable=not progress, leave=False):
        co = steps[k - 1]
        t = co.t
        t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        eps_hat, head = call_model(eps_model, x, t_batch, head_for=method if kind else None)
        watch.observe(eps_hat, t, step=len(taus) - k + 1)
        if kind is not None:
            watch.observe(head, t, step=len(taus) - k + 1)
        x0_hat, mu, sigma2 = reverse_step(method, x, eps_hat, head, co, clip_range=clip_range, data_range=data_range,
                                          avg_cov=avg_cov)
        if co.s == 0:
            x = x0_hat  # both means are x0hat at s = 0 and no noise is added
        else:
            z = torch.randn(x.shape, generator=generator, device=gen_device).to(device)
            scale = sigma2.sqrt() if isinstance(sigma2, Tensor) else sigma2**0.5  # per pixel (heads) or one number
            x = mu + scale * z
        if callback is not None:
            callback(k, t, x, x0_hat)
    watch.check(total_steps=len(taus))
    return x
