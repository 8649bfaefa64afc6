"""Sampling (spec section 7) on the Gaussian oracle: analytic variances recover the data distribution."""

import pytest
import torch

from analytic_dpm import METHODS, NoiseSchedule, make_trajectory, sample
from analytic_dpm.oracles import GaussianOracle

SCHED = NoiseSchedule.linear(1000)
ORACLE = GaussianOracle(SCHED, mean=0.3, std=0.5, shape=(1, 4, 4))
TRAJ = make_trajectory("even", 1000, 10)


def _draw(method, seed=0, n=10000, **kw):
    return sample(ORACLE, SCHED, TRAJ, method, (n, 1, 4, 4), gamma=ORACLE.gamma(), clip_x0=False,
                  data_range=None, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("method", ["analytic_ddpm", "analytic_ddim"])
def test_analytic_samples_match_data_moments_where_ddpm_beta_fails(method):
    tol_var = 0.01  # the sample variance of 160k values has std ~0.0009 here
    x = _draw(method)
    assert abs(x.mean().item() - 0.3) < 0.01
    assert abs(x.var().item() - 0.25) < tol_var
    base = _draw("ddpm_beta")
    assert abs(base.var().item() - 0.25) > 5 * tol_var  # ddpm_beta at K = 10 is far too noisy


def test_same_generator_same_samples_and_x_T():
    a, b = _draw("analytic_ddpm", seed=3, n=64), _draw("analytic_ddpm", seed=3, n=64)
    assert torch.equal(a, b)
    assert not torch.equal(a, _draw("analytic_ddpm", seed=4, n=64))
    x_T = torch.randn(8, 1, 4, 4)
    d1 = sample(ORACLE, SCHED, TRAJ, "ddim", (8, 1, 4, 4), x_T=x_T, clip_x0=False, data_range=None)
    d2 = sample(ORACLE, SCHED, TRAJ, "ddim", (8, 1, 4, 4), x_T=x_T, clip_x0=False, data_range=None,
                generator=torch.Generator().manual_seed(99))
    assert torch.equal(d1, d2)  # eta = 0: deterministic given x_T


def test_one_network_call_per_step_and_callback():
    calls, seen = [], []

    def model(x, t):
        calls.append(int(t[0]))
        return ORACLE(x, t)

    for method in METHODS:
        calls.clear()
        sample(model, SCHED, TRAJ, method, (4, 1, 4, 4), gamma=ORACLE.gamma(),
               callback=lambda k, t, x, x0: seen.append((k, t)))
        assert calls == TRAJ[::-1]
    assert seen[:2] == [(10, 1000), (9, 889)]


def test_images_are_clipped_to_range():
    wide = GaussianOracle(SCHED, mean=0.0, std=2.0, shape=(1, 2, 2))
    x = sample(wide, SCHED, TRAJ, "analytic_ddpm", (256, 1, 2, 2), gamma=wide.gamma(),
               generator=torch.Generator().manual_seed(0))
    assert x.min() >= -1 and x.max() <= 1


def test_bad_input():
    with pytest.raises(ValueError, match="unknown method"):
        sample(ORACLE, SCHED, TRAJ, "ddpm_large", (2, 1, 4, 4))
    with pytest.raises(ValueError, match="needs gamma"):
        sample(ORACLE, SCHED, TRAJ, "analytic_ddim", (2, 1, 4, 4))
    with pytest.raises(ValueError, match="x_T has shape"):
        sample(ORACLE, SCHED, TRAJ, "ddim", (2, 1, 4, 4), x_T=torch.zeros(3, 1, 4, 4))


# Full-loop golden values (diffusers' scheduler tests do the same): a fixed generator, a Gaussian-mixture oracle
# with Monte-Carlo Gamma, and sum |x| / mean of the 16 samples pinned per method and trajectory. A silent change of
# the sampling order (which draw goes where), of a mean or of a variance moves these numbers.
GOLDEN = {  # (trajectory, method): (sum |x|, mean)
    ("even", "ddpm_beta"): (114.95056, 0.30385077),
    ("even", "ddpm_beta_tilde"): (96.79894, 0.33255720),
    ("even", "analytic_ddpm"): (102.63607, 0.34303138),
    ("even", "ddim"): (111.87640, 0.19944755),
    ("even", "analytic_ddim"): (114.60847, 0.17609857),
    ("optimal", "ddpm_beta"): (123.91619, 0.13846133),
    ("optimal", "ddpm_beta_tilde"): (113.91283, 0.13522843),
    ("optimal", "analytic_ddpm"): (116.63300, 0.13906818),
}


@pytest.fixture(scope="module")
def golden_setup():
    from analytic_dpm import estimate_gamma
    from analytic_dpm.oracles import GaussianMixtureOracle

    oracle = GaussianMixtureOracle(SCHED, [-0.5, 0.4], [0.2, 0.3], [0.3, 0.7], shape=(1, 4, 4))
    gamma = estimate_gamma(oracle, SCHED, oracle.sample_data, 20, 1000, generator=torch.Generator().manual_seed(0),
                           progress=False)
    assert float(gamma.sum()) == pytest.approx(888.70941, abs=1e-3)
    return oracle, gamma


@pytest.mark.parametrize("trajectory,method", list(GOLDEN))
def test_full_loop_golden_values(golden_setup, trajectory, method):
    oracle, gamma = golden_setup
    taus = make_trajectory(trajectory, 1000, 10, gamma, schedule=SCHED)
    if trajectory == "optimal":
        assert taus == [1, 33, 79, 174, 217, 284, 410, 498, 594, 1000]
    x = sample(oracle, SCHED, taus, method, (16, 1, 4, 4), gamma=gamma, generator=torch.Generator().manual_seed(2022),
               clip_sigma_y=1.0 if method == "analytic_ddpm" else None, eta=0.5 if method == "ddim" else 0.0)
    total, mean = GOLDEN[(trajectory, method)]
    assert float(x.abs().sum()) == pytest.approx(total, abs=2e-3)
    assert float(x.mean()) == pytest.approx(mean, abs=2e-6)
