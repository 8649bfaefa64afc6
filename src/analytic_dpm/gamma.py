"""Monte-Carlo calibration of gamma_n = E_{x_n ~ q(x_n)} ||epshat(x_n, n)||^2 / d (spec section 5).

The paper writes Gamma_n = gamma_n / bbar_n. One vector serves every K, trajectory and forward process.
Cost: N * M network evaluations, batched across timesteps so the model always sees full batches.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .files import safe_torch_load
from .identity import digest_tensor
from .moments import split_output
from .pixels import to_model_space
from .schedule import NoiseSchedule
from .validation import FiniteWatch

log = logging.getLogger(__name__)

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


class _CostReport:
    """Says what a calibration costs before it starts (N x M network calls) and, from its first batches, about how
    long it will take (one device synchronisation, once)."""

    PROBE_S = 2.0  # measure at least this long (and two batches) before estimating

    def __init__(self, total: int, batch_size: int, N: int, M: int, device):
        self.total, self.device, self.done = total, torch.device(device), False
        self.start = time.perf_counter()
        self.batches = 0
        log.info("Gamma calibration: N x M = %d x %d = %s network calls, in batches of %d", N, M, f"{total:,}",
                 batch_size)

    def after(self, calls: int) -> None:
        self.batches += 1
        if self.done or calls >= self.total:
            return
        if self.batches < 2 or time.perf_counter() - self.start < self.PROBE_S:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.start
        rate = calls / seconds
        left = (self.total - calls) / rate
        self.done = True
        log.info("Gamma calibration: %.0f network calls/s here; about %s to go (%s in all)", rate, _duration(left),
                 _duration(left + seconds))


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


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
            weights) before calling. Autocast, if any, is the caller's choice. A head model
            ``(x_n, n) -> (eps_hat, head)`` works too: only eps_hat is used.
        data: a tensor pool of training points (uint8 images or float data in model space), drawn
            uniformly with replacement, or a callable ``(n, generator) -> Tensor`` of fresh samples.
        num_samples: M, the number of (x_0, eps) draws per timestep.
        batch_size: network batch; every batch mixes timesteps, so it is always full.
        generator: source of all randomness (indices and noise). Default: a new generator seeded 0 on
            the model's device, so calibration never touches the global RNG of a training run.

    A network output that is NaN or inf raises :class:`~analytic_dpm.validation.NonFiniteOutputError` (smallest
    such timestep); see :func:`gamma_warnings` for a Gamma that is finite but implausible.
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
    watch = FiniteWatch("estimate_gamma", device, sentinel=N + 1)  # NaN/inf network outputs, checked once
    cost = _CostReport(total, batch_size, N, num_samples, device)
    bar = tqdm(total=total, desc="Gamma calibration", unit="eval", disable=not progress, leave=False)
    for start in range(0, total, batch_size):
        count = min(batch_size, total - start)
        n = 1 + torch.arange(start, start + count, device=device) // num_samples
        x0 = _draw(data, count, generator, device)
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)
        view = (-1,) + (1,) * (x0.ndim - 1)
        # x_n = sqrt(abar_n) x_0 + sqrt(bbar_n) eps
        x_n = (sqrt_abar[n].view(view) * x0 + sqrt_bbar[n].view(view) * eps).float()
        eps_hat = split_output(eps_model(x_n, n))[0].float()
        watch.observe(eps_hat, n)
        sums.index_add_(0, n, eps_hat.flatten(1).pow(2).mean(1).double())
        bar.update(count)
        cost.after(start + count)
    bar.close()
    watch.check()
    gamma = sums / num_samples
    gamma[0] = 0.0
    return gamma


def gamma_warnings(gamma: Tensor, schedule: NoiseSchedule | None = None) -> list[str]:
    """Plain-language warnings about an implausible (finite) Gamma; empty when it looks sane.

    gamma_n = E ||epshat(x_n, n)||^2 / d should stay at or below about 1 (a perfect predictor has
    gamma_n = 1 - abar_n/bbar_n E tr Cov[x_0|x_n]/d <= 1); Monte-Carlo noise pushes a few large-n values
    slightly above 1. Gamma above 1 on most timesteps means the predictor is not a trained epsilon predictor of this
    data in this convention.
    """
    g = torch.as_tensor(gamma, dtype=torch.float64)[1:]
    out: list[str] = []
    if g.numel() == 0:
        return out
    above = float((g > 1.0).double().mean())
    if above > 0.5:
        out.append(
            f"Gamma exceeds 1 on {100 * above:.0f}% of the timesteps (max {float(g.max()):.3g}); a trained noise "
            "predictor keeps E||eps_hat||^2/d <= 1. Likely causes: an untrained or diverged network, a wrong "
            "timestep convention (t vs t - 1, or rescaled timesteps) for a pretrained model, or data not in [-1, 1]."
        )
    return out


#: the format tag of the Gamma files this package writes (calibrate CLI, evaluation's Gamma cache)
GAMMA_FILE_FORMAT = "analytic_dpm.gamma/1"


def read_gamma_file(path: str | Path) -> tuple[Tensor, dict]:
    """``(gamma as a float64 CPU tensor, the file's metadata)`` from ``.npy``, ``.json`` (a list, or
    ``{"gamma": [...], ...}``) or ``.pt``/``.pth`` (a tensor, a dict with ``"gamma"``, or a training checkpoint with
    ``["analytic_dpm"]["gamma"]``). Metadata: a training checkpoint's Gamma fields (``gamma_M`` as ``M``), or the
    other entries of a Gamma file (``M``, ``seed``, ``key``, ``sha256``, ...).

    A file written by :func:`save_gamma_file` carries the sha256 of its vector, which is checked: a vector changed
    after it was written (scaled, replaced) raises ``ValueError``. Reads data only (``weights_only=True``,
    ``allow_pickle=False``): a Gamma file may come from someone else.
    """
    import numpy as np

    p = Path(path).expanduser()
    meta: dict = {}
    if p.suffix == ".npy":
        obj = np.load(p, allow_pickle=False)
    else:
        obj = json.loads(p.read_text()) if p.suffix == ".json" else safe_torch_load(p, what="Gamma file")
        if isinstance(obj, dict):
            if "gamma" in obj:
                meta = {k: v for k, v in obj.items() if k != "gamma"}
                obj = obj["gamma"]
            elif isinstance(obj.get("analytic_dpm"), dict) and "gamma" in obj["analytic_dpm"]:
                state = obj["analytic_dpm"]
                meta = {"M": state.get("gamma_M"), "seed": state.get("gamma_seed"), "source": "checkpoint"}
                obj = state["gamma"]
            else:
                raise ValueError(f"{p}: no 'gamma' entry (keys: {sorted(map(str, obj))})")
    try:
        gamma = torch.as_tensor(np.asarray(obj.cpu() if isinstance(obj, Tensor) else obj, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: the 'gamma' entry is not a vector of numbers ({e})") from None
    stored = meta.get("sha256")
    if stored is not None and stored != digest_tensor(gamma):
        raise ValueError(f"{p}: the Gamma vector does not match the checksum written with it (it was changed after "
                         "it was written)")
    return gamma, meta


def read_gamma_vector(path: str | Path) -> Tensor:
    """The Gamma vector of a file (:func:`read_gamma_file`), float64."""
    return read_gamma_file(path)[0]


def load_gamma(path: str | Path, N: int | None = None) -> Tensor:
    """A Gamma to use, from a file of the calibrate CLI, evaluation's Gamma cache, a training checkpoint, or a
    ``.npy``/``.json`` of your own: float64 ``[N+1]`` with gamma_0 = 0, checked (checksum, finite, >= 0, length N+1
    when ``N`` is given). For example ``AnalyticDPMScheduler.from_config(config, gamma=load_gamma(path))``."""
    from .validation import check_gamma

    gamma, _ = read_gamma_file(path)
    return check_gamma(gamma, len(gamma) - 1 if N is None else int(N))


def save_gamma_file(path: str | Path, gamma: Tensor, **meta) -> Path:
    """Write ``{"format", "gamma": float64 tensor, "sha256": of the vector, **meta}`` with ``torch.save``
    (atomically); :func:`read_gamma_file`, :func:`load_gamma` and ``eval.gamma_path`` read it back. ``meta`` must be
    plain data (M, seed, the key it was computed for, the model's identity, ...)."""
    from .files import atomic_write

    g = torch.as_tensor(gamma, dtype=torch.float64).cpu().contiguous()
    obj = {"format": GAMMA_FILE_FORMAT, "gamma": g, "sha256": digest_tensor(g), **meta}
    return atomic_write(path, lambda fh: torch.save(obj, fh))
