"""Ancestral sampling on a trajectory for all five methods (spec sections 3 and 7).

One pure function parameterised by the method name; the model is an argument.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .gamma import model_device
from .methods import check_method, needs_gamma
from .schedule import NoiseSchedule
from .validation import FiniteWatch, check_gamma, validate_trajectory
from .variance import DataRange, forward_variance, reverse_variance, trajectory_pairs


def predict_x0(x_t: Tensor, eps_hat: Tensor, abar_t, bbar_t, clip_range: DataRange) -> Tensor:
    """x0hat = (x_t - sqrt(bbar_t) epshat) / sqrt(abar_t), clamped to the data range when given (spec 3)."""
    x0 = (x_t - bbar_t**0.5 * eps_hat) / abar_t**0.5
    return x0.clamp(*clip_range) if clip_range is not None else x0


def reverse_mean(forward: str, x_t: Tensor, x0_hat: Tensor, eps_hat: Tensor, abar_s: float, abar_t: float,
                 bbar_s: float, bbar_t: float, beta_ts: float, lam2_ddim: float) -> Tensor:
    """The mean mu of p(x_s | x_t) for s >= 1 (spec section 3), for the DDPM or the DDIM forward process."""
    if forward == "ddpm":
        # mu = sqrt(abar_s) beta_{t|s} / bbar_t x0hat + sqrt(alpha_{t|s}) bbar_s / bbar_t x_t
        alpha_ts = abar_t / abar_s
        return (abar_s**0.5 * beta_ts / bbar_t) * x0_hat + (alpha_ts**0.5 * bbar_s / bbar_t) * x_t
    # mu = sqrt(abar_s) x0hat + sqrt(bbar_s - lambda^2) epshat   (raw epshat)
    return abar_s**0.5 * x0_hat + max(bbar_s - lam2_ddim, 0.0) ** 0.5 * eps_hat


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
) -> Tensor:
    """Draw ``shape[0]`` samples with K = len(trajectory) network calls each.

    x_{tau_K} ~ N(0, I) (or ``x_T``); for each pair (s, t) from the end: epshat = eps_model(x, t),
    x0hat and the DDPM or DDIM mean mu; x = mu + sigma_{s|t} z, with no noise at s = 0.
    ``clip_x0`` clamps x0hat to ``data_range`` (images: [-1, 1]); ``clip_sigma_y`` is the paper's
    App. F.2 clip of the pair (tau_1, tau_2). ``callback(k, t, x_s, x0hat)`` runs after each step.
    A network output that is NaN or inf raises :class:`~analytic_dpm.validation.NonFiniteOutputError` naming the
    first step and timestep where it appeared (tracked on the device: one host synchronisation per call).
    """
    forward = check_method(method)
    taus = validate_trajectory(trajectory, schedule.N)
    gamma = check_gamma(gamma, schedule.N, required=needs_gamma(method), what=f"method {method!r}")
    sigma2 = reverse_variance(schedule, taus, method, gamma, eta, data_range, clip_sigma_y).tolist()
    device = torch.device(device) if device is not None else (
        x_T.device if x_T is not None else model_device(eps_model)
    )
    gen_device = generator.device if generator is not None else device
    abar = schedule.alphas_cumprod.tolist()
    bbar = schedule.bbar.tolist()
    clip_range = data_range if clip_x0 else None

    if x_T is None:
        x = torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)
    else:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape={tuple(shape)} was requested")
        x = x_T.to(device=device, dtype=torch.float32)

    s_idx, t_idx = trajectory_pairs(taus)
    beta_ts = schedule.beta_ts(s_idx, t_idx).tolist()  # per-pair coefficients, computed once
    lam2_ddim = forward_variance(schedule, s_idx, t_idx, "ddim", eta).tolist()
    watch = FiniteWatch("sample", device, sentinel=schedule.N + 1)  # NaN/inf network outputs, checked once
    for k in tqdm(range(len(taus), 0, -1), desc=f"sampling {method}", disable=not progress, leave=False):
        s, t = int(s_idx[k - 1]), taus[k - 1]
        t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        eps_hat = eps_model(x, t_batch).float()
        watch.observe(eps_hat, t, step=len(taus) - k + 1)
        x0_hat = predict_x0(x, eps_hat, abar[t], bbar[t], clip_range)
        if s == 0:
            x = x0_hat  # both means are x0hat at s = 0 and no noise is added
        else:
            mu = reverse_mean(forward, x, x0_hat, eps_hat, abar[s], abar[t], bbar[s], bbar[t], beta_ts[k - 1],
                              lam2_ddim[k - 1])
            z = torch.randn(x.shape, generator=generator, device=gen_device).to(device)
            x = mu + sigma2[k - 1] ** 0.5 * z
        if callback is not None:
            callback(k, t, x, x0_hat)
    watch.check(total_steps=len(taus))
    return x
