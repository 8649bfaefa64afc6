"""The Monte-Carlo per-pair cost table of the optimal trajectory (spec sections 6 and 11) and the DP on it."""

import itertools
import math

import pytest
import torch

from analytic_dpm import NoiseSchedule, estimate_pair_costs, make_trajectory, optimal_trajectory_from_costs
from analytic_dpm import pair_costs as pc
from analytic_dpm.oracles import GaussianOracle
from analytic_dpm.trajectory import path_cost
from analytic_dpm.variance import pair_variance, step_coefficients

N = 100
SCHED = NoiseSchedule.linear(N)
SHAPE = (1, 4, 4)
STD = torch.logspace(math.log10(0.02), math.log10(1.0), 16).reshape(SHAPE)
ANISO = GaussianOracle(SCHED, mean=0.1, std=STD, shape=SHAPE)
UNBOUNDED = dict(clip_x0=False, data_range=None)


def _closed_form(cov_of_t, sched=SCHED):
    """J(s, t) = mean over pixels of 0.5 log2(sigma_i^2 / lambda^2), sigma_i^2 = lambda^2 + c^2 Cov_i[x_0 | x_t], and
    the s.e. of its Monte-Carlo estimate from M images: per pixel the mean-error part is 0.5 rho (chi^2_1 - 1),
    rho = c^2 Cov / sigma^2, of variance rho^2 / 2."""
    n = sched.N
    J = torch.full((n + 1, n + 1), math.inf, dtype=torch.float64)
    var_per_image = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for t in range(2, n + 1):
        s = torch.arange(1, t)
        lam2, c = step_coefficients(sched, s, t, "ddpm")
        excess = c[:, None] ** 2 * cov_of_t(t).flatten()[None, :]  # [S, d]
        sigma2 = lam2[:, None] + excess
        J[1:t, t] = (0.5 * torch.log2(sigma2 / lam2[:, None])).mean(1)
        var_per_image[1:t, t] = (0.5 * (excess / sigma2) ** 2).sum(1)
    return J, var_per_image


def test_anisotropic_gaussian_table_equals_closed_form():
    """Exact NPR heads: E L_{s|t} = sum over pixels of 0.5 log(sigma_i^2 / lambda^2), the mean-error part cancels."""
    M = 64
    J = estimate_pair_costs(ANISO.head_model("npr"), SCHED, ANISO.sample_data, "npr_ddpm", M, 4096,
                            generator=torch.Generator().manual_seed(0), progress=False, **UNBOUNDED)
    assert J.shape == (N + 1, N + 1) and J.dtype == torch.float64
    exact, var1 = _closed_form(ANISO.posterior_variance_per_pixel)
    used = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(J), used)  # +inf in row 0 and for s >= t
    se = var1[used].sqrt() / math.sqrt(M) / (16 * math.log(2))
    z = (J[used] - exact[used]) / se
    assert z.abs().max() < 5.5, z.abs().max()  # (the entries of a column share their noise: no test on z's mean)
    assert exact[used].max() > 1.0  # the costs are far from zero: the check is not vacuous


def test_isotropic_analytic_table_is_spec6_cost():
    """analytic_ddpm on isotropic Gaussian data (exact gamma): J(s, t) = 0.5 log2(sigma*^2 / lambda^2) (spec 6)."""
    iso = GaussianOracle(SCHED, mean=0.0, std=0.5, shape=SHAPE)
    M = 64
    J = estimate_pair_costs(iso, SCHED, iso.sample_data, "analytic_ddpm", M, 4096, gamma=iso.gamma(),
                            generator=torch.Generator().manual_seed(1), progress=False, **UNBOUNDED)
    exact, var1 = _closed_form(iso.posterior_variance_per_pixel)
    used = torch.isfinite(exact)
    z = (J[used] - exact[used]) / (var1[used].sqrt() / math.sqrt(M) / (16 * math.log(2)))
    assert z.abs().max() < 5.5, z.abs().max()


def test_per_pixel_blocks_and_head_kinds_agree(monkeypatch):
    """The block size of the per-pixel KL does not change the table; SN and NPR heads give the same table where
    float32 keeps SN's h - eps_hat^2 exact enough (small t)."""
    kw = dict(generator=None, progress=False, **UNBOUNDED)
    npr = ANISO.head_model("npr")
    a = estimate_pair_costs(npr, SCHED, ANISO.sample_data, "npr_ddpm", 8, 300, **kw)
    monkeypatch.setattr(pc, "BLOCK_ELEMENTS", 100)  # ~one pair per block
    b = estimate_pair_costs(npr, SCHED, ANISO.sample_data, "npr_ddpm", 8, 300, **kw)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    sn = estimate_pair_costs(ANISO.head_model("sn"), SCHED, ANISO.sample_data, "sn_ddpm", 8, 300, **kw)
    torch.testing.assert_close(sn[1:20, :21], a[1:20, :21], rtol=1e-3, atol=1e-4)


def test_one_network_call_per_timestep_and_image():
    calls = []
    head = ANISO.head_model("sn")

    def model(x, t):
        calls.append((x.shape[0], sorted(set(t.tolist()))))
        return head(x, t)

    pool = ANISO.sample_data(40, torch.Generator().manual_seed(0))
    estimate_pair_costs(model, SCHED, pool, "sn_ddpm", 25, 64, progress=False, **UNBOUNDED)
    assert sum(n for n, _ in calls) == N * 25  # N calls per image
    assert all(n == 64 for n, _ in calls[:-1])  # full batches: (t, image) pairs stacked t-major
    assert calls[0][1] == [1, 2, 3] and calls[-1][1][-1] == N


