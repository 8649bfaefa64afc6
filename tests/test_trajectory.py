"""Trajectories (spec section 6): golden values, the DP against brute force, policies and errors."""

import itertools
import math
import time

import pytest
import torch

from analytic_dpm import NoiseSchedule, make_trajectory
from analytic_dpm.oracles import GaussianOracle
from analytic_dpm.trajectory import (
    monotone_gamma,
    optimal_cost_matrix,
    split_poorly_estimated_tail,
    trajectory_cost,
)


def _cost(schedule, traj, gamma, monotone=True):
    return trajectory_cost(schedule, traj, monotone_gamma(schedule, gamma) if monotone else gamma)


def test_even_golden():
    assert make_trajectory("even", 1000, 10) == [1, 112, 223, 334, 445, 556, 667, 778, 889, 1000]
    # K = 25 has exact halves: 1 + 4 * 41.625 = 167.5 -> 168 (half to even)
    assert make_trajectory("even", 1000, 25)[:6] == [1, 43, 84, 126, 168, 209]
    assert make_trajectory("even", 1000, 7) == [1, 168, 334, 500, 667, 834, 1000]
    assert make_trajectory("even", 4000, 10) == [1, 445, 890, 1334, 1778, 2223, 2667, 3111, 3556, 4000]
    assert make_trajectory("even", 1000, 1000) == list(range(1, 1001))
    assert make_trajectory("even", 1000, 1) == [1000]
    assert make_trajectory("even", 1000, 2) == [1, 1000]


def test_quadratic_golden_and_duplicate_policy():
    assert make_trajectory("quadratic", 1000, 10) == [1, 10, 40, 89, 159, 247, 356, 484, 633, 801]
    assert make_trajectory("quadratic", 4000, 10) == [1, 40, 159, 356, 633, 988, 1423, 1936, 2529, 3201]
    # DDIM's float evaluation: 0.8*1000*(9/15)^2 = 288 exactly, evaluated as 287.99.. -> 288 after +1
    assert make_trajectory("quadratic", 1000, 16)[9] == 288
    assert len(make_trajectory("quadratic", 1000, 29)) == 29
    with pytest.raises(ValueError, match="largest K without duplicates is 29"):
        make_trajectory("quadratic", 1000, 30)
    dedup = make_trajectory("quadratic", 1000, 100, duplicates="dedupe")
    assert dedup == sorted(set(dedup)) and len(dedup) < 100 and dedup[0] == 1 and dedup[-1] == 801


