"""The per-pair cost table J(s, t) of the optimal trajectory, estimated by Monte Carlo (spec sections 6 and 11).

For the covariance-head methods the cost of a step is no longer a closed form of gamma. As the authors do
(``get_nelbo_terms`` in baofff/Extended-Analytic-DPM, core/diffusion/likelihood.py), the cost of the pair (s, t) is
the expected NELBO term of that step under the method's reverse process:

    J(s, t) = E_{x_0, eps} L_{s|t}(x_0, eps) / (d ln 2)                               (bits/dim), 1 <= s < t <= N
    L_{s|t} = sum over pixels of 0.5 (log(sigma_i^2 / lambda^2) + lambda^2 / sigma_i^2 - 1)
              + 0.5 c_{s|t}^2 (x_0 - x0hat(x_t))_i^2 / sigma_i^2                     (spec sections 8 and 11)

with x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps, lambda^2 = btilde_{s|t}, sigma_i^2 = lambda^2 + c^2 clip(Chat_i(x_t))
(the method's variance; isotropic methods: their sigma^2_{s|t}). Everything in L_{s|t} except lambda, c depends on x_t
only through eps_hat(x_t, t) and the head at t, so ONE network call per (t, image) gives the column J(., t) for every
s < t at once: N calls per image. The same ``num_images`` training images serve every t (the authors' fixed subset),
with one fresh eps per (t, image). The expectation is the mean over images of the per-image sum over pixels.

With an exact mean and head the mean-error part cancels in expectation (E[c^2 (x_0 - x0hat)^2 | x_t] =
sigma^2 - lambda^2 per pixel), leaving J(s, t) = mean over pixels of 0.5 log2(sigma_i^2 / lambda^2): spec section 6's
log(sigma*^2 / lambda^2), per pixel. Row 0 (the decoder pair (0, t)) is not estimated and is +inf, as are s >= t: the
DP of trajectory.py fixes tau_1 = 1, so the decoder term is the same for every trajectory. (The authors' "dp_vb" lets
tau_1 float and adds a decoder cost F[0, t]; see the report / module ``trajectory``.)

The table is the artefact to cache: a float64 (N+1) x (N+1) tensor on the CPU; record the number of images and the
generator's seed it was made with. :func:`~analytic_dpm.trajectory.optimal_trajectory_from_costs` runs the DP on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .gamma import model_device
from .likelihood import pixel_kl
from .methods import check_method, head_kind, needs_gamma
from .moments import call_model, check_head_model, clipped_posterior_cov, predict_x0
from .pixels import to_model_space
from .schedule import NoiseSchedule
from .validation import FiniteWatch, check_gamma
from .variance import DataRange, pair_variance, step_coefficients

DataSource = Tensor | Callable[[int, torch.Generator], Tensor]
#: elements (images x pairs x pixels) of one float64 block of the per-pixel KL; bounds the memory to ~64 MB
BLOCK_ELEMENTS = 1 << 23


def draw_images(data: DataSource, num_images: int, generator: torch.Generator, device) -> Tensor:
    """``num_images`` training points in model space (float32): distinct ones drawn at random from a tensor pool
    (uint8 images or float data), or ``data(num_images, generator)`` from a sampler."""
    if isinstance(data, Tensor):
        pool = data.shape[0]
        if num_images > pool:
            raise ValueError(f"num_images = {num_images} exceeds the pool of {pool} training points; "
                             "use fewer images or a larger pool")
        idx = torch.randperm(pool, generator=generator, device=generator.device)[:num_images]
        x = data[idx.to(data.device)]
    else:
        x = data(num_images, generator)
    return to_model_space(x.to(device)).float()


@torch.no_grad()
def estimate_pair_costs(
    model: Callable,
    schedule: NoiseSchedule,
    data: DataSource,
    method: str,
    num_images: int,
    batch_size: int,
    *,
    gamma: Tensor | None = None,
    clip_x0: bool = True,
    data_range: DataRange = (-1.0, 1.0),
    avg_cov: bool = False,
    generator: torch.Generator | None = None,
    device=None,
    progress: bool = True,
) -> Tensor:
    """J(s, t) in bits/dim as a float64 Tensor[N+1, N+1] on the CPU (module docstring); +inf off 1 <= s < t <= N.

    Args:
        model: a head model ``(x_t, t) -> (eps_hat, head)`` for sn_ddpm / npr_ddpm (a plain noise predictor for
            the isotropic DDPM methods); eval mode and EMA weights are the caller's business.
        data: training data: a tensor pool (``num_images`` distinct points are drawn) or a sampler
            ``(n, generator) -> Tensor``.
        method: a DDPM-forward method (sn_ddpm, npr_ddpm, or an isotropic one such as analytic_ddpm with ``gamma``).
        num_images: images in the average; N network calls each.
        batch_size: network batch; (t, image) pairs are stacked t-major so every batch is full.
        clip_x0, data_range, avg_cov: as in :func:`~analytic_dpm.sample` (they shape x0hat and sigma^2).
        generator: all randomness (images, noise). Default: a new generator seeded 0 on the model's device.
    """
    forward = check_method(method)
    if forward != "ddpm":
        raise ValueError(f"pair costs need the DDPM forward process (lambda^2 > 0); {method} uses DDIM, for which "
                         "the optimal trajectory is not defined")
    N = schedule.N
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images}, {batch_size}")
    kind = head_kind(method)
    gamma = check_gamma(gamma, N, required=needs_gamma(method), what=f"method {method!r}")
    check_head_model(model, [method])
    device = torch.device(device) if device is not None else model_device(model)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    x0_all = draw_images(data, num_images, generator, device)
    dim = x0_all[0].numel()
    sched = schedule.to(device)
    abar, bbar = sched.alphas_cumprod, sched.bbar
    clip_range = data_range if clip_x0 else None
    if gamma is not None:
        gamma = gamma.to(device)

    sums = torch.zeros(N + 1, N + 1, dtype=torch.float64, device=device)
    total = N * num_images  # (t, image) pairs, t-major
    watch = FiniteWatch("estimate_pair_costs", device, sentinel=N + 1)
    bar = tqdm(total=total, desc=f"pair costs {method}", unit="eval", disable=not progress, leave=False)
    for start in range(0, total, batch_size):
        idx = torch.arange(start, min(start + batch_size, total), device=device)
        t, i = 1 + idx // num_images, idx % num_images
        x_0 = x0_all[i]
        eps = torch.randn(x_0.shape, generator=generator, device=generator.device).to(device)
        view = (-1,) + (1,) * (x_0.ndim - 1)
        a_t, b_t = abar[t].view(view), bbar[t].view(view)
        x_t = (a_t.sqrt() * x_0 + b_t.sqrt() * eps).float()
        eps_hat, head = call_model(model, x_t, t, head_for=method if kind else None)
        watch.observe(eps_hat, t)
        if kind is not None:
            watch.observe(head, t)
        x0_hat = predict_x0(x_t, eps_hat, a_t.float(), b_t.float(), clip_range)
        sq_err = (x_0.double() - x0_hat.double()).pow(2).flatten(1)  # (x_0 - x0hat)^2 per pixel
        chat = None
        if kind is not None:  # clip(Chat(x_t)) per pixel (spec section 11)
            chat = clipped_posterior_cov(kind, eps_hat.double(), head.double(), a_t, b_t, data_range,
                                         avg_cov).expand_as(eps_hat).flatten(1)
        for tv in torch.unique(t).tolist():
            if tv > 1:
                rows = t == tv
                sums[1:tv, tv] += _column(sched, method, tv, sq_err[rows], None if chat is None else chat[rows],
                                          gamma, data_range, dim)
        bar.update(len(idx))
    bar.close()
    watch.check()
    table = sums / (num_images * dim * math.log(2.0))
    n = torch.arange(N + 1, device=device)
    valid = (n[:, None] >= 1) & (n[:, None] < n[None, :])
    return torch.where(valid, table, math.inf).cpu()


def _column(sched: NoiseSchedule, method: str, t: int, sq_err: Tensor, chat: Tensor | None, gamma,
            data_range: DataRange, dim: int) -> Tensor:
    """sum over the given images of L_{s|t} in nats, for s = 1..t-1: float64 Tensor[t - 1]."""
    s = torch.arange(1, t, device=sq_err.device)
    lam2, c = step_coefficients(sched, s, t, "ddpm")  # [S]
    c2 = c**2
    if chat is None:  # isotropic: one sigma^2 = lambda^2 + c^2 cov per pair; the per-pixel sum in closed form
        cov = (pair_variance(sched, s, t, method, gamma, 0.0, data_range) - lam2) / c2
        per_image = pixel_kl(lam2[None, :], c2[None, :], cov[None, :], sq_err.sum(1, keepdim=True) / dim)
        return dim * per_image.sum(0)
    out = torch.empty(t - 1, dtype=torch.float64, device=sq_err.device)
    b, d = chat.shape
    step = max(1, BLOCK_ELEMENTS // max(1, b * d))
    for lo in range(0, t - 1, step):
        hi = min(lo + step, t - 1)
        kl = pixel_kl(lam2[lo:hi].view(1, -1, 1), c2[lo:hi].view(1, -1, 1), chat[:, None, :], sq_err[:, None, :])
        out[lo:hi] = kl.sum(dim=(0, 2))  # [b, S, d] -> [S]
    return out
