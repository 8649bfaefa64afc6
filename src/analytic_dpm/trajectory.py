"""Sampling trajectories 1 <= tau_1 < ... < tau_K <= N (spec section 6).

Kinds:
    even       tau_k = round(1 + (k-1)(N-1)/(K-1)) (Python round, half to even)
    quadratic  tau_k = floor(((k-1) sqrt(0.8 N)/(K-1))^2) + 1, DDIM's; duplicates appear for large K
               (K >= 30 at N = 1000). Policy ``duplicates="reject"`` (default) raises a ValueError that
               names the largest K without duplicates; ``duplicates="dedupe"`` drops the repeats and
               returns FEWER than K timesteps (the caller must record the actual length).
    optimal    the dynamic programme of spec section 6 on the analytic DDPM cost (needs gamma), or on a Monte-Carlo
               per-pair cost table (``pair_costs``: the covariance-head methods, spec section 11; see pair_costs.py).
K = 1 is the single step [N] for every kind.

Optimal trajectory (spec section 6): J(s, t) = log(1 - beta_{t|s} gamma_t / bbar_t), the DDPM form of
log(sigma*^2 / lambda^2) without the telescoping constant sum_k log(bbar_t / (alpha_{t|s} bbar_s)), which only
depends on (tau_1, tau_K) = (1, N).

Monte-Carlo noise in gamma, and gamma_t > 1 (``gamma_policy``). U_t = bbar_t / abar_t (1 - gamma_t) multiplies
gamma's error by 1/abar_t (~2.5e4 at t = N on the linear schedule), so at large t the estimate is mostly noise, and
often gamma_t > 1 (U_t < 0, clipped to 0). A U_t that is wrongly 0 makes a giant jump (small s, large t) look free
to the DP. Two policies:
  * ``"monotone"`` (default): the DP uses U'_t, the weighted isotonic (non-decreasing) least-squares fit of the
    raw U_t with weights 1/Var(U_t) = (abar_t / bbar_t)^2, clipped to [0, ((b-a)/2)^2]; i.e. J sees
    gamma'_t = 1 - U'_t abar_t / bbar_t. Justification: the true U*_t = E tr Cov[x_0|x_t]/d is non-decreasing in t,
    because x_{t'} (t' > t) is x_t plus independent noise, and by the law of total variance
    E Var(x_0|x_{t'}) = E Var(x_0|x_t) + E Var(E[x_0|x_t] | x_{t'}). The fit is the maximum-likelihood estimate
    under that constraint: the noisy large-t estimates are pooled with the precise earlier ones, every timestep
    stays in the DP and J is always defined. The sampler and the NLL still use the variance of spec section 4.
  * ``"authors"``: the authors' code. From the first n0 with gamma_{n0} > 1, the last num_bad = 2 (N - n0 + 1)
    steps are excluded from the DP; it places K1 = ceil((1 - 0.8 num_bad / N) K) points on [1, N1 = N - num_bad]
    and the remaining K2 = K - K1 >= 1 points evenly on (N1, N] (tau = round(N - k (N - N1)/K2), k = 0..K2-1),
    with J on the raw gamma. If the tail would swallow the whole range (num_bad >= N - 1) a ValueError asks for a
    better calibration. This reproduces the paper's trajectories but is fragile: one noisy gamma_n > 1 at
    moderate n discards a large part of the range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .schedule import NoiseSchedule
from .validation import check_gamma, check_K, validate_trajectory
from .variance import DataRange

TRAJECTORY_KINDS = ("even", "quadratic", "optimal")
QUADRATIC_DUPLICATES = ("reject", "dedupe")
GAMMA_POLICIES = ("monotone", "authors")


def even_trajectory(N: int, K: int) -> list[int]:
    """ET: tau_k = round(1 + (k-1)(N-1)/(K-1)); tau_1 = 1, tau_K = N."""
    check_K(K, N)
    if K == 1:
        return [N]
    # (k-1)(N-1)/(K-1) is a correctly rounded float division, so exact halves stay exact
    # and Python's round breaks them to even, as the spec says.
    return [round(1 + (k - 1) * (N - 1) / (K - 1)) for k in range(1, K + 1)]


def quadratic_trajectory(N: int, K: int, duplicates: str = "reject") -> list[int]:
    """DDIM's quadratic trajectory: tau_k = floor(((k-1) sqrt(0.8 N)/(K-1))^2) + 1 (see ``_quadratic_raw``)."""
    check_K(K, N)
    if duplicates not in QUADRATIC_DUPLICATES:
        raise ValueError(f"unknown duplicates policy {duplicates!r}; choose one of {', '.join(QUADRATIC_DUPLICATES)}")
    if K == 1:
        return [N]
    taus = _quadratic_raw(N, K)
    if len(set(taus)) == len(taus):
        return taus
    if duplicates == "dedupe":
        return sorted(set(taus))
    k_max = max((k for k in range(2, K) if len(set(_quadratic_raw(N, k))) == k), default=1)
    raise ValueError(
        f"the quadratic trajectory for N = {N}, K = {K} has duplicate timesteps (the largest K without "
        f"duplicates is {k_max}); use the even or optimal trajectory, or duplicates='dedupe' to drop repeats "
        "(fewer steps than K)"
    )


