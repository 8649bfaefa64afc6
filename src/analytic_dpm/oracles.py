"""Exact noise predictors for Gaussian and Gaussian-mixture data (spec sections 9 and 11): ground truth for tests.

An oracle is callable as ``eps_model(x_t, t)`` (t: integer tensor in 1..N) and returns the exact
E[eps | x_t] = -sqrt(bbar_t) * grad log q_t(x_t). Computed in float64, returned in x's dtype.
``oracle.head_model("sn" | "npr")`` is the exact head model of spec section 11: ``(x_t, t) -> (eps_hat, head)`` with
SN head h = E[eps^2 | x_t] = eps_hat^2 + Var[eps | x_t] and NPR head g = E[(eps - eps_hat)^2 | x_t] = Var[eps | x_t]
(eps_hat being the exact E[eps | x_t]), elementwise.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .methods import HEAD_KINDS
from .schedule import NoiseSchedule


class OracleHeadModel:
    """The exact head model of an oracle: ``(x_t, t) -> (eps_hat, head)`` in one call (spec section 11).

    Attributes: ``head_kind`` (``"sn"`` or ``"npr"``), ``eps_model`` (the oracle itself: the plain noise predictor).
    """

    def __init__(self, oracle: _Oracle, kind: str):
        if kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be 'sn' or 'npr', got {kind!r}")
        self.eps_model = oracle
        self.head_kind = kind

    def __call__(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        eps, var = self.eps_model.eps_and_variance(x, t)  # float64 E[eps | x_t], Var[eps | x_t]
        head = eps**2 + var if self.head_kind == "sn" else var
        return eps.to(x.dtype), head.to(x.dtype)

    def __repr__(self) -> str:
        return f"OracleHeadModel({type(self.eps_model).__name__}, head_kind={self.head_kind!r})"


class _Oracle(ABC):
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

    @abstractmethod
    def eps_and_variance(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(E[eps | x_t], Var[eps | x_t]) elementwise, float64 (the exact heads of spec section 11)."""

    @abstractmethod
    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """The exact E[eps | x_t] in x's dtype."""

    def head_model(self, kind: str) -> OracleHeadModel:
        """The exact head model ``(x_t, t) -> (eps_hat, head)`` for the ``"sn"`` or ``"npr"`` methods."""
        return OracleHeadModel(self, kind)


