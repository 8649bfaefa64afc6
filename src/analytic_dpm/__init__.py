"""Analytic-DPM: the analytic optimal reverse variance of diffusion probabilistic models.

Bao, Li, Zhu, Zhang, ICLR 2022. The pure-PyTorch core (no Lightning, no Hydra) lives here:
schedule -> gamma -> variance / trajectory -> sampler / likelihood, each a pure function taking the
noise-prediction model ``eps_model(x_t, t)`` (integer t in 1..N) as an argument. A head model
``model(x_t, t) -> (eps_hat, head)`` (the SN / NPR covariance heads, Bao et al., ICML 2022) works everywhere too.
"""

from . import accel, oracles
from .accel import prepare_eps_model
from .gamma import estimate_gamma
from .likelihood import nll_bpd
from .methods import ALL_METHODS, HEAD_METHODS, METHODS, head_kind, needs_head
from .moments import reverse_moments
from .pair_costs import estimate_pair_costs
from .sampler import sample
from .schedule import NoiseSchedule
from .trajectory import TRAJECTORY_KINDS, make_trajectory, optimal_trajectory_from_costs
from .variance import reverse_variance, variance_bounds

__all__ = [
    "ALL_METHODS",
    "HEAD_METHODS",
    "METHODS",
    "NoiseSchedule",
    "TRAJECTORY_KINDS",
    "estimate_gamma",
    "estimate_pair_costs",
    "head_kind",
    "make_trajectory",
    "needs_head",
    "nll_bpd",
    "optimal_trajectory_from_costs",
    "oracles",
    "accel",
    "prepare_eps_model",
    "reverse_moments",
    "reverse_variance",
    "sample",
    "variance_bounds",
]
__version__ = "0.2.0"