def _quadratic_raw(N: int, K: int) -> list[int]:
    """The quadratic formula as DDIM's code evaluates it, duplicates included (K >= 2).

    float64 ``linspace(0, sqrt(0.8 N), K) ** 2`` floored, + 1: where the exact square is an integer
    (e.g. 288 at N = 1000, K = 16) rounding gives 287.99..., floored to one less than exact
    arithmetic would. We keep the published trajectories, so results compare with DDIM's and the paper's.
    """
    return [int(v) + 1 for v in np.linspace(0.0, np.sqrt(0.8 * N), K) ** 2]


def isotonic_increasing(values: Tensor, weights: Tensor) -> Tensor:
    """Weighted least-squares fit of a non-decreasing sequence (pool adjacent violators), float64."""
    v, w = values.double().tolist(), weights.double().tolist()
    means, wsum, sizes = [], [], []
    for x, wt in zip(v, w):
        means.append(x)
        wsum.append(wt)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:  # pool the violating pair of blocks
            m2, w2, n2 = means.pop(), wsum.pop(), sizes.pop()
            total = wsum[-1] + w2
            means[-1] = (means[-1] * wsum[-1] + m2 * w2) / total
            wsum[-1] = total
            sizes[-1] += n2
    out = [m for m, n in zip(means, sizes) for _ in range(n)]
    return torch.tensor(out, dtype=torch.float64, device=values.device)


def monotone_gamma(schedule: NoiseSchedule, gamma: Tensor, data_range: DataRange = (-1.0, 1.0)) -> Tensor:
    """gamma'_t = 1 - U'_t abar_t / bbar_t, with U' the inverse-variance weighted isotonic (non-decreasing) fit
    of the raw U_t = bbar_t / abar_t (1 - gamma_t), then clipped to [0, ((b-a)/2)^2] (module docstring).

    Var(U_t) = (bbar_t / abar_t)^2 Var(gamma_t) and gamma's Monte-Carlo error is about the same at every t, so
    the weights are (abar_t / bbar_t)^2: the precise small-t estimates dominate, the noisy tail barely counts.
    """
    sched = schedule.to(gamma.device)
    abar, bbar = sched.alphas_cumprod[1:], sched.bbar[1:]
    U_raw = bbar / abar * (1 - gamma[1:])
    U = isotonic_increasing(U_raw, (abar / bbar) ** 2)
    half_sq = math.inf if data_range is None else ((data_range[1] - data_range[0]) / 2) ** 2
    U = U.clamp(min=0.0, max=half_sq)
    out = torch.zeros_like(gamma)
    out[1:] = 1 - U * abar / bbar
    return out


def optimal_cost_matrix(schedule: NoiseSchedule, gamma: Tensor) -> Tensor:
    """J[s, t] = log(1 - beta_{t|s} gamma_t / bbar_t) for 1 <= s < t <= N, +inf elsewhere and where the log
    is undefined (gamma_t > 1 can make its argument <= 0); float64 (N+1)^2, built on gamma's device.
    ``gamma`` is used as given: pass ``monotone_gamma(...)`` for the default policy's cost."""
    N = schedule.N
    sched = schedule.to(gamma.device)
    n = torch.arange(N + 1, device=gamma.device)
    bbar, la = sched.bbar, sched.log_alphas_cumprod
    beta_ts = -torch.expm1(la[None, :] - la[:, None])  # beta_{t|s} at [s, t]
    ratio = torch.zeros_like(bbar)
    ratio[1:] = gamma[1:] / bbar[1:]  # gamma_t / bbar_t = the paper's Gamma_t
    arg = 1 - beta_ts * ratio[None, :]
    valid = (n[:, None] >= 1) & (n[:, None] < n[None, :]) & (arg > 0)
    return torch.where(valid, torch.log(arg.clamp(min=torch.finfo(torch.float64).tiny)), math.inf)


