"""One reverse step s <- t of every method (spec sections 3, 4 and 11): the pieces that ``sample``, ``nll_bpd``,
the head-method trajectory costs and :func:`reverse_moments` share, so a step has exactly one definition.

A model is a plain noise predictor ``eps_model(x_t, t) -> eps_hat`` or a head model ``model(x_t, t) -> (eps_hat,
head)`` computing both in one forward pass (t: long tensor [B] in 1..N; both outputs shaped like x_t). The head is in
our parameterisation (spec section 11): SN ``h ~ E[eps^2 | x_t]``, NPR ``g ~ E[(eps - eps_hat)^2 | x_t]``,
elementwise. Every function accepts either kind of model and uses eps_hat where it does not need the head.

The pieces, in the order of a step:
    predict_x0, reverse_mean     the mean of p(x_s | x_t), x_0 parameterisation (spec section 3)
    step_coefficients            lambda^2_{s|t} and c_{s|t} of the pair (variance.py; spec sections 2 and 4)
    posterior_cov                Chat(x_t) = (bbar_t / abar_t)(h - eps_hat^2) (SN) or (bbar_t / abar_t) g (NPR)
    clip_posterior_cov           avg_cov (mean over the pixels of each image), then clip to [0, ((b-a)/2)^2]
    clipped_posterior_cov        the two above in one call
    head_variance                sigma^2(x_t) = lambda^2 + c^2 clip(Chat(x_t)), per pixel
    pair_coefficients            the per-pair numbers of a step (:class:`StepCoefficients`)
    reverse_step                 (x0hat, mean, variance) of one step from one network output
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .methods import HEAD_KINDS, check_method, head_kind, needs_gamma
from .schedule import NoiseSchedule
from .validation import check_gamma, validate_trajectory
from .variance import (
    DataRange,
    forward_variance,
    half_range_sq,
    pair_variance,
    reverse_variance,
    sampling_clip_value,
    step_coefficients,
    trajectory_pairs,
)


# --------------------------------------------------------------------------------------------- model outputs
def split_output(out) -> tuple[Tensor, Tensor | None]:
    """``(eps_hat, head)`` of a model output: a plain tensor is ``(eps_hat, None)``; a pair is ``(eps_hat, head)``."""
    if isinstance(out, Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(o, Tensor) for o in out):
        return out[0], out[1]
    raise TypeError(
        "a model must return eps_hat (a tensor shaped like x_t) or a pair (eps_hat, head) of such tensors; got "
        f"{type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
    )


def head_required_error(method: str) -> ValueError:
    return ValueError(f"method {method} needs a head model: model(x_t, t) must return (eps_hat, head)")


def call_model(model: Callable, x_t: Tensor, t: Tensor, head_for: str | None = None) -> tuple[Tensor, Tensor | None]:
    """One network call: ``(eps_hat, head)`` as float32 (``head`` None for a plain noise predictor).

    ``head_for``: the name of a method that needs the head; a model without one then raises a ValueError.
    """
    try:
        out = model(x_t, t)
    except RuntimeError as e:  # a shape the network was not built for: say so instead of a kernel's dump
        text = str(e)
        if not any(w in text for w in ("size", "shape", "channels", "Expected", "match")):
            raise
        raise ValueError(f"the model cannot take inputs of shape {tuple(x_t.shape)} ({text.splitlines()[0][:200]}); "
                         "pass the (channels, height, width) it was trained on") from e
    eps_hat, head = split_output(out)
    if eps_hat.shape != x_t.shape:
        raise ValueError(f"the model returned eps of shape {tuple(eps_hat.shape)} for inputs of shape "
                         f"{tuple(x_t.shape)}; a noise predictor returns the shape it is given (a head model: "
                         "a pair (eps_hat, head) of that shape)")
    eps_hat = eps_hat.float()
    if head is not None:
        if head.shape != eps_hat.shape:
            raise ValueError(f"a head model must return eps_hat and head of the same shape; got "
                             f"{tuple(eps_hat.shape)} and {tuple(head.shape)}")
        head = head.float()
    elif head_for is not None:
        raise head_required_error(head_for)
    return eps_hat, head


def check_head_model(model, methods: Sequence[str]) -> None:
    """A model that says which head it has (``model.head_kind``) must match the head methods asked for."""
    have = getattr(model, "head_kind", None)
    if have is None:
        return
    for m in methods:
        want = head_kind(m)
        if want is not None and want != have:
            raise ValueError(
                f"method {m} needs an {want.upper()} head but the model's head is {have!r} (head_kind); "
                f"use the {have}_ddpm / {have}_ddim methods with this model"
            )


# --------------------------------------------------------------------------------------------- the mean
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


# --------------------------------------------------------------------------------------------- the head variance
def posterior_cov(kind: str, eps_hat: Tensor, head: Tensor, abar_t, bbar_t) -> Tensor:
    """Chat(x_t), the per-pixel estimate of Cov[x_0 | x_t] (spec section 11), unclipped.

    SN: (bbar_t / abar_t)(h - eps_hat^2); NPR: (bbar_t / abar_t) g. ``abar_t``, ``bbar_t``: numbers or tensors
    broadcastable against eps_hat (one value per image). Computed in the dtype of the inputs.
    """
    if kind == "sn":
        return (bbar_t / abar_t) * (head - eps_hat**2)
    if kind == "npr":
        return (bbar_t / abar_t) * head
    raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")


def clip_posterior_cov(chat: Tensor, data_range: DataRange, avg_cov: bool = False) -> Tensor:
    """clip(Chat, 0, ((b-a)/2)^2) per pixel; ``avg_cov`` first replaces Chat by its mean over the pixels of each
    image (shape [B, 1, ..., 1]), as the authors do (average, then clip). ``data_range=None``: lower clip only."""
    if avg_cov:
        chat = chat.mean(dim=tuple(range(1, chat.ndim)), keepdim=True)
    upper = half_range_sq(data_range)
    return chat.clamp(min=0.0, max=upper) if math.isfinite(upper) else chat.clamp(min=0.0)


def clipped_posterior_cov(kind: str, eps_hat: Tensor, head: Tensor, abar_t, bbar_t, data_range: DataRange,
                          avg_cov: bool = False) -> Tensor:
    """clip(Chat(x_t), 0, ((b-a)/2)^2) (after ``avg_cov``): the per-pixel Cov[x_0 | x_t] every head step uses."""
    return clip_posterior_cov(posterior_cov(kind, eps_hat, head, abar_t, bbar_t), data_range, avg_cov)


def head_variance(kind: str, eps_hat: Tensor, head: Tensor, abar_t, bbar_t, lam2, c, data_range: DataRange,
                  avg_cov: bool = False) -> Tensor:
    """sigma^2_{s|t}(x_t) = lambda^2_{s|t} + c_{s|t}^2 clip(Chat(x_t), 0, ((b-a)/2)^2) per pixel (spec section 11).

    At s = 0 (lambda^2 = 0, c = 1) this is clip(Chat): the method's own decoder variance."""
    return lam2 + c**2 * clipped_posterior_cov(kind, eps_hat, head, abar_t, bbar_t, data_range, avg_cov)