def _random_gamma(N, seed, high=1.0):
    g = torch.rand(N + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * high
    g[0] = 0
    return g


def _brute_force(schedule, K, gamma, N=None, monotone=True):
    N = N or schedule.N
    J = optimal_cost_matrix(schedule, monotone_gamma(schedule, gamma) if monotone else gamma)
    best, best_path = math.inf, None
    for inner in itertools.combinations(range(2, N), K - 2):
        path = (1, *inner, N)
        c = sum(J[a, b].item() for a, b in zip(path, path[1:]))
        if c < best - 1e-12:
            best, best_path = c, list(path)
    return best, best_path


@pytest.mark.parametrize("seed", [0, 1])
def test_optimal_dp_equals_brute_force_every_K(seed):
    # N = 18 keeps the exhaustive search at 2^16 paths over all K
    sched = NoiseSchedule.cosine(18)
    gamma = _random_gamma(18, seed, high=1.2)  # includes gamma_t > 1
    for K in range(3, 19):
        dp = make_trajectory("optimal", 18, K, gamma, schedule=sched)
        best, _ = _brute_force(sched, K, gamma)
        assert len(dp) == K and dp[0] == 1 and dp[-1] == 18
        assert _cost(sched, dp, gamma) == pytest.approx(best, abs=1e-10)


def test_optimal_dp_equals_brute_force_linear_N25():
    sched = NoiseSchedule.linear(25)
    gamma = GaussianOracle(sched, 0.0, 0.5).gamma() * (1 - 0.3 * _random_gamma(25, 3))
    gamma[0] = 0
    for K in (3, 4, 5, 22, 23, 24, 25):
        dp = make_trajectory("optimal", 25, K, gamma, schedule=sched)
        best, _ = _brute_force(sched, K, gamma)
        assert _cost(sched, dp, gamma) == pytest.approx(best, abs=1e-10)
        # the authors' policy (raw gamma <= 1 here: no tail) is the exact DP on the raw cost
        raw = make_trajectory("optimal", 25, K, gamma, schedule=sched, gamma_policy="authors")
        best_raw = _brute_force(sched, K, gamma, monotone=False)[0]
        assert _cost(sched, raw, gamma, monotone=False) == pytest.approx(best_raw)


def test_monotone_policy_handles_gamma_above_one():
    """Default policy: isotonic fit of U; gamma_t > 1 anywhere keeps every timestep and a finite J."""
    sched = NoiseSchedule.linear(200)
    gamma = GaussianOracle(sched, 0.0, 0.5).gamma()
    exact_U = sched.bbar[1:] / sched.alphas_cumprod[1:] * (1 - gamma[1:])
    assert (exact_U[1:] >= exact_U[:-1]).all()  # the true U is non-decreasing: the oracle agrees
    assert torch.allclose(monotone_gamma(sched, gamma, None), gamma)  # ... so the policy leaves it alone
    noisy = gamma.clone()
    noisy[120:] = 1.05  # a poorly estimated tail
    noisy[60] = 1.2  # and one bad value in the middle
    g2 = monotone_gamma(sched, noisy, None)
    U2 = (1 - g2[1:]) * sched.bbar[1:] / sched.alphas_cumprod[1:]
    assert (g2[1:] <= 1).all() and (U2[1:] - U2[:-1] >= -1e-9).all() and (U2 >= 0).all()
    # the bad value at 60 is pooled with its neighbours; the tail pools at about the last precise level
    assert 0.5 * exact_U[59].item() <= U2[59].item() <= exact_U[60].item()
    assert 0.5 * exact_U[118].item() <= U2[150].item() <= exact_U[118].item() * 1.01
    J = optimal_cost_matrix(sched, g2)
    assert torch.isfinite(J[1:, 1:].triu(1)[torch.ones(200, 200).triu(1).bool()]).all()
    for K in (5, 20, 60):
        traj = make_trajectory("optimal", 200, K, noisy, schedule=sched, data_range=None)
        assert len(traj) == K and traj[0] == 1 and traj[-1] == 200
    with pytest.raises(ValueError, match="unknown gamma_policy"):
        make_trajectory("optimal", 200, 5, noisy, schedule=sched, gamma_policy="clip")


def test_isotonic_fit_against_brute_force():
    from analytic_dpm.trajectory import isotonic_increasing

    v = torch.tensor([1.0, 3.0, 2.0, 4.0, 0.0, 5.0], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0, 3.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    fit = isotonic_increasing(v, w)
    assert (fit[1:] >= fit[:-1]).all()
    # pooled blocks: {3, 2} -> (3 + 6)/4 = 2.25; {4, 0} -> 2 < 2.25 so {3, 2, 4, 0} -> (3 + 6 + 4 + 0)/6
    assert fit.tolist() == pytest.approx([1.0, 13 / 6, 13 / 6, 13 / 6, 13 / 6, 5.0])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # the fit never has a larger weighted squared error than the best constant
        v, w = torch.randn(12, generator=g, dtype=torch.float64), torch.rand(12, generator=g, dtype=torch.float64)
        fit = isotonic_increasing(v, w)
        const = (v * w).sum() / w.sum()
        assert (w * (fit - v) ** 2).sum() <= (w * (const - v) ** 2).sum() + 1e-12
        assert (fit[1:] >= fit[:-1] - 1e-12).all()


def test_authors_policy_excludes_the_tail():
    """gamma_t > 1 from n0 on: the last 2 (N - n0 + 1) steps are spaced evenly, the DP covers the rest."""
    sched = NoiseSchedule.linear(200)
    gamma = GaussianOracle(sched, 0.0, 0.5).gamma()
    gamma[171] = 1.02  # first poorly estimated value: n0 = 171 -> num_bad = 60, N1 = 140
    gamma[185] = 1.1
    assert split_poorly_estimated_tail(gamma, 200, 20) == (16, 140, 4)  # K1 = ceil((1 - 0.8 * 60/200) * 20)
    for K in (3, 5, 20, 60, 150):
        K1, N1, K2 = split_poorly_estimated_tail(gamma, 200, K)
        traj = make_trajectory("optimal", 200, K, gamma, schedule=sched, gamma_policy="authors")
        assert len(traj) == K and traj[0] == 1 and traj[-1] == 200 and K2 >= 1
        head, tail = traj[:K1], traj[K1:]
        assert head[-1] == N1 and all(t > N1 for t in tail)
        assert tail == [round(200 - k * (200 - N1) / K2) for k in range(K2)][::-1]
    with pytest.raises(ValueError, match="recalibrate gamma"):
        bad = gamma.clone()
        bad[90] = 1.5  # num_bad = 222 > N
        make_trajectory("optimal", 200, 10, bad, schedule=sched, gamma_policy="authors")


def test_tail_head_matches_brute_force():
    sched = NoiseSchedule.cosine(30)
    gamma = _random_gamma(30, 7, high=1.0)
    gamma[28] = 1.01  # num_bad = 6, N1 = 24
    for K in (4, 6, 8):
        K1, N1, K2 = split_poorly_estimated_tail(gamma, 30, K)
        traj = make_trajectory("optimal", 30, K, gamma, schedule=sched, gamma_policy="authors")
        best, _ = _brute_force(sched, K1, gamma, N=N1, monotone=False)
        assert _cost(sched, traj[:K1], gamma, monotone=False) == pytest.approx(best, abs=1e-10)


def test_optimal_beats_even_on_its_own_objective():
    sched = NoiseSchedule.linear(1000)
    gamma = GaussianOracle(sched, 0.0, 0.5).gamma() * 0.9
    gamma[0] = 0
    for K in (10, 50):
        ot = make_trajectory("optimal", 1000, K, gamma, schedule=sched)
        et = make_trajectory("even", 1000, K)
        assert _cost(sched, ot, gamma) <= _cost(sched, et, gamma) + 1e-12


def test_optimal_K_equals_N_is_fast():
    sched = NoiseSchedule.linear(1000)
    gamma = GaussianOracle(sched, 0.0, 0.5).gamma()
    t0 = time.perf_counter()
    traj = make_trajectory("optimal", 1000, 1000, gamma, schedule=sched)
    assert traj == list(range(1, 1001))
    assert time.perf_counter() - t0 < 30  # generous: the benchmark in bench/ gives the real figure


def test_explicit_trajectories_validated():
    assert make_trajectory([1, 5, 10], 10) == [1, 5, 10]
    assert make_trajectory(torch.tensor([2, 3]), 10, 2) == [2, 3]
    with pytest.raises(ValueError, match="strictly increasing"):
        make_trajectory([1, 5, 5], 10)
    with pytest.raises(ValueError, match="strictly increasing"):
        make_trajectory([1, 7, 5], 10)
    with pytest.raises(ValueError, match="1..N"):
        make_trajectory([0, 5], 10)
    with pytest.raises(ValueError, match="1..N"):
        make_trajectory([1, 11], 10)
    with pytest.raises(ValueError, match="K = 3"):
        make_trajectory([1, 2], 10, 3)
    with pytest.raises(ValueError, match="at least one"):
        make_trajectory([], 10)


def test_bad_input_errors():
    sched = NoiseSchedule.linear(100)
    gamma = GaussianOracle(sched, 0.0, 0.5).gamma()
    with pytest.raises(ValueError, match="unknown trajectory kind 'uniform'"):
        make_trajectory("uniform", 100, 10)
    with pytest.raises(ValueError, match="exceeds N"):
        make_trajectory("even", 100, 101)
    with pytest.raises(ValueError, match=">= 1"):
        make_trajectory("even", 100, 0)
    with pytest.raises(ValueError, match="length N\\+1"):
        make_trajectory("optimal", 100, 10, gamma[:-1], schedule=sched)
    bad = gamma.clone()
    bad[7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        make_trajectory("optimal", 100, 10, bad, schedule=sched)
    with pytest.raises(ValueError, match="not defined for the DDIM"):
        make_trajectory("optimal", 100, 10, gamma, schedule=sched, forward="ddim")
    with pytest.raises(ValueError, match="needs gamma"):
        make_trajectory("optimal", 100, 10, schedule=sched)
    with pytest.raises(ValueError, match="needs the noise schedule"):
        make_trajectory("optimal", 100, 10, gamma)
    with pytest.raises(ValueError, match="duplicates policy"):
        make_trajectory("quadratic", 100, 5, duplicates="keep")