def split_poorly_estimated_tail(gamma: Tensor, N: int, K: int) -> tuple[int, int, int]:
    """(K1, N1, K2): K1 DP points on [1, N1], K2 even points on (N1, N] (module docstring)."""
    over = torch.nonzero(gamma[1:] > 1).flatten()
    if over.numel() == 0:
        return K, N, 0
    n0 = int(over[0]) + 1
    num_bad = 2 * (N - n0 + 1)
    if num_bad >= N - 1:
        raise ValueError(
            f"gamma exceeds 1 (poor estimation) from n = {n0} on, which leaves no room for the optimal-"
            "trajectory DP; recalibrate gamma with more samples (M) or use the even trajectory"
        )
    N1 = N - num_bad
    K1 = math.ceil((1.0 - 0.8 * num_bad / N) * K)
    K1 = max(1, min(K1, N1, K - 1))  # at least one point in the tail
    K1 = max(K1, K - num_bad)  # the tail holds at most num_bad points
    return K1, N1, K - K1


def _dp_on_prefix(J: Tensor, N: int, K: int) -> list[int]:
    """argmin over 1 = tau_1 < ... < tau_K = N of sum J(tau_{k-1}, tau_k), using J[:N+1, :N+1]."""
    if K == 1:
        return [1] if N == 1 else [N]
    if K == 2:
        return [1, N]
    device = J.device
    cost = J[1, : N + 1].clone()  # C[2, n] = J(1, n)
    parents = torch.zeros(K + 1, N + 1, dtype=torch.long, device=device)
    parents[2] = 1
    for k in range(3, K + 1):
        # states at step k that can still reach (K, N): n in [k, N - (K - k)]; predecessors s in [k-1, n_hi-1]
        n_hi = N - (K - k)
        s_lo = k - 1
        block = cost[s_lo:n_hi, None] + J[s_lo:n_hi, k : n_hi + 1]
        best, arg = block.min(dim=0)
        cost = torch.full_like(cost, math.inf)
        cost[k : n_hi + 1] = best
        parents[k, k : n_hi + 1] = arg + s_lo
    if not torch.isfinite(cost[N]):
        raise ValueError("the optimal-trajectory DP found no finite path; check gamma and the schedule")
    taus = [N]
    for k in range(K, 1, -1):
        taus.append(int(parents[k, taus[-1]]))
    return taus[::-1]


def optimal_trajectory(
    schedule: NoiseSchedule,
    K: int,
    gamma: Tensor,
    data_range: DataRange = (-1.0, 1.0),
    gamma_policy: str = "monotone",
) -> list[int]:
    """OT: argmin over tau_1 = 1 < ... < tau_K = N of sum_{k=2..K} J(tau_{k-1}, tau_k) (spec section 6).

    C[2, n] = J(1, n); C[k, n] = min_{s<n} C[k-1, s] + J(s, n); backtrack from (K, N). Each k is one
    vectorised min over the band of (s, n) that can still reach (K, N), so K = N costs almost nothing and
    the worst case is O(K (N-K)^2). Runs on gamma's device. gamma_t > 1: see the module docstring.
    """
    N = schedule.N
    check_K(K, N)
    gamma = check_gamma(gamma, N, what="the optimal trajectory")
    if gamma_policy not in GAMMA_POLICIES:
        raise ValueError(f"unknown gamma_policy {gamma_policy!r}; choose one of {', '.join(GAMMA_POLICIES)}")
    if K <= 2:
        return [N] if K == 1 else [1, N]
    if gamma_policy == "monotone":
        return _dp_on_prefix(optimal_cost_matrix(schedule, monotone_gamma(schedule, gamma, data_range)), N, K)
    K1, N1, K2 = split_poorly_estimated_tail(gamma, N, K)
    J = optimal_cost_matrix(schedule, gamma)
    head = _dp_on_prefix(J, N1, K1)
    tail = [round(N - k * (N - N1) / K2) for k in range(K2)][::-1]
    taus = head + tail
    return validate_trajectory(taus, N)


def check_pair_costs(costs: Tensor, N: int | None = None) -> Tensor:
    """A per-pair cost table J[s, t]: float (N+1) x (N+1), finite wherever 1 <= s < t <= N; returned as float64."""
    costs = torch.as_tensor(costs)
    if costs.ndim != 2 or costs.shape[0] != costs.shape[1] or costs.shape[0] < 2:
        raise ValueError(f"pair costs must be a square (N+1) x (N+1) table, got shape {tuple(costs.shape)}")
    if N is not None and costs.shape[0] != N + 1:
        raise ValueError(f"pair costs have N = {costs.shape[0] - 1} but the schedule has N = {N}")
    if not costs.is_floating_point():
        raise ValueError(f"pair costs must be floating point, got {costs.dtype}")
    costs = costs.to(torch.float64)
    n = costs.shape[0]
    idx = torch.arange(n, device=costs.device)
    used = (idx[:, None] >= 1) & (idx[:, None] < idx[None, :])
    if not torch.isfinite(costs[used]).all():
        raise ValueError("pair costs must be finite for every 1 <= s < t <= N (NaN or inf found); re-estimate them "
                         "(analytic_dpm.pair_costs.estimate_pair_costs)")
    return costs


