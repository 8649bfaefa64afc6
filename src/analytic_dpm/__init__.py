"""Analytic-DPM: the analytic optimal reverse variance of diffusion probabilistic models.

Bao, Li, Zhu, Zhang, ICLR 2022. The pure-PyTorch core (no Lightning, no Hydra) lives here:
schedule -> gamma -> variance / trajectory -> sampler / likelihood, each a pure function taking the
noise-prediction model ``eps_model(x_t, t)`` (integer t in 1..N) as an argument.
"""

from . import accel, oracles
from .accel import prepare_eps_model
from .gamma import estimate_gamma
from .likelihood import nll_bpd
from .methods import METHODS
from .sampler import sample
from .schedule import NoiseSchedule
from .trajectory import TRAJECTORY_KINDS, make_trajectory
from .variance import reverse_variance, variance_bounds

__all__ = [
    "METHODS",
    "NoiseSchedule",
    "TRAJECTORY_KINDS",
    "estimate_gamma",
    "make_trajectory",
    "nll_bpd",
    "oracles",
    "accel",
    "prepare_eps_model",
    "reverse_variance",
    "sample",
    "variance_bounds",
]
__version__ = "0.2.0"
