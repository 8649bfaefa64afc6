"""Gamma calibration (spec section 5) against the Gaussian oracle's closed form."""

import pytest
import torch

from analytic_dpm import NoiseSchedule, estimate_gamma
from analytic_dpm.oracles import GaussianMixtureOracle, GaussianOracle

SCHED = NoiseSchedule.linear(1000)


def test_gamma_matches_closed_form_within_monte_carlo_error():
    oracle = GaussianOracle(SCHED, mean=0.3, std=0.5, shape=(1, 4, 4))
    M, d = 200, 16
    pool = oracle.sample_data(4096, torch.Generator().manual_seed(1))
    est = estimate_gamma(oracle, SCHED, pool, num_samples=M, batch_size=4096,
                         generator=torch.Generator().manual_seed(2), progress=False)
    exact = oracle.gamma()
    assert est.shape == (1001,) and est.dtype == torch.float64 and est[0] == 0
    # epshat^2 per dim is gamma * chi^2_1; mean over d dims and M draws has std gamma sqrt(2 / (d M))
    rel_std = (2 / (d * M)) ** 0.5
    z = ((est[1:] - exact[1:]) / (exact[1:] * rel_std)).abs()
    assert z.max() < 5.5
    assert z.mean() < 1.2  # the mean |z| of a standard normal is 0.8
    # averaged over timesteps the estimate is unbiased to high precision
    assert (est[1:] / exact[1:]).mean().item() == pytest.approx(1.0, abs=4 * rel_std / 1000**0.5)


def test_gamma_deterministic_and_batch_independent_sampler_source():
    oracle = GaussianOracle(SCHED, std=0.5, shape=(1, 2, 2))
    g1 = estimate_gamma(oracle, SCHED, oracle.sample_data, 10, 333,
                        generator=torch.Generator().manual_seed(5), progress=False)
    g2 = estimate_gamma(oracle, SCHED, oracle.sample_data, 10, 333,
                        generator=torch.Generator().manual_seed(5), progress=False)
    assert torch.equal(g1, g2)
    g3 = estimate_gamma(oracle, SCHED, oracle.sample_data, 10, 333,
                        generator=torch.Generator().manual_seed(6), progress=False)
    assert not torch.equal(g1, g3)
    # default generator is seeded: reproducible and leaves the global RNG alone
    state = torch.get_rng_state()
    g4 = estimate_gamma(oracle, SCHED, oracle.sample_data, 10, 1000, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(g4, estimate_gamma(oracle, SCHED, oracle.sample_data, 10, 1000, progress=False))


def test_gamma_batches_mix_timesteps_and_cover_all():
    calls = []

    def eps_model(x, t):
        calls.append(t.clone())
        return torch.ones_like(x)

    pool = torch.zeros(7, 1, 2, 2, dtype=torch.uint8)  # uint8 images are mapped to [-1, 1]
    sched = NoiseSchedule.linear(50)
    g = estimate_gamma(eps_model, sched, pool, num_samples=3, batch_size=64, progress=False)
    assert torch.allclose(g[1:], torch.ones(50, dtype=torch.float64)) and g[0] == 0
    assert all(c.numel() == 64 for c in calls[:-1])  # full batches, across timesteps
    assert torch.equal(torch.cat(calls).bincount(minlength=51)[1:], torch.full((50,), 3))


def test_gmm_gamma_below_one():
    oracle = GaussianMixtureOracle(SCHED, means=[-0.5, 0.5], stds=[0.1, 0.2], weights=[0.3, 0.7], shape=(1, 2, 2))
    g = estimate_gamma(oracle, SCHED, oracle.sample_data, 200, 20000, progress=False)
    rel_std = (2 / (4 * 200)) ** 0.5  # gamma <= 1 in theory; the estimate exceeds it only by noise
    assert (g[1:] > 0).all() and (g[1:] < 1 + 5.5 * rel_std).all()
    assert g[900:].mean().item() == pytest.approx(1.0, abs=0.02)  # nearly pure noise near t = N


def test_bad_input():
    oracle = GaussianOracle(SCHED)
    with pytest.raises(ValueError, match="empty"):
        estimate_gamma(oracle, SCHED, torch.zeros(0, 1, 4, 4), 10, 10, progress=False)
    with pytest.raises(ValueError, match=">= 1"):
        estimate_gamma(oracle, SCHED, oracle.sample_data, 0, 10, progress=False)