def optimal_trajectory_from_costs(costs: Tensor, K: int) -> list[int]:
    """OT on a given cost table: argmin over 1 = tau_1 < ... < tau_K = N of sum_{k=2..K} J[tau_{k-1}, tau_k] (the DP
    of spec section 6, :func:`optimal_trajectory`'s own). ``costs``: float (N+1) x (N+1), e.g. the Monte-Carlo table
    of :func:`~analytic_dpm.pair_costs.estimate_pair_costs` (only 1 <= s < t <= N is read). Runs on its device."""
    costs = check_pair_costs(costs)
    N = costs.shape[0] - 1
    check_K(K, N)
    if K <= 2:
        return [N] if K == 1 else [1, N]
    return _dp_on_prefix(torch.where(torch.isfinite(costs), costs, math.inf), N, K)


def path_cost(costs: Tensor, trajectory: Sequence[int]) -> float:
    """sum_{k=2..K} J[tau_{k-1}, tau_k] of a trajectory on a given cost table (the DP objective)."""
    costs = check_pair_costs(costs)
    taus = validate_trajectory(trajectory, costs.shape[0] - 1)
    return float(sum(costs[a, b] for a, b in zip(taus, taus[1:])))


def trajectory_cost(schedule: NoiseSchedule, trajectory: Sequence[int], gamma: Tensor) -> float:
    """sum_{k=2..K} J(tau_{k-1}, tau_k): the DP objective of a given trajectory (for tests and reports)."""
    taus = validate_trajectory(trajectory, schedule.N)
    gamma = check_gamma(gamma, schedule.N, what="trajectory_cost")
    J = optimal_cost_matrix(schedule, gamma)
    return float(sum(J[a, b] for a, b in zip(taus, taus[1:])))


def make_trajectory(
    kind: str | Sequence[int],
    N: int,
    K: int | None = None,
    gamma: Tensor | None = None,
    *,
    schedule: NoiseSchedule | None = None,
    forward: str = "ddpm",
    data_range: DataRange = (-1.0, 1.0),
    gamma_policy: str = "monotone",
    duplicates: str = "reject",
    pair_costs: Tensor | None = None,
) -> list[int]:
    """A trajectory of K timesteps in 1..N.

    ``kind`` is ``even``, ``quadratic`` or ``optimal``, or an explicit list of timesteps (validated;
    K, if given, must equal its length). ``optimal`` needs ``gamma`` and the ``schedule`` (its N must
    equal N) and is only defined for the DDPM forward process; ``data_range`` and ``gamma_policy`` shape its
    cost (module docstring). With ``pair_costs`` (a float (N+1) x (N+1) table J[s, t], e.g. from
    :func:`~analytic_dpm.pair_costs.estimate_pair_costs` for the head methods) ``optimal`` runs the same DP on that
    table instead, and needs neither gamma nor the schedule.
    """
    if not isinstance(N, int) or N < 1:
        raise ValueError(f"N must be a positive integer, got {N!r}")
    if not isinstance(kind, str):
        taus = validate_trajectory(kind, N)
        if K is not None and K != len(taus):
            raise ValueError(f"K = {K} but the explicit trajectory has {len(taus)} timesteps")
        return taus
    if kind not in TRAJECTORY_KINDS:
        raise ValueError(
            f"unknown trajectory kind {kind!r}; choose one of {', '.join(TRAJECTORY_KINDS)} or pass a list"
        )
    if K is None:
        raise ValueError("K (number of sampling steps) is required")
    check_K(K, N)
    if kind == "even":
        return even_trajectory(N, K)
    if kind == "quadratic":
        return quadratic_trajectory(N, K, duplicates)
    if forward != "ddpm":
        raise ValueError(
            "the optimal trajectory is not defined for the DDIM forward process (lambda = 0 makes "
            "J = log(sigma^2 / lambda^2) infinite); use even or quadratic for ddim / analytic_ddim"
        )
    if pair_costs is not None:
        if schedule is not None and schedule.N != N:
            raise ValueError(f"schedule has N = {schedule.N} but N = {N} was requested")
        return optimal_trajectory_from_costs(check_pair_costs(pair_costs, N), K)
    if schedule is None:
        raise ValueError("the optimal trajectory needs the noise schedule: pass schedule=NoiseSchedule...")
    if schedule.N != N:
        raise ValueError(f"schedule has N = {schedule.N} but N = {N} was requested")
    if gamma is None:
        raise ValueError("the optimal trajectory needs gamma (analytic_dpm.estimate_gamma or a calibrated checkpoint)")
    return optimal_trajectory(schedule, K, gamma, data_range, gamma_policy)