# --------------------------------------------------------------------------------------------- per-pair numbers
@dataclass(frozen=True)
class StepCoefficients:
    """The numbers of one step s <- t (Python floats: the elementwise work stays in the tensors' dtype).

    ``abar_*``, ``bbar_*``, ``beta_ts``, ``lam2_ddim`` feed the mean (spec section 3); ``lam2`` and ``c`` the head
    variance; ``sigma2`` is an isotropic method's variance (None for head methods); ``sigma2_max`` the sampling-only
    clip of the pair (tau_1, tau_2) for head methods (elementwise; None: no clip).
    """

    s: int
    t: int
    abar_s: float
    abar_t: float
    bbar_s: float
    bbar_t: float
    beta_ts: float
    lam2_ddim: float
    lam2: float
    c: float
    sigma2: float | None
    sigma2_max: float | None = None


def _coefficients(schedule: NoiseSchedule, s_idx: Tensor, t_idx: Tensor, method: str, eta: float,
                  sigma2: list[float] | None, sigma2_max: list[float | None] | None) -> list[StepCoefficients]:
    forward = check_method(method)
    abar = schedule.alphas_cumprod.tolist()
    bbar = schedule.bbar.tolist()
    beta_ts = schedule.beta_ts(s_idx, t_idx).tolist()
    lam2_ddim = forward_variance(schedule, s_idx, t_idx, "ddim", eta).tolist()
    lam2, c = (v.tolist() for v in step_coefficients(schedule, s_idx, t_idx, forward, eta))
    out = []
    for k, (s, t) in enumerate(zip(s_idx.tolist(), t_idx.tolist())):
        out.append(StepCoefficients(
            s=s, t=t, abar_s=abar[s], abar_t=abar[t], bbar_s=bbar[s], bbar_t=bbar[t], beta_ts=beta_ts[k],
            lam2_ddim=lam2_ddim[k], lam2=lam2[k], c=c[k], sigma2=None if sigma2 is None else sigma2[k],
            sigma2_max=None if sigma2_max is None else sigma2_max[k],
        ))
    return out


def pair_coefficients(schedule: NoiseSchedule, s: int, t: int, method: str, gamma: Tensor | None = None,
                      eta: float = 0.0, data_range: DataRange = (-1.0, 1.0)) -> StepCoefficients:
    """The numbers of the single step s <- t (0 <= s < t <= N) of ``method`` (gamma already validated)."""
    s_idx = torch.tensor([s], dtype=torch.long)
    t_idx = torch.tensor([t], dtype=torch.long)
    sigma2 = None
    if head_kind(method) is None:
        sigma2 = pair_variance(schedule, s_idx, t_idx, method, gamma, eta, data_range).tolist()
    return _coefficients(schedule, s_idx, t_idx, method, eta, sigma2, None)[0]