class GaussianOracle(_Oracle):
    """Data x_0 ~ N(mean, diag(std^2)) on ``shape``; epshat = sqrt(bbar)(x - sqrt(abar) m) / (abar s^2 + bbar).

    ``std`` is a number (isotropic, spec section 9) or a tensor / list of per-pixel standard deviations (anisotropic,
    spec section 11): broadcastable to ``shape`` or with exactly prod(shape) values (reshaped). The exact
    Var[eps | x_t] = abar s_i^2 / (abar s_i^2 + bbar) does not depend on x_t.
    """

    def __init__(self, schedule: NoiseSchedule, mean=0.0, std=0.5, shape=(1, 4, 4)):
        super().__init__(schedule, shape)
        self.mean = torch.broadcast_to(torch.as_tensor(mean, dtype=torch.float64), self.shape).clone()
        std_t = torch.as_tensor(std, dtype=torch.float64)
        if not bool((std_t > 0).all()) or not bool(torch.isfinite(std_t).all()):
            raise ValueError(f"std must be finite and > 0, got {std}")
        if std_t.ndim == 0:
            self.std: float | Tensor = float(std_t)  # isotropic: a plain number, as before
            self._var: float | Tensor = self.std**2
        else:
            if std_t.numel() == self.dim and std_t.shape != self.shape:
                std_t = std_t.reshape(self.shape)
            try:
                std_t = torch.broadcast_to(std_t, self.shape).clone()
            except RuntimeError:
                raise ValueError(f"std of shape {tuple(std_t.shape)} does not fit the data shape {self.shape}; "
                                 f"give one number, {self.dim} values or a tensor broadcastable to it") from None
            self.std = std_t
            self._var = std_t**2

    @property
    def isotropic(self) -> bool:
        return not isinstance(self.std, Tensor)

    def _var_on(self, device) -> float | Tensor:
        return self._var if self.isotropic else self._var.to(device)

    def eps_and_variance(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        abar, bbar = self._coeffs(x, t)
        m, var = self.mean.to(x.device), self._var_on(x.device)
        v = abar * var + bbar  # Var[x_t] per pixel
        eps = bbar.sqrt() * (x.double() - abar.sqrt() * m) / v
        return eps, torch.broadcast_to(abar * var / v, eps.shape)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        abar, bbar = self._coeffs(x, t)
        m = self.mean.to(x.device)
        eps = bbar.sqrt() * (x.double() - abar.sqrt() * m) / (abar * self._var_on(x.device) + bbar)
        return eps.to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else "cpu"
        z = torch.randn((n, *self.shape), generator=generator, device=device, dtype=torch.float64)
        std = self.std if self.isotropic else self.std.to(device)
        return (self.mean.to(device) + std * z).float()

    def _per_pixel(self, values_of_var) -> Tensor:
        """Average over pixels of ``values_of_var(var)`` evaluated on every timestep: float64 [N+1]."""
        if self.isotropic:
            return values_of_var(self._var)
        return values_of_var(self._var.flatten()[None, :]).mean(1)

    def gamma(self) -> Tensor:
        """Closed-form gamma_n = mean over pixels of bbar_n / (abar_n s_i^2 + bbar_n), length N+1, gamma_0 = 0."""
        abar, bbar = self.schedule.alphas_cumprod, self.schedule.bbar
        if self.isotropic:
            g = bbar / (abar * self.std**2 + bbar)
        else:
            g = self._per_pixel(lambda var: bbar[:, None] / (abar[:, None] * var + bbar[:, None]))
        g[0] = 0.0
        return g

    def posterior_variance(self) -> Tensor:
        """E Cov[x_0 | x_n] / d = mean over pixels of s_i^2 bbar_n / (abar_n s_i^2 + bbar_n), length N+1."""
        abar, bbar = self.schedule.alphas_cumprod, self.schedule.bbar
        if self.isotropic:
            return self.std**2 * bbar / (abar * self.std**2 + bbar)
        return self._per_pixel(lambda var: var * bbar[:, None] / (abar[:, None] * var + bbar[:, None]))

    def posterior_variance_per_pixel(self, n: int) -> Tensor:
        """Cov[x_0 | x_n] per pixel (diagonal, the same for every x_n): s_i^2 bbar_n / (abar_n s_i^2 + bbar_n)."""
        abar, bbar = self.schedule.alphas_cumprod[n], self.schedule.bbar[n]
        var = torch.broadcast_to(torch.as_tensor(self._var, dtype=torch.float64), self.shape)
        return var * bbar / (abar * var + bbar)

    def nll_bits_per_dim(self) -> float:
        """Exact differential entropy per dimension in bits: mean over pixels of 0.5 log2(2 pi e s_i^2)."""
        if self.isotropic:
            return 0.5 * math.log2(2 * math.pi * math.e * self.std**2)
        return float((0.5 * torch.log2(2 * math.pi * math.e * self._var)).mean())

    def log_prob(self, x0: Tensor) -> Tensor:
        """log q(x_0) per data point in nats, float64 [B]."""
        var = torch.broadcast_to(torch.as_tensor(self._var, dtype=torch.float64), self.shape).to(x0.device)
        lp = -0.5 * (torch.log(2 * math.pi * var) + (x0.double() - self.mean.to(x0.device)) ** 2 / var)
        return lp.flatten(1).sum(1)


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

    def _components(self, x: Tensor, t: Tensor):
        """Per component j: responsibilities r_j(x_t) [B, J], v_j = abar s_j^2 + bbar [B, J], x_t - sqrt(abar) m_j."""
        abar, bbar = self._coeffs(x, t)  # [B, 1, ...]
        xd = x.double()
        B = x.shape[0]
        m = self.means.to(x.device).unsqueeze(0)  # [1, J, *shape]
        v = (abar.reshape(B, 1) * self.stds.to(x.device) ** 2 + bbar.reshape(B, 1))  # [B, J]
        diff = xd.unsqueeze(1) - abar.sqrt().unsqueeze(1) * m  # [B, J, *shape]
        sq = diff.flatten(2).pow(2).sum(-1)  # [B, J]
        logr = self.weights.to(x.device).log() - 0.5 * self.dim * v.log() - 0.5 * sq / v
        r = torch.softmax(logr, dim=1)  # responsibilities
        return r, v, diff, abar, bbar

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        r, v, diff, _, bbar = self._components(x, t)
        B = x.shape[0]
        coef = (r / v).reshape(B, -1, *([1] * len(self.shape)))
        eps = bbar.sqrt() * (coef * diff).sum(1)
        return eps.to(x.dtype)

    def eps_and_variance(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Given component j, (x_0, eps) | x_t is Gaussian: E_j[eps | x_t] = sqrt(bbar)(x_t - sqrt(abar) m_j) / v_j,
        Var_j[eps | x_t] = abar s_j^2 / v_j. By the law of total variance, with the responsibilities r_j(x_t):
        E[eps | x_t] = sum_j r_j E_j,  Var[eps | x_t] = sum_j r_j (Var_j + (E_j - E[eps | x_t])^2)   (elementwise)."""
        r, v, diff, abar, bbar = self._components(x, t)
        view = (x.shape[0], -1, *([1] * len(self.shape)))
        r_, v_ = r.reshape(view), v.reshape(view)
        eps_j = bbar.sqrt().unsqueeze(1) * diff / v_  # [B, J, *shape]
        eps = (r_ * eps_j).sum(1)
        var_j = abar.unsqueeze(1) * self.stds.to(x.device).reshape(1, -1, *([1] * len(self.shape))) ** 2 / v_
        var = (r_ * (var_j + (eps_j - eps.unsqueeze(1)) ** 2)).sum(1)
        return eps, var

    def log_prob(self, x0: Tensor) -> Tensor:
        """log q(x_0) per data point in nats, float64 [B]."""
        x = x0.double().unsqueeze(1)  # [B, 1, *shape]
        m = self.means.to(x0.device).unsqueeze(0)
        var = self.stds.to(x0.device) ** 2  # [J]
        sq = (x - m).flatten(2).pow(2).sum(-1)  # [B, J]
        comp = self.weights.to(x0.device).log() - 0.5 * self.dim * torch.log(2 * math.pi * var) - 0.5 * sq / var
        return torch.logsumexp(comp, dim=1)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        device = generator.device if generator is not None else "cpu"
        j = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        z = torch.randn((n, *self.shape), generator=generator, device=device, dtype=torch.float64)
        view = (n,) + (1,) * len(self.shape)
        return (self.means.to(device)[j] + self.stds.to(device)[j].view(view) * z).float()
