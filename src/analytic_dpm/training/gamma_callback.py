"""Gamma calibration during training (spec section 5) and its quick diagnostics: the Lightning callback.

:class:`GammaCalibration` estimates gamma_n = E ||eps_hat(x_n, n)||^2 / d with the EMA weights in eval mode
at the end of every ``every_n_epochs``-th training epoch (and of the last one), with its own
``torch.Generator`` (the training RNG stream is never touched), under the training autocast. The result is
stored in the module (hence in every later checkpoint, ``checkpoint["analytic_dpm"]``), written to
``<output_dir>/gamma_epochXXX.{json,png}`` and logged: ``calib/seconds``, a quick NLL
``calib/nll_K{K}/{method}`` on a few held-out images, the Gamma curve (W&B line plot + image) and
analytic_ddpm's sigma^2 against the Theorem-2 bounds (image ``variance_epochXXX.png``).

Sanity: a Gamma that is not finite (a diverged network) is refused with :class:`GammaCalibrationError`, naming
the epoch and step, and never stored; a Gamma above 1 on most timesteps is stored with a warning naming the likely
cause (:func:`analytic_dpm.calibration.check_calibrated_gamma`). Before calibrating, the callback asks the module
whether training diverged (``check_divergence``), so that error, with its advice, comes first.

The estimate itself is the package's one calibration path, :func:`analytic_dpm.calibration.calibrate_gamma`; the
plots are those of :mod:`analytic_dpm.plots` (the evaluation report draws the same ones).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn

from ..calibration import GammaCalibrationError, calibrate_gamma, check_calibrated_gamma, eval_mode
from ..data import to_model_space
from ..likelihood import nll_bpd
from ..plots import plot_gamma, plot_variance_bounds, variance_curves
from ..schedule import NoiseSchedule
from ..seeding import mix_seed
from ..trajectory import make_trajectory

log = logging.getLogger(__name__)

__all__ = ["GammaCalibration", "quick_nll"]

NLL_METHODS = ("ddpm_beta", "ddpm_beta_tilde", "analytic_ddpm")

def quick_nll(
    eps_model: nn.Module,
    schedule: NoiseSchedule,
    datamodule,
    gamma: Tensor,
    Ks: Sequence[int],
    *,
    num_images: int = 64,
    methods: Sequence[str] = NLL_METHODS,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = False,
) -> dict[str, float]:
    """Mean NELBO in bits/dim on the first ``num_images`` held-out examples, even trajectory.

    Keys ``nll_K{K}/{method}``; K larger than N are skipped. Images use the discrete decoder with the x0
    clamp, unbounded (synthetic) data the continuous decoder without clamp.
    """
    n = min(int(num_images), int(datamodule.num_heldout))
    if n <= 0:
        return {}
    x = datamodule.heldout(n)
    images = x.dtype == torch.uint8
    data_range = getattr(datamodule, "data_range", (-1.0, 1.0))
    device = next(eps_model.parameters()).device
    x0 = to_model_space(x).to(device)
    out: dict[str, float] = {}
    with eval_mode(eps_model), torch.no_grad(), autocast():
        for K in Ks:
            if K > schedule.N or K < 2:
                continue
            taus = make_trajectory("even", schedule.N, int(K))
            bpd = nll_bpd(
                eps_model, schedule.to(device), taus, x0, list(methods), gamma=gamma.to(device),
                decoder="discrete" if images else "continuous", clip_x0=images and data_range is not None,
                data_range=data_range, generator=generator, batch_size=int(batch_size), progress=progress,
            )  # fmt: skip
            for m, v in bpd.items():
                out[f"nll_K{K}/{m}"] = float(v.mean())
    return out


def _is_last_epoch(trainer: Trainer) -> bool:
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    return bool(trainer.should_stop)


class GammaCalibration(Callback):
    """Calibrate Gamma with the EMA weights at epoch ends; store it in the module / checkpoint and log it.

    Args:
        num_samples: M, Monte-Carlo draws per timestep (cost: N * M network calls).
        batch_size: network batch of the calibration and the quick NLL.
        every_n_epochs: calibrate after every n-th training epoch (0: never, except ``at_fit_end``).
        at_fit_end: also calibrate after the last epoch (max_steps / max_epochs reached).
        pool_size: training examples to draw from (None: the whole training set).
        nll_images: held-out images for the quick NLL (0: skip it); ``nll_K``: trajectory lengths.
        bounds_K: trajectory lengths of the sigma^2-vs-bounds plot (empty: skip).
        output_dir: where gamma_epochXXX.json/.png go (None: ``<trainer.default_root_dir>/gamma``).
        plots: write and log the PNG plots. progress: progress bars.
        seed: base seed of the calibration's own generator (None: the module's seed).
    """

    def __init__(
        self,
        num_samples: int = 20,
        batch_size: int = 256,
        every_n_epochs: int = 1,
        at_fit_end: bool = True,
        pool_size: int | None = None,
        nll_images: int = 64,
        nll_K: Sequence[int] = (10, 100),
        nll_methods: Sequence[str] = NLL_METHODS,
        bounds_K: Sequence[int] = (10, 100),
        output_dir: str | None = None,
        plots: bool = True,
        progress: bool = True,
        seed: int | None = None,
    ):
        if int(num_samples) < 1 or int(batch_size) < 1:
            raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.every_n_epochs, self.at_fit_end = int(every_n_epochs), bool(at_fit_end)
        self.pool_size = None if pool_size is None else int(pool_size)
        self.nll_images = int(nll_images)
        self.nll_K = [int(k) for k in nll_K]
        self.nll_methods = list(nll_methods)
        self.bounds_K = [int(k) for k in bounds_K]
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.plots, self.progress = bool(plots), bool(progress)
        self.seed = seed
        self.history: list[dict[str, Any]] = []  # rank 0: one record per calibration
        self._epoch_start: tuple[float, int] | None = None

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start = (time.perf_counter(), int(getattr(pl_module, "images_trained", 0)))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        check = getattr(pl_module, "check_divergence", None)
        if callable(check):  # a diverged run stops here, with its own message, before any calibration
            check()
        scalars: dict[str, float] = {}
        if self._epoch_start is not None:
            seconds = time.perf_counter() - self._epoch_start[0]
            images = int(getattr(pl_module, "images_trained", 0)) - self._epoch_start[1]
            if seconds > 0 and images > 0:
                rate = images * trainer.world_size / seconds
                scalars = {"train/epoch_seconds": seconds, "train/images_per_second": rate}
        due = self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        due = due or (self.at_fit_end and _is_last_epoch(trainer))
        if due and getattr(trainer, "received_sigterm", False):
            log.warning("SIGTERM received: the Gamma calibration of this epoch end is skipped (the run stops now and "
                        "resumes from its checkpoint)")
            due = False
        meta = getattr(pl_module, "gamma_meta", {}) or {}
        if due and meta.get("step") == trainer.global_step and meta.get("M") == self.num_samples:
            due = False  # already calibrated at this step (e.g. a resumed run repeating an epoch end)
        if due:
            scalars.update(self.calibrate(trainer, pl_module))
            if "train/epoch_seconds" in scalars:
                scalars["calib/share_of_epoch"] = scalars["calib/seconds"] / scalars["train/epoch_seconds"]
        if trainer.is_global_zero and "train/epoch_seconds" in scalars:
            msg = (f"epoch {trainer.current_epoch}: {scalars['train/epoch_seconds']:.1f}s of training, "
                   f"{scalars['train/images_per_second']:.1f} images/s")
            if "calib/seconds" in scalars:
                msg += (f"; Gamma calibration {scalars['calib/seconds']:.1f}s "
                        f"({100 * scalars['calib/share_of_epoch']:.1f}% of the epoch's training time)")
            log.info(msg)
        self._log_scalars(trainer, scalars)

    # ------------------------------------------------------------------ work
    def _generator_seed(self, pl_module: LightningModule, step: int) -> int:
        base = self.seed if self.seed is not None else getattr(pl_module, "seed", 0)
        return mix_seed(int(base), "gamma-calibration", int(step))

    def calibrate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Run one calibration (rank 0), broadcast Gamma to every rank; returns the scalars to log."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "train_pool"):
            raise RuntimeError("GammaCalibration needs a datamodule with train_pool()/heldout() (analytic_dpm.data)")
        ema = getattr(pl_module, "ema_model", None) or pl_module.eps_model
        schedule: NoiseSchedule = pl_module.noise_schedule
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        seed = self._generator_seed(pl_module, step)
        device = pl_module.device
        autocast = trainer.precision_plugin.forward_context
        gamma = torch.zeros(schedule.N + 1, dtype=torch.float64)
        seconds = 0.0
        where = f"Gamma calibration at epoch {epoch}, step {step}"
        error: GammaCalibrationError | None = None
        if trainer.is_global_zero:
            # the pool: the whole training set, or pool_size examples drawn with a generator of the same seed
            pool = dm.train_pool(self.pool_size, generator=torch.Generator().manual_seed(seed)) if self.pool_size \
                else dm.train_pool(None)
            try:
                gamma, seconds = calibrate_gamma(
                    ema, schedule, pool, self.num_samples, self.batch_size, seed=seed, device=device,
                    autocast=autocast, progress=self.progress, where=where, check=False,
                )  # fmt: skip
            except GammaCalibrationError as e:  # every rank must learn of it (below), not only rank 0
                error, gamma = e, torch.full_like(gamma, float("nan"))
        if trainer.world_size > 1:
            gamma = trainer.strategy.broadcast(gamma.to(device), src=0).cpu()
            seconds = float(trainer.strategy.broadcast(torch.tensor(seconds, device=device), src=0).item())
        if error is not None:
            raise error
        check_calibrated_gamma(gamma, where)  # refused (not stored) when not finite; a warning when mostly > 1
        pl_module.set_gamma(gamma, M=self.num_samples, epoch=epoch, step=step, seconds=seconds, seed=seed)
        scalars = {"calib/seconds": seconds, "calib/gamma_max": float(gamma[1:].max()),
                   "calib/gamma_mean": float(gamma[1:].mean())}
        if trainer.is_global_zero:
            scalars.update(self._report(trainer, pl_module, gamma, seconds, epoch, step, seed, autocast))
        return scalars

    def _report(self, trainer, pl_module, gamma, seconds, epoch, step, seed, autocast) -> dict[str, float]:
        schedule: NoiseSchedule = pl_module.noise_schedule
        dm = trainer.datamodule
        scalars: dict[str, float] = {}
        nll_seconds = 0.0
        if self.nll_images > 0 and self.nll_K:
            t0 = time.perf_counter()
            gen = torch.Generator(device=pl_module.device).manual_seed(mix_seed(seed, "nll"))
            nll = quick_nll(
                getattr(pl_module, "ema_model", None) or pl_module.eps_model, schedule, dm, gamma, self.nll_K,
                num_images=self.nll_images, methods=self.nll_methods, batch_size=self.batch_size, generator=gen,
                autocast=autocast, progress=self.progress,
            )  # fmt: skip
            nll_seconds = time.perf_counter() - t0
            scalars.update({f"calib/{k}": v for k, v in nll.items()})
            scalars["calib/nll_seconds"] = nll_seconds
        out_dir = self.output_dir or Path(trainer.default_root_dir) / "gamma"
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"epoch{epoch:03d}"
        record = {
            "epoch": epoch, "step": step, "M": self.num_samples, "schedule": schedule.name, "N": schedule.N,
            "seed": seed, "calibration_seconds": seconds, "nll_seconds": nll_seconds,
            "nll_bpd": {k[len("calib/"):]: v for k, v in scalars.items() if k.startswith("calib/nll_K")},
            "gamma": gamma.tolist(),
        }  # fmt: skip
        json_path = out_dir / f"gamma_{stem}.json"
        json_path.write_text(json.dumps(record))
        images: dict[str, Path] = {}
        if self.plots:
            data_range = getattr(dm, "data_range", (-1.0, 1.0))
            title = f"epoch {epoch}, step {step}, M={self.num_samples}"
            images["calib/gamma_plot"] = plot_gamma(gamma, out_dir / f"gamma_{stem}.png",
                                                    abar=schedule.alphas_cumprod, title=title)
            Ks = [K for K in self.bounds_K if 2 <= K <= schedule.N]
            if Ks:
                curves = variance_curves(schedule, gamma, Ks, data_range)
                images["calib/variance_bounds"] = plot_variance_bounds(curves, out_dir / f"variance_{stem}.png",
                                                                       title=title)
        self.history.append({**record, "files": [str(json_path), *map(str, images.values())]})
        self._log_rich(trainer, gamma, images, step)
        nll_txt = ", ".join(f"{k[6:]}={v:.3f}" for k, v in scalars.items() if k.startswith("calib/nll_K"))
        log.info("Gamma calibrated at epoch %d / step %d with M=%d in %.1fs (gamma max %.4f)%s", epoch, step,
                 self.num_samples, seconds, float(gamma[1:].max()), f"; NLL bpd: {nll_txt}" if nll_txt else "")
        return scalars

    def _log_rich(self, trainer: Trainer, gamma: Tensor, images: dict[str, Path], step: int) -> None:
        """W&B: the Gamma curve as a line plot (table) and the PNGs as images."""
        for logger in trainer.loggers:
            if type(logger).__name__ != "WandbLogger":
                continue
            try:
                import wandb

                table = wandb.Table(columns=["n", "gamma"], data=[[n, float(gamma[n])] for n in range(1, len(gamma))])
                payload: dict[str, Any] = {
                    "calib/gamma": wandb.plot.line(table, "n", "gamma", title=f"Gamma at step {step}"),
                    "calib/gamma_table": table,
                }
                payload.update({k: wandb.Image(str(p)) for k, p in images.items()})
                logger.log_metrics(payload, step=step)
            except Exception as e:  # never let logging kill a training run
                log.warning("could not log the Gamma plots to W&B: %s", e)

    @staticmethod
    def _log_scalars(trainer: Trainer, scalars: dict[str, float]) -> None:
        if not scalars or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