def trajectory_coefficients(schedule: NoiseSchedule, trajectory: Sequence[int], method: str,
                            gamma: Tensor | None = None, eta: float = 0.0, data_range: DataRange = (-1.0, 1.0),
                            clip_sigma_y: float | None = None) -> list[StepCoefficients]:
    """The numbers of every pair (tau_{k-1}, tau_k), k = 1..K (gamma already validated). ``clip_sigma_y`` is the
    sampling-only clip of the pair (tau_1, tau_2) (paper App. F.2): inside ``sigma2`` for isotropic methods (as
    :func:`~analytic_dpm.variance.reverse_variance` gives it), an elementwise ``sigma2_max`` for head methods."""
    taus = validate_trajectory(trajectory, schedule.N)
    s_idx, t_idx = trajectory_pairs(taus)
    if head_kind(method) is None:
        sigma2 = reverse_variance(schedule, taus, method, gamma, eta, data_range, clip_sigma_y).tolist()
        return _coefficients(schedule, s_idx, t_idx, method, eta, sigma2, None)
    sigma2_max: list[float | None] = [None] * len(taus)
    if clip_sigma_y is not None and len(taus) >= 2:
        if clip_sigma_y <= 0:
            raise ValueError(f"clip_sigma_y must be > 0 pixel levels, got {clip_sigma_y}")
        sigma2_max[1] = sampling_clip_value(clip_sigma_y)
    return _coefficients(schedule, s_idx, t_idx, method, eta, None, sigma2_max)


# --------------------------------------------------------------------------------------------- one step
def reverse_step(method: str, x_t: Tensor, eps_hat: Tensor, head: Tensor | None, co: StepCoefficients, *,
                 clip_range: DataRange, data_range: DataRange, avg_cov: bool = False):
    """``(x0hat, mean, variance)`` of the step co.s <- co.t from one network output.

    mean: spec section 3 (x0hat at s = 0). variance: the Python float ``co.sigma2`` for an isotropic method; for a
    head method the per-pixel tensor lambda^2 + c^2 clip(Chat) in eps_hat's dtype (shape [B, 1, ..., 1] with
    ``avg_cov``), clamped elementwise to ``co.sigma2_max`` when set.
    """
    forward = check_method(method)
    x0_hat = predict_x0(x_t, eps_hat, co.abar_t, co.bbar_t, clip_range)
    if co.s == 0:
        mean = x0_hat  # both means are x0hat at s = 0
    else:
        mean = reverse_mean(forward, x_t, x0_hat, eps_hat, co.abar_s, co.abar_t, co.bbar_s, co.bbar_t, co.beta_ts,
                            co.lam2_ddim)
    kind = head_kind(method)
    if kind is None:
        return x0_hat, mean, co.sigma2
    if head is None:
        raise head_required_error(method)
    variance = head_variance(kind, eps_hat, head, co.abar_t, co.bbar_t, co.lam2, co.c, data_range, avg_cov)
    if co.sigma2_max is not None:
        variance = variance.clamp(max=co.sigma2_max)
    return x0_hat, mean, variance


@torch.no_grad()
def reverse_moments(
    model: Callable,
    schedule: NoiseSchedule,
    x_t: Tensor,
    s: int,
    t: int,
    method: str,
    *,
    gamma: Tensor | None = None,
    eta: float = 0.0,
    clip_x0: bool = True,
    data_range: DataRange = (-1.0, 1.0),
    avg_cov: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(mean, variance)`` of p(x_s | x_t) for one step s <- t of any method (one network call).

    mean: spec section 3 (x0hat at s = 0; ``clip_x0`` clamps x0hat to ``data_range``). variance: for the isotropic
    methods a 0-d float64 tensor, the value :func:`~analytic_dpm.variance.reverse_variance` gives for the pair; for
    the head methods (spec section 11) a float32 tensor shaped like x_t, lambda^2 + c^2 clip(Chat(x_t)) per pixel
    (shape [B, 1, ..., 1] with ``avg_cov``). At s = 0 the variance is the formula's value (lambda^2 = 0, c = 1);
    samplers add no noise there. ``data_range=None``: unbounded data (no upper clip of Chat or U_t).
    """
    check_method(method)
    N = schedule.N
    try:
        s, t = operator.index(s), operator.index(t)  # Python, NumPy or 0-d integer tensor indices
    except TypeError:
        raise ValueError(f"s and t must be integer timesteps; got s = {s!r}, t = {t!r}") from None
    if not 0 <= s < t <= N:
        raise ValueError(f"a step needs integers 0 <= s < t <= N = {N}; got s = {s}, t = {t}")
    gamma = check_gamma(gamma, N, required=needs_gamma(method), what=f"method {method!r}")
    check_head_model(model, [method])
    co = pair_coefficients(schedule, s, t, method, gamma, eta, data_range)
    t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    eps_hat, head = call_model(model, x_t, t_batch, head_for=method if head_kind(method) else None)
    clip_range = data_range if clip_x0 else None
    _, mean, variance = reverse_step(method, x_t, eps_hat, head, co, clip_range=clip_range, data_range=data_range,
                                     avg_cov=avg_cov)
    if not isinstance(variance, Tensor):
        variance = torch.tensor(variance, dtype=torch.float64, device=x_t.device)
    return mean, variance
