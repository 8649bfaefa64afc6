"""Noise schedules and the pair quantities of spec section 0.

Index convention (spec section 0): every table has length N+1 and index 0 is clean data,
so ``betas[0] = 0``, ``alphas_cumprod[0] = 1`` (abar_0) and ``bbar[0] = 0``.
All tables are float64: the pair quantities for close (s, t) lose digits in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SCHEDULES = ("linear", "cosine")


def _as_index(x, device) -> Tensor:
    return torch.as_tensor(x, dtype=torch.long, device=device)


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete-time variance-preserving forward process q(x_n | x_{n-1}) = N(sqrt(alpha_n) x, beta_n I).

    Attributes (all float64, length N+1, index 0 = data):
        betas:           beta_n, with beta_0 = 0
        alphas_cumprod:  abar_n = prod_{i<=n} (1 - beta_i), abar_0 = 1
        bbar:            1 - abar_n  (``bbar_n``, the marginal noise variance)
        log_alphas_cumprod: log abar_n, the stable source of every pair ratio alpha_{t|s}
    """

    betas: Tensor
    name: str = "custom"

    def __post_init__(self):
        b = self.betas
        if b.ndim != 1 or b.numel() < 2:
            raise ValueError("betas must be a 1-D table of length N+1 (index 0 = data) with N >= 1")
        if b[0].item() != 0.0:
            raise ValueError("betas[0] must be 0: index 0 is clean data (spec section 0)")
        inner = b[1:]
        if not torch.isfinite(inner).all() or (inner <= 0).any() or (inner >= 1).any():
            bad = inner[~((inner > 0) & (inner < 1))]
            raise ValueError(
                f"every beta_n (n >= 1) must lie in (0, 1); got {bad[:3].tolist()}... "
                "The linear schedule scales betas by 1000/N, so N <= 20 gives beta_N >= 1: use a larger N "
                "or the cosine schedule."
            )
        object.__setattr__(self, "betas", b.to(torch.float64))
        # derived tables, computed once (the schedule is immutable)
        log_abar = torch.cumsum(torch.log1p(-self.betas), 0)
        object.__setattr__(self, "_log_abar", log_abar)
        object.__setattr__(self, "_abar", torch.cumprod(1 - self.betas, 0))
        object.__setattr__(self, "_bbar", 0.0 - torch.expm1(log_abar))  # 0 - (.) turns -0.0 at n = 0 into +0.0

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, N: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """LS (spec section 1): beta_n = linspace(1e-4 * 1000/N, 0.02 * 1000/N, N)[n-1]."""
        N = _check_N(N)
        scale = 1000.0 / N
        inner = torch.linspace(beta_start * scale, beta_end * scale, N, dtype=torch.float64)
        return cls(torch.cat([torch.zeros(1, dtype=torch.float64), inner]), name="linear")

    @classmethod
    def cosine(cls, N: int, offset: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """CS (spec section 1): f(u) = cos^2(((u + s)/(1 + s)) pi/2); beta_n = min(1 - f(n/N)/f((n-1)/N), 0.999)."""
        N = _check_N(N)
        u = torch.arange(N + 1, dtype=torch.float64) / N
        f = torch.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2
        inner = torch.clamp(1 - f[1:] / f[:-1], max=max_beta)
        return cls(torch.cat([torch.zeros(1, dtype=torch.float64), inner]), name="cosine")

    @classmethod
    def from_betas(cls, betas, name: str = "custom") -> NoiseSchedule:
        """Any schedule from its betas ``beta_1..beta_N`` (length N, float64 recommended; public API).

        Pretrained models carry their own schedules (DDPM/DDIM's unscaled linear betas, diffusers' scaled_linear,
        trained betas, ...): rebuild them in float64 from the format's formula and pass them here. ``betas`` may
        also be a full table of length N+1 that starts with beta_0 = 0 (index 0 = data), as the constructor takes.
        """
        b = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if b.numel() >= 1 and b[0].item() != 0.0:
            b = torch.cat([torch.zeros(1, dtype=torch.float64), b])
        return cls(b, name=name)

    @classmethod
    def from_name(cls, name: str, N: int) -> NoiseSchedule:
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
        return getattr(cls, name)(N)

    # ------------------------------------------------------------------ tables
    @property
    def N(self) -> int:
        return self.betas.numel() - 1

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @property
    def log_alphas_cumprod(self) -> Tensor:
        """log abar_n = sum_{i<=n} log(1 - beta_i); log1p keeps small betas exact."""
        return self._log_abar

    @property
    def alphas_cumprod(self) -> Tensor:
        """abar_n, recomputed as cumprod(1 - beta) (spec section 1)."""
        return self._abar

    @property
    def bbar(self) -> Tensor:
        """bbar_n = 1 - abar_n, computed as -expm1(log abar_n) (exact for small n)."""
        return self._bbar

    def to(self, device) -> NoiseSchedule:
        return NoiseSchedule(self.betas.to(device), name=self.name)

    # ------------------------------------------------------------------ pair quantities, s < t
    def alpha_ts(self, s, t) -> Tensor:
        """alpha_{t|s} = abar_t / abar_s."""
        la = self.log_alphas_cumprod
        s, t = _as_index(s, la.device), _as_index(t, la.device)
        return torch.exp(la[t] - la[s])

    def beta_ts(self, s, t) -> Tensor:
        """beta_{t|s} = 1 - alpha_{t|s}, as -expm1(log abar_t - log abar_s): stable for close s, t."""
        la = self.log_alphas_cumprod
        s, t = _as_index(s, la.device), _as_index(t, la.device)
        return -torch.expm1(la[t] - la[s])

    def btilde(self, s, t) -> Tensor:
        """btilde_{s|t} = beta_{t|s} bbar_s / bbar_t, the DDPM posterior variance of q(x_s | x_t, x_0)."""
        bbar = self.bbar
        s, t = _as_index(s, bbar.device), _as_index(t, bbar.device)
        return self.beta_ts(s, t) * bbar[s] / bbar[t]

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, N={self.N})"


def _check_N(N) -> int:
    if not isinstance(N, int) or isinstance(N, bool) or N < 1:
        raise ValueError(f"N (number of diffusion steps) must be a positive integer, got {N!r}")
    return N
