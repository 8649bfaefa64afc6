"""Negative ELBO (spec section 8) against the closed-form ground truth of spec section 9."""

import logging
import math

import pytest
import torch

from analytic_dpm import NoiseSchedule, estimate_gamma, make_trajectory, nll_bpd
from analytic_dpm.likelihood import discretized_gaussian_log_prob, normal_cdf
from analytic_dpm.oracles import GaussianMixtureOracle, GaussianOracle

SCHED = NoiseSchedule.linear(1000)
ORACLE = GaussianOracle(SCHED, mean=0.0, std=0.5, shape=(1, 8, 8))
EXACT = 0.5 * math.log2(2 * math.pi * math.e * 0.25)  # 1.0471 bits/dim
CONTINUOUS = dict(decoder="continuous", decoder_variance="method", clip_x0=False, data_range=None)
BASELINES = ("ddpm_beta", "ddpm_beta_tilde")


@pytest.fixture(scope="module")
def gaussian_data():
    # 8192 x 64 values: the Monte-Carlo std of the mean NELBO is ~0.0025 bits/dim (eps and data noise)
    return ORACLE.sample_data(8192, torch.Generator().manual_seed(0))


def test_closed_form_gamma_is_exact():
    assert abs(EXACT - 1.0471) < 1e-4


def _check_gaussian_nelbo(x0, kind, K, tol):
    gamma = ORACLE.gamma()
    traj = make_trajectory(kind, 1000, K, gamma, schedule=SCHED)
    bpd = nll_bpd(ORACLE, SCHED, traj, x0, ["analytic_ddpm", *BASELINES], gamma=gamma, batch_size=16384,
                  generator=torch.Generator().manual_seed(K), **CONTINUOUS)
    analytic = bpd["analytic_ddpm"].mean().item()
    assert analytic == pytest.approx(EXACT, abs=tol)
    for b in BASELINES:  # same network pass and noise for all methods: the gaps are exact comparisons
        assert bpd[b].mean().item() > analytic + 1e-4


@pytest.mark.parametrize("kind", ["even", "optimal"])
@pytest.mark.parametrize("K", [2, 10, 100])
def test_gaussian_oracle_nelbo_equals_exact_nll(gaussian_data, kind, K):
    _check_gaussian_nelbo(gaussian_data, kind, K, tol=0.01)


def test_gaussian_oracle_nelbo_K_equals_N(gaussian_data):
    """K = N: the optimal trajectory is the even one ([1..N]), so one NELBO covers both (~10 s on 2 cores)."""
    gamma = ORACLE.gamma()
    assert make_trajectory("optimal", 1000, 1000, gamma, schedule=SCHED) == list(range(1, 1001))
    _check_gaussian_nelbo(gaussian_data, "even", 1000, tol=0.01)


def test_terms_breakdown_and_single_network_pass(gaussian_data):
    calls = []

    def model(x, t):
        calls.append(x.shape[0])
        return ORACLE(x, t)

    traj = make_trajectory("even", 1000, 10)
    x0 = gaussian_data[:64]  # 64 images
    bpd, terms = nll_bpd(model, SCHED, traj, x0, ["ddpm_beta", "ddpm_beta_tilde", "analytic_ddpm", "ddim"],
                         gamma=ORACLE.gamma(), return_terms=True, **CONTINUOUS)
    assert sum(calls) == 10 * 64  # K network calls for all DDPM methods together
    for m in ("ddpm_beta", "analytic_ddpm"):
        assert terms[m].shape == (64, 11)
        assert torch.allclose(terms[m].sum(1), bpd[m])
        assert (terms[m][:, 1:] >= -1e-12).all()  # KL terms and the prior are non-negative
    assert torch.isnan(bpd["ddim"]).all()
    calls.clear()
    nll_bpd(model, SCHED, traj, x0, ["analytic_ddpm"], gamma=ORACLE.gamma(), batch_size=256, **CONTINUOUS)
    assert calls == [256, 256, 128]  # (timestep, image) pairs stacked into full network batches


