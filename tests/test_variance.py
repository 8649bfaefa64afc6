"""Reverse variances and Theorem 2 bounds (spec section 4)."""

import math

import pytest
import torch

from analytic_dpm import METHODS, NoiseSchedule, reverse_variance, variance_bounds
from analytic_dpm.variance import sampling_clip_value

SCHED = NoiseSchedule.linear(1000)


def _const_gamma(value, N=1000):
    g = torch.full((N + 1,), value, dtype=torch.float64)
    g[0] = 0
    return g


def _tables(n):
    """abar_n and beta_n from a plain Python product: an implementation independent of the library."""
    betas = [0.0] + [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    abar = 1.0
    for i in range(1, n + 1):
        abar *= 1 - betas[i]
    return abar


@pytest.mark.parametrize("s,t,g", [(10, 500, 0.5), (1, 2, 0.9), (100, 101, 0.3), (250, 1000, 0.99)])
def test_analytic_ddpm_golden_against_closed_form(s, t, g):
    abar_s, abar_t = _tables(s), _tables(t)
    alpha_ts = abar_t / abar_s
    beta_ts, bbar_t = 1 - alpha_ts, 1 - abar_t
    # DDPM special case (spec section 4): sigma^2 = (beta_{t|s} / alpha_{t|s}) (1 - beta_{t|s} gamma_t / bbar_t)
    expected = beta_ts / alpha_ts * (1 - beta_ts * g / bbar_t)
    U = bbar_t / abar_t * (1 - g)
    if U > 1:  # the data-range clip binds: recompute with U clipped to 1
        lam2 = beta_ts * (1 - abar_s) / bbar_t
        c = math.sqrt(abar_s) - math.sqrt((1 - abar_s - lam2) * abar_t / bbar_t)
        expected = lam2 + c**2
    got = reverse_variance(SCHED, [s, t], "analytic_ddpm", _const_gamma(g))[1].item()
    assert got == pytest.approx(expected, rel=1e-9)
    assert reverse_variance(SCHED, [s, t], "ddpm_beta")[1].item() == pytest.approx(beta_ts, rel=1e-9)
    assert reverse_variance(SCHED, [s, t], "ddpm_beta_tilde")[1].item() == pytest.approx(
        beta_ts * (1 - abar_s) / bbar_t, rel=1e-9)


def test_golden_numbers():
    g = _const_gamma(0.5)
    assert reverse_variance(SCHED, [10, 500], "analytic_ddpm", g).tolist() == pytest.approx(
        [0.0009491961393849015, 0.9996765054157865], rel=1e-10)
    assert reverse_variance(SCHED, [1, 100, 1000], "analytic_ddim", g).tolist() == pytest.approx(
        [5.000500050005001e-05, 0.05405847073351576, 0.8931605343033677], rel=1e-10)
    assert reverse_variance(SCHED, [1, 2], "ddpm_beta_tilde").tolist() == pytest.approx([0.0, 5.453187661302606e-05])


@pytest.mark.parametrize("forward,method,eta", [("ddpm", "analytic_ddpm", 0.0), ("ddim", "analytic_ddim", 0.0),
                                                ("ddim", "analytic_ddim", 0.5)])
@pytest.mark.parametrize("data_range", [(-1.0, 1.0), None])
def test_analytic_within_theorem2_bounds(forward, method, eta, data_range):
    gen = torch.Generator().manual_seed(0)
    traj = sorted(set(torch.randint(1, 1001, (60,), generator=gen).tolist()))
    for _ in range(5):
        gamma = torch.rand(1001, generator=gen, dtype=torch.float64) * 1.3  # includes gamma > 1
        gamma[0] = 0
        sigma2 = reverse_variance(SCHED, traj, method, gamma, eta=eta, data_range=data_range)
        lower, upper = variance_bounds(SCHED, traj, forward, eta=eta, data_range=data_range)
        assert (lower <= sigma2 * (1 + 1e-12)).all()
        assert (sigma2 <= upper * (1 + 1e-12)).all()
        assert (lower <= upper).all()


def test_upper_bound_is_tighter_of_the_two():
    traj = [1, 50, 300, 1000]
    _, bounded = variance_bounds(SCHED, traj, "ddpm")
    _, unbounded = variance_bounds(SCHED, traj, "ddpm", data_range=None)
    assert (bounded <= unbounded).all() and (bounded < unbounded).any()
    # gamma = 0 means U_t = bbar_t / abar_t (the largest): unbounded data reaches the first bound
    sigma2 = reverse_variance(SCHED, traj, "analytic_ddpm", _const_gamma(0.0), data_range=None)
    assert torch.allclose(sigma2, unbounded, rtol=1e-10)


def test_analytic_collapses_to_lambda_when_U_is_zero():
    traj = [1, 10, 200, 999]
    for method, forward, eta in [("analytic_ddpm", "ddpm", 0.0), ("analytic_ddim", "ddim", 0.0),
                                 ("analytic_ddim", "ddim", 0.7)]:
        lam2, _ = variance_bounds(SCHED, traj, forward, eta=eta)
        for g in (1.0, 1.2):  # gamma = 1 gives U = 0; gamma > 1 is clipped to U = 0
            sigma2 = reverse_variance(SCHED, traj, method, _const_gamma(g), eta=eta)
            assert torch.allclose(sigma2, lam2, rtol=1e-12, atol=0)


def test_ddim_eta_and_sampling_clip():
    traj = [1, 10, 200, 999]
    assert (reverse_variance(SCHED, traj, "ddim") == 0).all()
    eta1 = reverse_variance(SCHED, traj, "ddim", eta=1.0)
    assert torch.allclose(eta1, reverse_variance(SCHED, traj, "ddpm_beta_tilde"))
    g = _const_gamma(0.0)
    plain = reverse_variance(SCHED, traj, "analytic_ddpm", g)
    clipped = reverse_variance(SCHED, traj, "analytic_ddpm", g, clip_sigma_y=2)
    cap = (2 * 2 / 255 * math.sqrt(math.pi / 2)) ** 2
    assert sampling_clip_value(2) == pytest.approx(cap)
    assert clipped[1].item() == pytest.approx(min(plain[1].item(), cap))
    assert plain[1] > cap  # the clip binds here
    assert torch.equal(clipped[[0, 2, 3]], plain[[0, 2, 3]])  # only the pair (tau_1, tau_2)


def test_bad_input():
    g = _const_gamma(0.5)
    with pytest.raises(ValueError, match="unknown method 'ddpm_sigma'"):
        reverse_variance(SCHED, [1, 2], "ddpm_sigma", g)
    with pytest.raises(ValueError, match="needs gamma"):
        reverse_variance(SCHED, [1, 2], "analytic_ddpm")
    with pytest.raises(ValueError, match="length N\\+1"):
        reverse_variance(SCHED, [1, 2], "analytic_ddpm", g[:10])
    g_nan = g.clone()
    g_nan[3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        reverse_variance(SCHED, [1, 2], "analytic_ddim", g_nan)
    with pytest.raises(ValueError, match="strictly increasing"):
        reverse_variance(SCHED, [5, 2], "ddpm_beta")
    with pytest.raises(ValueError, match="unknown forward"):
        variance_bounds(SCHED, [1, 2], "sde")
    assert set(METHODS) == {"ddpm_beta", "ddpm_beta_tilde", "analytic_ddpm", "ddim", "analytic_ddim"}
