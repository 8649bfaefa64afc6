"""The plots of Gamma and of the reverse variances, shared by training (the Gamma callback) and evaluation (the report).

* :func:`plot_gamma`: gamma_n against n with the bound gamma <= 1, and U_n = bbar_n / abar_n (1 - gamma_n), the
  estimate of E tr Cov[x_0|x_n] / d (spec sections 4-5);
* :func:`variance_curves` + :func:`plot_variance_bounds`: sigma^2_{s|t} of the DDPM-type methods on even
  trajectories between the Theorem 2 bounds (spec section 4);
* :func:`variance_maps` + :func:`plot_variance_maps`: a covariance head's per-pixel variance on a few images beside
  analytic_ddpm's one value per step (spec section 11);
* :func:`figure`, :func:`save`, :data:`METHOD_STYLE`: the figure plumbing the report's metric plots use too.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, thread-safe).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["METHOD_STYLE", "figure", "plot_gamma", "plot_variance_bounds", "plot_variance_maps", "save", "to_numpy",
           "variance_curves", "variance_maps"]


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
    "sn_ddpm": dict(color="tab:brown", marker="P"),
    "npr_ddpm": dict(color="tab:pink", marker="X"),
    "sn_ddim": dict(color="tab:olive", marker="*"),
    "npr_ddim": dict(color="tab:cyan", marker="h"),
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


def variance_maps(model, schedule, x0, method: str, gamma, K: int = 10, steps: Sequence[int] = (2, 5, 9), *,
                  data_range=(-1.0, 1.0), clip_x0: bool = True, avg_cov: bool = False, seed: int = 0) -> dict:
    """The per-pixel variance sigma^2_{s|t}(x_t) of a head method (spec section 11) on noised versions of ``x0``
    (a few images in model space), beside the scalar sigma^2_{s|t} of analytic_ddpm, at the pairs ``steps`` of the
    even trajectory of K steps (k indexes the pair (tau_{k-1}, tau_k)). For :func:`plot_variance_maps`.

    Returns ``{"pairs": [(s, t), ...], "maps": float64 [pairs, images, H, W] (mean over channels), "analytic":
    [pairs], "method": method}``."""
    import torch

    from .moments import reverse_moments
    from .trajectory import make_trajectory
    from .variance import pair_variance

    taus = make_trajectory("even", schedule.N, K)
    steps = [k for k in steps if 1 <= k < len(taus)]
    g = torch.Generator().manual_seed(seed)
    x0 = x0.float()
    sched = schedule.to(x0.device)
    maps, scalars, pairs = [], [], []
    for k in steps:
        s, t = taus[k - 1], taus[k]
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        x_t = sched.alphas_cumprod[t].sqrt().float() * x0 + sched.bbar[t].sqrt().float() * eps
        with torch.no_grad():
            _, var = reverse_moments(model, schedule, x_t, s, t, method, gamma=gamma, clip_x0=clip_x0,
                                     data_range=data_range, avg_cov=avg_cov)
        # analytic_ddpm's variance of the pair is a closed form of Gamma (spec section 4): no network call
        scalar = pair_variance(schedule, torch.tensor(s), torch.tensor(t), "analytic_ddpm", gamma.cpu(), 0.0,
                               data_range)
        var = var.expand_as(x_t) if var.shape != x_t.shape else var
        maps.append(var.double().mean(1).cpu())
        scalars.append(float(scalar))
        pairs.append((s, t))
    return {"pairs": pairs, "maps": torch.stack(maps).numpy(), "analytic": scalars, "method": method}


def plot_variance_maps(data: Mapping[str, Any], path: Path, title: str = "") -> Path:
    """One row per image, one column per pair (s, t): the head method's per-pixel sigma^2 (log colour scale shared
    within a column), with analytic_ddpm's single sigma^2 of that pair marked on the colour bar."""
    from matplotlib.colors import LogNorm

    maps = np.asarray(data["maps"])
    pairs, n_img = data["pairs"], maps.shape[1]
    fig = figure(2.4 * len(pairs) + 0.6, 2.1 * n_img + 0.8)
    axes = fig.subplots(n_img, len(pairs), squeeze=False)
    for j, (s, t) in enumerate(pairs):
        col = maps[j]
        pos = col[col > 0]
        scalar = data["analytic"][j]
        lo = min(pos.min() if pos.size else scalar, scalar) if scalar > 0 else (pos.min() if pos.size else 1e-8)
        hi = max(col.max(), scalar)
        norm = LogNorm(lo, hi if hi > lo else lo * 10)
        for i in range(n_img):
            ax = axes[i][j]
            image = ax.imshow(np.where(col[i] > 0, col[i], lo), cmap="magma", norm=norm)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"s={s}, t={t}", fontsize=9)
        bar = fig.colorbar(image, ax=[axes[i][j] for i in range(n_img)], fraction=0.08)
        bar.ax.axhline(scalar, color="cyan", lw=2)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(title or f"{data['method']}: per-pixel variance (cyan line: analytic_ddpm's one value)", fontsize=10)
    return save(fig, path)
