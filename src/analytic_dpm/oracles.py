"""Exact noise predictors for Gaussian and Gaussian-mixture data (spec section 9): ground truth for tests.

An oracle is callable as ``eps_model(x_t, t)`` (t: integer tensor in 1..N) and returns the exact
E[eps | x_t] = -sqrt(bbar_t) * grad log q_t(x_t). Computed in float64, returned in x's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedule import NoiseSchedule


class _Oracle:
    def __init__(self, schedule: NoiseSchedule, shape):
        self.schedule = schedule
        self.shape = tuple(int(s) for s in shape)
        self.dim = math.prod(self.shape)

    def _schedule_on(self, device) -> NoiseSchedule:
        """The schedule on ``device``, moved once per device rather than on every call."""
        cache = self.__dict__.setdefault("_schedules", {self.schedule.device: self.schedule})
        if device not in cache:
            cache[device] = self.schedule.to(device)
        return cache[device]

    def _coeffs(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(abar_t, bbar_t) as float64 tensors broadcastable against x."""
        t = torch.as_tensor(t, device=x.device).long().reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        if (t < 1).any() or (t > self.schedule.N).any():
            raise ValueError(f"timesteps must lie in 1..N = 1..{self.schedule.N}")
        sched = self._schedule_on(x.device)
        view = (-1,) + (1,) * (x.ndim - 1)
        return sched.alphas_cumprod[t].view(view), sched.bbar[t].view(view)


class GaussianOracle(_Oracle):
    """Data x_0 ~ N(mean, std^2 I) on ``shape``; epshat = sqrt(bbar)(x - sqrt(abar) m) / (abar s^2 + bbar)."""

    def __init__(self, schedule: NoiseSchedule, mean=0.0, std=0.5, shape=(1, 4, 4)):
        super().__init__(schedule, shape)
        self.mean = torch.broadcast_to(torch.as_tensor(mean, dtype=torch.float64), self.shape).clone()
        self.std = float(std)
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {std}")

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        abar, bbar = self._coeffs(x, t)
        m = self.mean.to(x.device)
        eps = bbar.sqrt() * (x.double() - abar.sqrt() * m) / (abar * self.std**2 + bbar)
        return eps.to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else "cpu"
        z = torch.randn((n, *self.shape), generator=generator, device=device, dtype=torch.float64)
        return (self.mean.to(device) + self.std * z).float()

    def gamma(self) -> Tensor:
        """Closed-form gamma_n = bbar_n / (abar_n s^2 + bbar_n), length N+1, gamma_0 = 0."""
        abar, bbar = self.schedule.alphas_cumprod, self.schedule.bbar
        g = bbar / (abar * self.std**2 + bbar)
        g[0] = 0.0
        return g

    def posterior_variance(self) -> Tensor:
        """E Cov[x_0 | x_n] / d = s^2 bbar_n / (abar_n s^2 + bbar_n), length N+1."""
        abar, bbar = self.schedule.alphas_cumprod, self.schedule.bbar
        return self.std**2 * bbar / (abar * self.std**2 + bbar)

    def nll_bits_per_dim(self) -> float:
        """Exact differential entropy per dimension in bits: 0.5 log2(2 pi e s^2)."""
        return 0.5 * math.log2(2 * math.pi * math.e * self.std**2)


class GaussianMixtureOracle(_Oracle):
    """Data from sum_j w_j N(m_j, s_j^2 I); the exact noise predictor is responsibility-weighted:

    epshat = sqrt(bbar) sum_j r_j(x) (x - sqrt(abar) m_j) / v_j,  v_j = abar s_j^2 + bbar,
    r_j(x) proportional to w_j N(x; sqrt(abar) m_j, v_j I).
    ``means`` is [J, *shape], or [J] scalars broadcast to ``shape``.
    """

    def __init__(self, schedule: NoiseSchedule, means, stds, weights, shape=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if shape is None:
            if means.ndim < 2:
                raise ValueError("pass shape=... when the mixture means are scalars")
            shape = means.shape[1:]
        super().__init__(schedule, shape)
        J = means.shape[0]
        self.means = torch.broadcast_to(means.reshape(J, *([1] * len(self.shape))) if means.ndim == 1 else means,
                                        (J, *self.shape)).clone()
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if not (self.stds.numel() == J == w.numel()):
            raise ValueError(f"means, stds and weights must have the same number of components; got "
                             f"{J}, {self.stds.numel()}, {w.numel()}")
        if (w < 0).any() or w.sum() <= 0 or (self.stds <= 0).any():
            raise ValueError("weights must be >= 0 with a positive sum, stds > 0")
        self.weights = w / w.sum()

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        abar, bbar = self._coeffs(x, t)  # [B, 1, ...]
        xd = x.double()
        B = x.shape[0]
        m = self.means.to(x.device).unsqueeze(0)  # [1, J, *shape]
        v = (abar.reshape(B, 1) * self.stds.to(x.device) ** 2 + bbar.reshape(B, 1))  # [B, J]
        diff = xd.unsqueeze(1) - abar.sqrt().unsqueeze(1) * m  # [B, J, *shape]
        sq = diff.flatten(2).pow(2).sum(-1)  # [B, J]
        logr = self.weights.to(x.device).log() - 0.5 * self.dim * v.log() - 0.5 * sq / v
        r = torch.softmax(logr, dim=1)  # responsibilities
        coef = (r / v).reshape(B, -1, *([1] * len(self.shape)))
        eps = bbar.sqrt() * (coef * diff).sum(1)
        return eps.to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else "cpu"
        j = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        z = torch.randn((n, *self.shape), generator=generator, device=device, dtype=torch.float64)
        view = (n,) + (1,) * len(self.shape)
        return (self.means.to(device)[j] + self.stds.to(device)[j].view(view) * z).float()
