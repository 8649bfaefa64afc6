"""Input checks shared by the pure functions: each raises a ValueError that says what to fix."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor


def validate_trajectory(trajectory: Sequence[int] | Tensor, N: int) -> list[int]:
    """A trajectory is 1 <= tau_1 < ... < tau_K <= N (spec section 2); returns it as a list of ints."""
    if isinstance(trajectory, Tensor):
        trajectory = trajectory.tolist()
    try:
        taus = [int(t) for t in trajectory]
    except (TypeError, ValueError) as e:
        raise ValueError(f"a trajectory must be a sequence of integer timesteps, got {trajectory!r}") from e
    if any(int(t) != t for t in trajectory):
        raise ValueError(f"trajectory timesteps must be integers, got {list(trajectory)!r}")
    if len(taus) == 0:
        raise ValueError("a trajectory needs at least one timestep (K >= 1)")
    if min(taus) < 1 or max(taus) > N:
        raise ValueError(f"trajectory timesteps must lie in 1..N = 1..{N}; got min {min(taus)}, max {max(taus)}")
    for a, b in zip(taus, taus[1:]):
        if b <= a:
            raise ValueError(f"a trajectory must be strictly increasing; found {a} followed by {b}")
    return taus


def check_gamma(gamma: Tensor | None, N: int, *, required: bool = True, what: str = "this method") -> Tensor | None:
    """Gamma is the length-(N+1) vector of spec section 5 (gamma_0 = 0); returned as float64."""
    if gamma is None:
        if required:
            raise ValueError(
                f"{what} needs gamma (the length-(N+1) vector from analytic_dpm.estimate_gamma or a "
                "calibrated checkpoint)"
            )
        return None
    gamma = torch.as_tensor(gamma)
    if gamma.ndim != 1 or gamma.numel() != N + 1:
        raise ValueError(
            f"gamma must be a 1-D vector of length N+1 = {N + 1} (index 0 = data); got shape {tuple(gamma.shape)}"
        )
    if not gamma.is_floating_point():
        gamma = gamma.to(torch.float64)
    if torch.isnan(gamma).any():
        bad = torch.nonzero(torch.isnan(gamma)).flatten()[:5].tolist()
        raise ValueError(f"gamma contains NaN at timesteps {bad}: recalibrate (estimate_gamma)")
    if torch.isinf(gamma[1:]).any() or (gamma[1:] < 0).any():
        raise ValueError("gamma_n is a mean square and must be finite and >= 0 for n >= 1")
    gamma = gamma.to(torch.float64)
    if N >= 1 and float((gamma[1:] > 1.0).double().mean()) > 0.5:
        warnings.warn(GammaWarning(
            f"gamma exceeds 1 on {100 * float((gamma[1:] > 1.0).double().mean()):.0f}% of the timesteps; a trained "
            "noise predictor keeps E||eps_hat||^2/d <= 1 (analytic_dpm.gamma.gamma_warnings lists the likely causes)"),
            stacklevel=3)
    return gamma


def as_int(value, what: str) -> int:
    """An integer given as any integral type (Python, numpy, a 0-d integer tensor); ``ValueError`` naming ``what``
    for anything else (a bool, 10.5, "10")."""
    if isinstance(value, bool) or isinstance(value, (float, str, bytes)):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise ValueError(f"{what} must be an integer, got {value!r}")
        return int(value.item())
    if isinstance(value, numbers.Integral):
        return int(value)
    raise ValueError(f"{what} must be an integer, got {value!r}")


def check_eta(eta) -> float:
    """eta of the DDIM forward process: lambda^2 = eta^2 btilde, so 0 <= eta <= 1 (eta = 1: the DDPM posterior's
    variance); outside that range bbar_s - lambda^2 can turn negative and the mean is not defined."""
    if isinstance(eta, bool) or not isinstance(eta, (numbers.Real, Tensor)):
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    value = float(eta)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (DDIM's eta: 0 = deterministic, 1 = the DDPM variance), got {value}")
    return value


def check_K(K: int, N: int) -> int:
    K = as_int(K, "K (number of sampling steps)")
    if K < 1:
        raise ValueError(f"K (number of sampling steps) must be >= 1, got {K}")
    if K > N:
        raise ValueError(f"K = {K} exceeds N = {N}: a trajectory has at most N distinct timesteps")
    return K


class GammaWarning(UserWarning):
    """A Gamma that is valid but implausible (above 1 on most timesteps): the predictor or its convention is off."""


class NonFiniteOutputError(FloatingPointError):
    """The noise predictor returned NaN or inf. Attributes: ``where`` (``"sample"``, ``"nll_bpd"``,
    ``"estimate_gamma"``), ``timestep`` (the first timestep t, in 1..N, whose output was not finite) and ``step``
    (the sampling step k of K, counted from the start of sampling, when known)."""

    def __init__(self, where: str, timestep: int, step: int | None = None, total_steps: int | None = None):
        self.where, self.timestep, self.step = where, int(timestep), step
        at = f"timestep t={self.timestep}"
        if step is not None:
            at += f" (sampling step {step} of {total_steps})"
        super().__init__(
            f"{where}: the network output is not finite (NaN or inf) at {at}. The weights may be broken (a diverged "
            "or corrupt checkpoint), or the network overflows in this precision; check the checkpoint and try fp32."
        )


class FiniteWatch:
    """Remembers, on the device, the first timestep whose network output was not finite.

    :meth:`observe` costs one reduction on the device and no host synchronisation; :meth:`check` synchronises once
    (call it at the end of a batch) and raises :class:`NonFiniteOutputError`.
    """

    def __init__(self, where: str, device, sentinel: int):
        self.where = where
        self.sentinel = int(sentinel)  # larger than any timestep: "nothing seen"
        self.first_t = torch.full((), self.sentinel, dtype=torch.long, device=device)
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, out: Tensor, t: Tensor | int, step: int | None = None) -> None:
        """``out`` [B, ...] at timesteps ``t`` ([B] or one int); keeps the smallest offending t (or the first step)."""
        bad = ~torch.isfinite(out.detach().flatten(1)).all(1)
        if isinstance(t, Tensor) and t.ndim == 1:
            cand = torch.where(bad, t.to(self.first_t.device, torch.long), self.sentinel).min()
        else:
            cand = torch.where(bad.any(), torch.as_tensor(int(t), device=self.first_t.device), self.sentinel)
        if step is None:
            self.first_t = torch.minimum(self.first_t, cand)
        else:  # sampling goes from t = N down: keep the first offending step, not the smallest t
            new = (self.first_step < 0) & (cand < self.sentinel)
            self.first_t = torch.where(new, cand, self.first_t)
            self.first_step = torch.where(new, torch.as_tensor(step, device=self.first_t.device), self.first_step)

    def check(self, total_steps: int | None = None) -> None:
        t = int(self.first_t)
        if t < self.sentinel:
            step = int(self.first_step)
            raise NonFiniteOutputError(self.where, t, step if step >= 0 else None, total_steps)
