"""The oracles themselves are exact: checked against autograd of the closed-form log density."""

import math

import torch

from analytic_dpm import NoiseSchedule
from analytic_dpm.oracles import GaussianMixtureOracle, GaussianOracle

SCHED = NoiseSchedule.linear(1000)


def _log_qt_mixture(x, t, means, stds, weights):
    abar, bbar = SCHED.alphas_cumprod[t], SCHED.bbar[t]
    comps = []
    for m, s, w in zip(means, stds, weights):
        v = abar * s**2 + bbar
        comps.append(math.log(w) - 0.5 * x[0].numel() * torch.log(2 * math.pi * v)
                     - ((x - abar.sqrt() * m) ** 2).sum() / (2 * v))
    return torch.logsumexp(torch.stack(comps), 0)


def test_mixture_eps_is_minus_sqrt_bbar_times_score():
    means, stds, weights = [-0.6, 0.4], [0.15, 0.3], [0.25, 0.75]
    oracle = GaussianMixtureOracle(SCHED, means, stds, weights, shape=(1, 2, 3))
    gen = torch.Generator().manual_seed(0)
    for t in (1, 50, 400, 1000):
        x = torch.randn(1, 1, 2, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
        (score,) = torch.autograd.grad(_log_qt_mixture(x[0], t, means, stds, weights), x)
        eps = oracle(x.detach(), torch.tensor([t]))
        assert torch.allclose(eps, -SCHED.bbar[t].sqrt() * score, rtol=1e-9, atol=1e-12)


def test_single_component_mixture_equals_gaussian_oracle():
    g = GaussianOracle(SCHED, mean=0.2, std=0.4, shape=(3, 2, 2))
    m = GaussianMixtureOracle(SCHED, [0.2], [0.4], [1.0], shape=(3, 2, 2))
    x = torch.randn(5, 3, 2, 2)
    t = torch.tensor([1, 10, 100, 500, 1000])
    assert torch.allclose(g(x, t), m(x, t), atol=1e-6)
    assert g(x, t).dtype == torch.float32


def test_samples_have_the_right_moments():
    g = GaussianOracle(SCHED, mean=0.2, std=0.4, shape=(1, 4, 4))
    x = g.sample_data(20000, torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - 0.2) < 0.005 and abs(x.std().item() - 0.4) < 0.005
    assert abs(g.nll_bits_per_dim() - 0.5 * math.log2(2 * math.pi * math.e * 0.16)) < 1e-12