def _brute_force(J, K):
    n = J.shape[0] - 1
    return min(sum(J[a, b].item() for a, b in zip(p, p[1:]))
               for p in ((1, *inner, n) for inner in itertools.combinations(range(2, n), K - 2)))


@pytest.mark.parametrize("seed", [0, 1])
def test_dp_on_a_table_equals_brute_force(seed):
    n = 14
    J = torch.rand(n + 1, n + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.3
    J[0] = -100.0  # row 0 (the decoder) is never read: tau_1 = 1 is fixed
    J = torch.where(torch.arange(n + 1)[:, None] < torch.arange(n + 1)[None, :], J, math.inf)
    for K in range(1, n + 1):
        taus = optimal_trajectory_from_costs(J, K)
        assert len(taus) == K and taus[-1] == n and (K == 1 or taus[0] == 1)
        if K >= 3:
            assert path_cost(J, taus) == pytest.approx(_brute_force(J, K), abs=1e-12)
        assert make_trajectory("optimal", n, K, pair_costs=J) == taus


def test_dp_on_the_closed_form_analytic_table_is_the_gamma_dp():
    """log(sigma*^2 / lambda^2) differs from spec 6's J = log(1 - beta_{t|s} gamma_t / bbar_t) by a telescoping term,
    so the DP on the table of analytic_ddpm's own variances (gamma <= 1, no clip) is the gamma DP."""
    gamma = GaussianOracle(SCHED, 0.0, 0.5).gamma() * (1 - 0.3 * torch.rand(N + 1, generator=torch.Generator()
                                                                            .manual_seed(0), dtype=torch.float64))
    gamma[0] = 0
    J = torch.full((N + 1, N + 1), math.inf, dtype=torch.float64)
    for t in range(2, N + 1):
        s = torch.arange(1, t)
        sigma2 = pair_variance(SCHED, s, t, "analytic_ddpm", gamma, data_range=None)
        J[1:t, t] = torch.log(sigma2 / SCHED.btilde(s, t))
    for K in (3, 5, 10, 30):
        from_table = optimal_trajectory_from_costs(J, K)
        from_gamma = make_trajectory("optimal", N, K, gamma, schedule=SCHED, data_range=None, gamma_policy="authors")
        assert path_cost(J, from_table) == pytest.approx(path_cost(J, from_gamma), abs=1e-9)


def test_errors():
    with pytest.raises(ValueError, match="DDPM forward"):
        estimate_pair_costs(ANISO.head_model("sn"), SCHED, ANISO.sample_data, "sn_ddim", 4, 8, progress=False)
    with pytest.raises(ValueError, match="needs a head model"):
        estimate_pair_costs(ANISO, SCHED, ANISO.sample_data, "npr_ddpm", 4, 8, progress=False)
    with pytest.raises(ValueError, match="exceeds the pool"):
        estimate_pair_costs(ANISO.head_model("npr"), SCHED, torch.zeros(3, *SHAPE), "npr_ddpm", 4, 8, progress=False)
    with pytest.raises(ValueError, match="needs gamma"):
        estimate_pair_costs(ANISO, SCHED, ANISO.sample_data, "analytic_ddpm", 4, 8, progress=False)
    good = torch.zeros(N + 1, N + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="square"):
        optimal_trajectory_from_costs(good[:, :-1], 3)
    bad = good.clone()
    bad[3, 7] = math.nan
    with pytest.raises(ValueError, match="finite for every 1 <= s < t <= N"):
        optimal_trajectory_from_costs(bad, 3)
    with pytest.raises(ValueError, match="N = 100 but the schedule has N = 50"):
        make_trajectory("optimal", 50, 3, pair_costs=good)
    with pytest.raises(ValueError, match="not defined for the DDIM"):
        make_trajectory("optimal", N, 3, pair_costs=good, forward="ddim")


class ImperfectHead:
    """An imperfect model (eps_hat shrunk by 20%, NPR head off by +0.3): the mean-error part of L_{s|t} no longer
    cancels, so the table must carry it."""

    head_kind = "npr"

    def __init__(self, oracle):
        self.oracle = oracle

    def __call__(self, x, t):
        eps, var = self.oracle.eps_and_variance(x, t)
        return (0.8 * eps).to(x.dtype), (var + 0.3).to(x.dtype)


def test_table_entries_are_the_expected_nll_terms():
    """J(s, t) is E L_{s|t} of nll_bpd (the same per-pixel KL): nll_bpd's term of the pair (s, t) on the trajectory
    [s, t], averaged over images, agrees within Monte-Carlo error, for a model whose mean error matters."""
    from analytic_dpm import nll_bpd

    sched = NoiseSchedule.cosine(30)
    oracle = GaussianOracle(sched, mean=0.1, std=STD, shape=SHAPE)
    model = ImperfectHead(oracle)
    M = 512
    J = estimate_pair_costs(model, sched, oracle.sample_data, "npr_ddpm", M, 8192,
                            generator=torch.Generator().manual_seed(0), progress=False, **UNBOUNDED)
    exact_head, _ = _closed_form(oracle.posterior_variance_per_pixel, sched)
    x0 = oracle.sample_data(M, torch.Generator().manual_seed(1))
    for s, t in [(1, 3), (4, 15), (10, 30)]:
        _, terms = nll_bpd(model, sched, [s, t], x0, ["npr_ddpm"], return_terms=True, **UNBOUNDED)
        col = terms["npr_ddpm"][:, 1]
        se = col.std().item() / math.sqrt(M)
        assert J[s, t].item() == pytest.approx(col.mean().item(), abs=5 * math.sqrt(2) * se), (s, t, se)
        assert J[s, t].item() > exact_head[s, t].item() + 10 * se  # the model's errors cost bits: not vacuous
