"""The plots of Gamma and of the reverse variances, shared by training (the Gamma callback) and evaluation (the report).

* :func:`plot_gamma`: gamma_n against n with the bound gamma <= 1, and U_n = bbar_n / abar_n (1 - gamma_n), the
  estimate of E tr Cov[x_0|x_n] / d (spec sections 4-5);
* :func:`variance_curves` + :func:`plot_variance_bounds`: sigma^2_{s|t} of the DDPM-type methods on even
  trajectories between the Theorem 2 bounds (spec section 4);
* :func:`figure`, :func:`save`, :data:`METHOD_STYLE`: the figure plumbing the report's metric plots use too.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, thread-safe).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["METHOD_STYLE", "figure", "plot_gamma", "plot_variance_bounds", "save", "to_numpy", "variance_curves"]


def to_numpy(x: Any) -> np.ndarray:
    """A tensor (any device) or array-like as a float64 numpy array."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


METHOD_STYLE = {
    "ddpm_beta": dict(color="tab:blue", marker="o"),
    "ddpm_beta_tilde": dict(color="tab:orange", marker="s"),
    "analytic_ddpm": dict(color="tab:red", marker="^"),
    "ddim": dict(color="tab:green", marker="D"),
    "analytic_ddim": dict(color="tab:purple", marker="v"),
}


def plot_gamma(gamma: Any, path: Path, abar: Any = None, title: str = "") -> Path:
    """gamma_n vs n (n >= 1; gamma_0 = 0 is dropped) with the theoretical bound gamma <= 1; with ``abar``
    (length N+1) a second panel shows U_n = bbar_n / abar_n (1 - gamma_n) on a log axis (U_n <= 0 not shown).
    ``gamma`` is one vector of length N+1 or a mapping label -> vector (e.g. several M)."""
    curves = {k: to_numpy(v) for k, v in gamma.items()} if isinstance(gamma, Mapping) else {"gamma": to_numpy(gamma)}
    abar_np = None if abar is None else to_numpy(abar)
    fig = figure(5.0 * (2 if abar_np is not None else 1), 3.8)
    axes = fig.subplots(1, 2 if abar_np is not None else 1, squeeze=False)[0]
    for label, g in curves.items():
        n = np.arange(1, len(g))
        axes[0].plot(n, g[1:], lw=1, label=label)
        if abar_np is not None and len(abar_np) == len(g):
            a = abar_np[1:]
            u = (1 - a) / a * (1 - g[1:])
            axes[1].plot(n, np.where(u > 0, u, np.nan), lw=1, label=label)
    axes[0].axhline(1.0, color="k", ls="--", lw=0.8, label="bound 1")
    axes[0].set_xlabel("n")
    axes[0].set_ylabel(r"$\gamma_n = E\,\|\hat\epsilon(x_n, n)\|^2 / d$")
    axes[0].set_title("gamma")
    axes[0].grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    if abar_np is not None:
        axes[1].set_yscale("log")
        axes[1].set_xlabel("n")
        axes[1].set_ylabel(r"$U_n = \bar\beta_n / \bar\alpha_n (1 - \gamma_n)$")
        axes[1].set_title("U_n (estimate of E tr Cov[x0|xn] / d)")
        axes[1].grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def plot_variance_bounds(bounds: Mapping[Any, Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """``bounds = {K: {"t": [...], "lower": [...], "upper": [...], <method>: [...], ...}}``: one subplot per K,
    the band between the Theorem 2 bounds and each method's variance vs t, log-y (non-positive values hidden)."""
    ks = list(bounds)
    fig = figure(4.6 * len(ks), 3.8)
    axes = fig.subplots(1, len(ks), squeeze=False)[0]
    for ax, k in zip(axes, ks):
        entry = bounds[k]
        t = to_numpy(entry["t"])

        def pos(x):
            x = to_numpy(x)
            return np.where(x > 0, x, np.nan)

        positives = [v[v > 0] for v in (to_numpy(x) for name, x in entry.items() if name != "t")]
        positives = np.concatenate(positives) if positives else np.array([])
        floor = 0.5 * float(positives.min()) if positives.size else 1e-8
        if "lower" in entry and "upper" in entry:
            lo, hi = pos(entry["lower"]), pos(entry["upper"])
            ax.fill_between(t, np.where(np.isnan(lo), floor, lo), hi, color="0.8", alpha=0.6, label="Theorem 2 bounds")
            ax.plot(t, lo, color="0.4", lw=0.8, ls="--")
            ax.plot(t, hi, color="0.4", lw=0.8, ls="--")
        for name, values in entry.items():
            if name in ("t", "lower", "upper"):
                continue
            style = {"color": METHOD_STYLE[name]["color"]} if name in METHOD_STYLE else {}
            ax.plot(t, pos(values), lw=1.2, label=name, **style)
        ax.set_yscale("log")
        ax.set_xlabel("t (noisy index of the step s <- t)")
        ax.set_ylabel(r"$\sigma^2_{s|t}$")
        ax.set_title(f"K = {k}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save(fig, path)


def variance_curves(schedule, gamma, Ks: Sequence[int], data_range) -> dict:
    """sigma^2 of every DDPM-type method against the Theorem 2 bounds on even trajectories (for
    :func:`plot_variance_bounds`): ``{K: {"t": taus, "lower": [...], "upper": [...], <method>: [...]}}``."""
    from .trajectory import make_trajectory
    from .variance import reverse_variance, variance_bounds

    out = {}
    for K in Ks:
        taus = make_trajectory("even", schedule.N, K)
        lower, upper = variance_bounds(schedule, taus, "ddpm", data_range=data_range)
        entry = {"t": taus, "lower": lower.tolist(), "upper": upper.tolist()}
        for m in ("ddpm_beta", "ddpm_beta_tilde", "analytic_ddpm"):
            entry[m] = reverse_variance(schedule, taus, m, gamma, data_range=data_range).tolist()
        out[K] = entry
    return out
