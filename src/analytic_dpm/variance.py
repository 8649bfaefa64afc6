"""Reverse variances sigma^2_{s|t} of spec section 4 and the Theorem 2 bounds.

Every function works on index tensors ``s < t`` of any shape (the DP evaluates the whole
(N+1) x (N+1) grid at once); ``reverse_variance`` and ``variance_bounds`` are the public
entry points on a trajectory's pairs (tau_{k-1}, tau_k), k = 1..K, with tau_0 = 0.
The covariance-head methods (spec section 11) have a per-pixel variance that depends on x_t: their per-pair
pieces are lambda^2 and c (:func:`step_coefficients`); the state-dependent part is in ``moments.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .methods import check_forward, check_method, head_kind, needs_gamma
from .schedule import NoiseSchedule
from .validation import check_eta, check_gamma, validate_trajectory

DataRange = tuple[float, float] | None


def trajectory_pairs(trajectory: Sequence[int], device=None) -> tuple[Tensor, Tensor]:
    """(s, t) index tensors of the pairs (tau_{k-1}, tau_k), k = 1..K, with tau_0 = 0."""
    taus = torch.as_tensor(list(trajectory), dtype=torch.long, device=device)
    s = torch.cat([torch.zeros(1, dtype=torch.long, device=device), taus[:-1]])
    return s, taus


def forward_variance(schedule: NoiseSchedule, s, t, forward: str, eta: float = 0.0) -> Tensor:
    """lambda^2_{s|t} of the forward process (spec section 2): btilde (DDPM) or eta^2 btilde (DDIM); eta in [0, 1]."""
    check_forward(forward)
    eta = check_eta(eta)
    btilde = schedule.btilde(s, t)
    return btilde if forward == "ddpm" else (eta**2) * btilde


def step_coefficients(schedule: NoiseSchedule, s, t, forward: str, eta: float = 0.0) -> tuple[Tensor, Tensor]:
    """(lambda^2_{s|t}, c_{s|t}) of the forward process for index tensors s < t, float64 (spec sections 2, 4, 11).

    The variance of every Theorem-1-type method is lambda^2 + c^2 * (an estimate of Cov[x_0 | x_t]). DDPM forward:
    c = sqrt(abar_s) beta_{t|s} / bbar_t (the stable closed form of c, also the coefficient of x0hat in the mean);
    DDIM: c = sqrt(abar_s) - sqrt((bbar_s - lambda^2) abar_t / bbar_t).
    """
    lam2 = forward_variance(schedule, s, t, forward, eta)
    if forward == "ddpm":
        abar, bbar = schedule.alphas_cumprod, schedule.bbar
        s = torch.as_tensor(s, dtype=torch.long, device=bbar.device)
        t = torch.as_tensor(t, dtype=torch.long, device=bbar.device)
        return lam2, abar[s].sqrt() * schedule.beta_ts(s, t) / bbar[t]
    return lam2, mean_coefficient_c(schedule, s, t, lam2)


def reject_head_method(method: str, where: str) -> None:
    """A ValueError for a covariance-head method where only a per-pair (isotropic) variance makes sense."""
    if head_kind(method) is not None:
        raise ValueError(
            f"method {method!r} has a per-pixel variance that depends on x_t (spec section 11), so {where} has no "
            "value for it; use analytic_dpm.reverse_moments (or sample / nll_bpd) with a head model"
        )


def half_range_sq(data_range: DataRange) -> float:
    """((b - a) / 2)^2, the Theorem 2 upper clip of Cov[x_0 | x_t] for data in [a, b]; inf for unbounded data."""
    if data_range is None:
        return math.inf
    a, b = data_range
    if not b > a:
        raise ValueError(f"data_range must be (a, b) with a < b, got {data_range!r}")
    return ((b - a) / 2) ** 2


def posterior_cov_estimate(schedule: NoiseSchedule, t, gamma: Tensor, data_range: DataRange) -> Tensor:
    """U_t = (bbar_t / abar_t)(1 - gamma_t), clipped to [0, ((b-a)/2)^2] (Theorem 2; spec section 4).

    U_t estimates E tr Cov[x_0 | x_t] / d. The clip at 0 is what makes gamma_t > 1 harmless.
    """
    bbar, abar = schedule.bbar, schedule.alphas_cumprod
    t = torch.as_tensor(t, dtype=torch.long, device=bbar.device)
    gamma = gamma.to(bbar.device)
    U = bbar[t] / abar[t] * (1 - gamma[t])
    return U.clamp(min=0.0, max=half_range_sq(data_range))


def mean_coefficient_c(schedule: NoiseSchedule, s, t, lam2: Tensor) -> Tensor:
    """c_{s|t} = sqrt(abar_s) - sqrt((bbar_s - lambda^2) abar_t / bbar_t) (spec section 4)."""
    bbar, abar = schedule.bbar, schedule.alphas_cumprod
    s = torch.as_tensor(s, dtype=torch.long, device=bbar.device)
    t = torch.as_tensor(t, dtype=torch.long, device=bbar.device)
    return abar[s].sqrt() - ((bbar[s] - lam2).clamp(min=0) * abar[t] / bbar[t]).sqrt()


def pair_variance(
    schedule: NoiseSchedule,
    s,
    t,
    method: str,
    gamma: Tensor | None = None,
    eta: float = 0.0,
    data_range: DataRange = (-1.0, 1.0),
) -> Tensor:
    """sigma^2_{s|t} for index tensors s < t (no sampling-only clip). Gamma must already be validated.

    Isotropic methods only (a head method raises a ValueError: its variance depends on x_t)."""
    forward = check_method(method)
    reject_head_method(method, "pair_variance")
    if method == "ddpm_beta":
        return schedule.beta_ts(s, t)
    lam2 = forward_variance(schedule, s, t, forward, eta)
    if method in ("ddpm_beta_tilde", "ddim"):
        return lam2
    # analytic_ddpm / analytic_ddim: sigma^2 = lambda^2 + c^2 clip(U_t)   (Theorem 1 + Theorem 2)
    c = mean_coefficient_c(schedule, s, t, lam2)
    return lam2 + c**2 * posterior_cov_estimate(schedule, t, gamma, data_range)


def sampling_clip_value(y: float) -> float:
    """Paper App. F.2: sigma^2 <= (y * 2/255 * sqrt(pi/2))^2, i.e. E|sigma eps| <= y pixel levels."""
    return (y * 2.0 / 255.0 * math.sqrt(math.pi / 2)) ** 2


def reverse_variance(
    schedule: NoiseSchedule,
    trajectory: Sequence[int],
    method: str,
    gamma: Tensor | None = None,
    eta: float = 0.0,
    data_range: DataRange = (-1.0, 1.0),
    clip_sigma_y: float | None = None,
) -> Tensor:
    """sigma^2 for each pair (tau_{k-1}, tau_k), k = 1..K, as a float64 Tensor[K].

    ``data_range=None`` means unbounded data (no upper clip of U_t). ``clip_sigma_y`` applies the
    sampling-only clip of the pair (tau_1, tau_2) (never use it for likelihoods). Isotropic methods only.
    """
    check_method(method)
    reject_head_method(method, "reverse_variance")
    taus = validate_trajectory(trajectory, schedule.N)
    gamma = check_gamma(gamma, schedule.N, required=needs_gamma(method), what=f"method {method!r}")
    s, t = trajectory_pairs(taus, device=schedule.device)
    sigma2 = pair_variance(schedule, s, t, method, gamma, eta, data_range)
    if clip_sigma_y is not None and len(taus) >= 2:
        if clip_sigma_y <= 0:
            raise ValueError(f"clip_sigma_y must be > 0 pixel levels, got {clip_sigma_y}")
        sigma2 = sigma2.clone()
        sigma2[1] = sigma2[1].clamp(max=sampling_clip_value(clip_sigma_y))
    return sigma2


def variance_bounds(
    schedule: NoiseSchedule,
    trajectory: Sequence[int],
    forward: str,
    eta: float = 0.0,
    data_range: DataRange = (-1.0, 1.0),
) -> tuple[Tensor, Tensor]:
    """Theorem 2 bounds on the optimal sigma*^2 for each pair: (lower, upper), float64 Tensor[K] each.

    lower = lambda^2; upper = the tighter of lambda^2 + (sqrt(bbar_t / alpha_{t|s}) - sqrt(bbar_s - lambda^2))^2
    and, for data in [a, b]^d, lambda^2 + c_{s|t}^2 ((b - a)/2)^2.
    """
    check_forward(forward)
    taus = validate_trajectory(trajectory, schedule.N)
    s, t = trajectory_pairs(taus, device=schedule.device)
    bbar = schedule.bbar
    lam2 = forward_variance(schedule, s, t, forward, eta)
    upper = lam2 + ((bbar[t] / schedule.alpha_ts(s, t)).sqrt() - (bbar[s] - lam2).clamp(min=0).sqrt()) ** 2
    half_sq = half_range_sq(data_range)
    if math.isfinite(half_sq):
        c = mean_coefficient_c(schedule, s, t, lam2)
        upper = torch.minimum(upper, lam2 + c**2 * half_sq)
    return lam2, upper