def test_gmm_oracle_analytic_beats_baselines_and_optimal_no_worse():
    """Mixture data inside [-1, 1], Monte-Carlo gamma (M = 200): analytic_ddpm beats both baselines at every K on
    both trajectories, and the optimal trajectory is no worse than the even one (up to 3 standard errors)."""
    sched = SCHED
    oracle = GaussianMixtureOracle(sched, means=[-0.4, 0.4], stds=[0.25, 0.2], weights=[0.4, 0.6], shape=(1, 4, 4))
    gamma = estimate_gamma(oracle, sched, oracle.sample_data, 200, 50000,
                           generator=torch.Generator().manual_seed(1), progress=False)
    assert (gamma[1:] > 1).any()  # a realistic calibration: the noisy tail exceeds 1
    x0 = oracle.sample_data(2048, torch.Generator().manual_seed(2))
    opts = dict(CONTINUOUS, data_range=(-1.0, 1.0))
    for K in (5, 10, 50):
        results = {}
        for kind in ("even", "optimal"):
            traj = make_trajectory(kind, 1000, K, gamma, schedule=sched)
            results[kind] = nll_bpd(oracle, sched, traj, x0, ["analytic_ddpm", *BASELINES], gamma=gamma,
                                    batch_size=16384, generator=torch.Generator().manual_seed(3), **opts)
            means = {m: v.mean().item() for m, v in results[kind].items()}
            for b in BASELINES:
                assert means["analytic_ddpm"] < means[b], (K, kind, means)
        et, ot = results["even"]["analytic_ddpm"], results["optimal"]["analytic_ddpm"]
        se = ((et.var() + ot.var()) / len(x0)).sqrt().item()
        assert ot.mean().item() <= et.mean().item() + 3 * se, (K, et.mean(), ot.mean(), se)


def test_discretized_decoder_sums_to_one_and_cdfs_agree():
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, var in [(0.0, 1e-4), (0.3, 0.01), (-0.99, 0.5), (1.2, 0.05)]:
        for cdf in ("tanh", "erf"):
            logp = discretized_gaussian_log_prob(grid, torch.full_like(grid, mean), var, cdf)
            assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)
    u = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    assert (normal_cdf(u, "tanh") - normal_cdf(u, "erf")).abs().max() < 2e-4
    # a confident, correct decoder puts nearly all mass in the true bin
    x = grid[100:101]
    assert discretized_gaussian_log_prob(x, x.clone(), 1e-8).item() == pytest.approx(0.0, abs=1e-6)


def test_image_nll_paper_protocol_runs_and_ddim_is_nan(caplog):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (8, 1, 8, 8), generator=gen).float() / 127.5 - 1
    traj = make_trajectory("even", 1000, 10)
    with caplog.at_level(logging.WARNING):
        bpd = nll_bpd(ORACLE, SCHED, traj, x0, ["analytic_ddpm", "ddpm_beta", "analytic_ddim"],
                      gamma=ORACLE.gamma())
    assert torch.isfinite(bpd["analytic_ddpm"]).all() and torch.isfinite(bpd["ddpm_beta"]).all()
    assert torch.isnan(bpd["analytic_ddim"]).all()
    assert "not defined" in caplog.text


def test_bad_input():
    x0 = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown method"):
        nll_bpd(ORACLE, SCHED, [1, 10], x0, ["ddpm"])
    with pytest.raises(ValueError, match="unknown decoder"):
        nll_bpd(ORACLE, SCHED, [1, 10], x0, ["ddpm_beta"], decoder="logistic")
    with pytest.raises(ValueError, match="needs gamma"):
        nll_bpd(ORACLE, SCHED, [1, 10], x0, ["analytic_ddpm"])
    assert nll_bpd(ORACLE, SCHED, [1, 10], x0, ["ddim"])["ddim"].isnan().all()  # no gamma needed
