"""Monte-Carlo calibration of gamma_n = E_{x_n ~ q(x_n)} ||epshat(x_n, n)||^2 / d (spec section 5).

The paper writes Gamma_n = gamma_n / bbar_n. One vector serves every K, trajectory and forward process.
Cost: N * M network evaluations, batched across timesteps so the model always sees full batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .pixels import to_model_space
from .schedule import NoiseSchedule

DataSource = Tensor | Callable[[int, torch.Generator], Tensor]


def model_device(eps_model, fallback: torch.device | str = "cpu") -> torch.device:
    """The device of a module's first parameter, else ``fallback`` (oracles have no parameters)."""
    params = getattr(eps_model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device(fallback)


def _draw(data: DataSource, idx_count: int, generator: torch.Generator, device) -> Tensor:
    """``idx_count`` training points: uniform with replacement from a tensor pool, or from a sampler."""
    if isinstance(data, Tensor):
        idx = torch.randint(data.shape[0], (idx_count,), generator=generator, device=generator.device)
        x = data[idx.to(data.device)]
    else:
        x = data(idx_count, generator)
    return to_model_space(x.to(device, non_blocking=True)).float()


@torch.no_grad()
def estimate_gamma(
    eps_model,
    schedule: NoiseSchedule,
    data: DataSource,
    num_samples: int,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device=None,
    progress: bool = True,
) -> Tensor:
    """gamma as a float64 Tensor[N+1] with gamma_0 = 0 (spec section 5).

    Args:
        eps_model: ``eps_model(x_n, n)`` with integer n in 1..N; put it in eval mode (and use EMA
            weights) before calling. Autocast, if any, is the caller's choice.
        data: a tensor pool of training points (uint8 images or float data in model space), drawn
            uniformly with replacement, or a callable ``(n, generator) -> Tensor`` of fresh samples.
        num_samples: M, the number of (x_0, eps) draws per timestep.
        batch_size: network batch; every batch mixes timesteps, so it is always full.
        generator: source of all randomness (indices and noise). Default: a new generator seeded 0 on
            the model's device, so calibration never touches the global RNG of a training run.
    """
    N = schedule.N
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    if isinstance(data, Tensor) and data.shape[0] == 0:
        raise ValueError("the data pool for gamma calibration is empty")
    device = torch.device(device) if device is not None else model_device(eps_model)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    sched = schedule.to(device)
    sqrt_abar, sqrt_bbar = sched.alphas_cumprod.sqrt(), sched.bbar.sqrt()

    total = N * num_samples  # flattened (n, i) pairs, n-major
    sums = torch.zeros(N + 1, dtype=torch.float64, device=device)
    bar = tqdm(total=total, desc="Gamma calibration", unit="eval", disable=not progress, leave=False)
    for start in range(0, total, batch_size):
        count = min(batch_size, total - start)
        n = 1 + torch.arange(start, start + count, device=device) // num_samples
        x0 = _draw(data, count, generator, device)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)
        view = (-1,) + (1,) * (x0.ndim - 1)
        # x_n = sqrt(abar_n) x_0 + sqrt(bbar_n) eps
        x_n = (sqrt_abar[n].view(view) * x0 + sqrt_bbar[n].view(view) * eps).float()
        eps_hat = eps_model(x_n, n).float()
        sums.index_add_(0, n, eps_hat.flatten(1).pow(2).mean(1).double())
        bar.update(count)
    bar.close()
    gamma = sums / num_samples
    gamma[0] = 0.0
    return gamma
