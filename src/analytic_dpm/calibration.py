"""The one Gamma calibration path (spec section 5): every caller of the package goes through :func:`calibrate_gamma`.

Callers, each choosing only its network, data pool, seed and precision:

* training: the :class:`~analytic_dpm.training.GammaCalibration` callback (EMA weights at epoch ends, under the
  training's own autocast);
* a checkpoint: :func:`~analytic_dpm.training.calibrate_checkpoint` (``python -m analytic_dpm.calibrate --ckpt``);
* a pretrained network: the calibrate CLI (``--pretrained``) and evaluation's Gamma cache
  (:mod:`analytic_dpm.evaluation.gammas`);
* evaluation: ``eval.recalibrate=true`` and the Gaussian-mixture oracle.

:func:`calibrate_gamma` puts the network in eval mode, runs it at the requested precision
(:func:`~analytic_dpm.accel.prepare_eps_model`, or the caller's autocast), draws everything from one generator seeded
with ``seed`` on the network's device (the caller's RNG is never touched), turns a non-finite network output into a
:class:`GammaCalibrationError` naming where, and checks the result (:func:`check_calibrated_gamma`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .errors import UserError
from .gamma import DataSource, estimate_gamma, gamma_warnings, model_device
from .validation import NonFiniteOutputError

log = logging.getLogger(__name__)

__all__ = ["GammaCalibrationError", "calibrate_gamma", "check_calibrated_gamma", "eval_mode"]

_ADVICE = ("the network has probably diverged (or its checkpoint is broken); Gamma was not stored. Try a lower "
           "learning rate, gradient clipping or fp32 instead of bf16, and resume from an earlier checkpoint")


class GammaCalibrationError(UserError, ValueError):
    """Gamma cannot be calibrated from this network (non-finite outputs or Gamma); the message says where."""


def check_calibrated_gamma(gamma: Tensor, where: str = "Gamma calibration") -> None:
    """Refuse a non-finite Gamma (:class:`GammaCalibrationError`); log a warning when Gamma > 1 on most timesteps.

    ``where`` names the calibration in the messages (e.g. ``"Gamma calibration at epoch 3, step 1200"``).
    """
    g = torch.as_tensor(gamma, dtype=torch.float64)[1:]
    bad = ~torch.isfinite(g)
    if bool(bad.any()):
        n = (torch.nonzero(bad).flatten() + 1).tolist()
        raise GammaCalibrationError(
            f"{where}: Gamma is not finite (NaN or inf) at {len(n)} of {g.numel()} timesteps (first n={n[0]}): "
            f"{_ADVICE}."
        )
    for msg in gamma_warnings(gamma):
        log.warning("%s: %s", where, msg)


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Put ``model`` (when it is a module) in eval mode (dropout off) and restore its previous mode afterwards."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def calibrate_gamma(
    eps_model,
    schedule,
    pool: DataSource,
    num_samples: int,
    batch_size: int,
    *,
    seed: int,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    compile: bool | str = False,
    compile_mode: str | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    progress: bool = True,
    where: str = "Gamma calibration",
    check: bool = True,
) -> tuple[Tensor, float]:
    """Gamma (float64 ``[N+1]`` on the CPU, gamma_0 = 0) of ``eps_model`` on ``pool``, and the wall seconds.

    Args:
        eps_model: the noise predictor (EMA weights for a trained one); put in eval mode for the calibration.
        pool: training points (a tensor pool drawn with replacement, or a sampler ``(n, generator) -> x``).
        num_samples, batch_size: M (draws per timestep; N * M network calls) and the network batch.
        seed: seeds the one generator (on ``device``) every draw comes from.
        device: where the network runs (default: its parameters' device, else the CPU).
        precision, compile, compile_mode: the network's speed options (:func:`analytic_dpm.accel.prepare_eps_model`).
        autocast: instead of ``precision``: a context-manager factory to run the calibration in (the training's
            own mixed precision, so Gamma is estimated with the network exactly as it trains).
        where: names the calibration in errors and warnings.
        check: refuse a non-finite Gamma and warn when it is mostly > 1 (:func:`check_calibrated_gamma`).
    """
    from .accel import prepare_eps_model

    device = torch.device(device) if device is not None else model_device(eps_model)
    if autocast is None:
        network = prepare_eps_model(eps_model, precision=precision, compile=compile, mode=compile_mode, device=device,
                                    static_batch=int(batch_size))
        autocast = contextlib.nullcontext
    elif precision != "fp32" or compile:
        raise ValueError("calibrate_gamma: pass either autocast (the caller's precision) or precision/compile")
    else:
        network = eps_model
    generator = torch.Generator(device=device).manual_seed(int(seed))
    start = time.perf_counter()
    try:
        with eval_mode(eps_model), torch.no_grad(), autocast():
            gamma = estimate_gamma(network, schedule, pool, num_samples=int(num_samples), batch_size=int(batch_size),
                                   generator=generator, device=device, progress=progress)
    except NonFiniteOutputError as e:
        raise GammaCalibrationError(f"{where}: {e} {_ADVICE}.") from e
    if gamma.is_cuda:
        torch.cuda.synchronize(gamma.device)
    gamma = gamma.detach().to("cpu", torch.float64)
    if check:
        check_calibrated_gamma(gamma, where)
    return gamma, time.perf_counter() - start
