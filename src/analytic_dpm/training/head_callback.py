"""Is the head learning? Per-epoch diagnostics of a covariance-head run (spec section 11): the Lightning callback.

:class:`HeadDiagnostics`, at the end of every ``every_n_epochs``-th epoch (and of the last one), on rank 0:

* the head loss per timestep band: the mean step loss of the epoch's batches with t in each of ``num_bands`` equal
  bands of 1..N (keys ``head/loss_t{lo}-{hi}``; the NPR loss is small at large t, where eps_hat is nearly exact, and
  large at small t, so a band that stops falling shows where the head is stuck). Summed over the ranks of a DDP run;
  after a resume in the middle of an epoch, that epoch's bands hold the steps since the resume;
* a quick NLL (bits/dim, even trajectory, the discrete decoder) of the head's DDPM method (``sn_ddpm`` or
  ``npr_ddpm``) and of ``analytic_ddpm`` on the first ``nll_images`` held-out images, with the EMA head (keys
  ``head/nll_K{K}/{method}`` and ``head/nll_K{K}/gain``, the analytic_ddpm minus the head method's bits/dim: positive
  when the head helps). Both methods share one set of network calls and noise draws, and the draws are the same at
  every epoch, so the curve shows the head alone.

analytic_ddpm needs the backbone's Gamma: the one its checkpoint holds, else a quick calibration (``gamma_samples``
draws per timestep, :func:`analytic_dpm.calibration.calibrate_gamma` with its own generator), done once per run (the
backbone is frozen). Everything runs with the callback's own generators, so the training trajectory is unchanged.
Each report is written to ``<output_dir>/head_epochXXX.json`` (default ``<run dir>/head``) and logged to every logger,
together with ``train/epoch_seconds`` and ``train/images_per_second``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from ..calibration import calibrate_gamma
from ..seeding import mix_seed
from .gamma_callback import _is_last_epoch, quick_nll

log = logging.getLogger(__name__)

__all__ = ["HeadDiagnostics", "band_edges", "band_losses"]


def band_edges(N: int, num_bands: int) -> list[tuple[int, int]]:
    """``num_bands`` contiguous, (nearly) equal bands ``(lo, hi)`` covering t = 1..N."""
    num_bands = max(1, min(int(num_bands), int(N)))
    cuts = [round(i * N / num_bands) for i in range(num_bands + 1)]
    return [(cuts[i] + 1, cuts[i + 1]) for i in range(num_bands)]


def band_losses(sums: Tensor, counts: Tensor, bands: Sequence[tuple[int, int]]) -> dict[str, dict[str, float]]:
    """Mean loss and sample count per band from per-timestep sums and counts (index t = 0..N)."""
    sums, counts = sums.detach().double().cpu(), counts.detach().double().cpu()
    out = {}
    for lo, hi in bands:
        n = float(counts[lo: hi + 1].sum())
        out[f"t{lo}-{hi}"] = {"lo": lo, "hi": hi, "count": n,
                              "loss": float(sums[lo: hi + 1].sum()) / n if n > 0 else float("nan")}
    return out


class HeadDiagnostics(Callback):
    """Per-epoch head loss per timestep band and a quick NLL of the head method against analytic_ddpm.

    Args:
        num_bands: equal timestep bands of 1..N for the loss.
        nll_images: held-out images of the quick NLL (0: skip it); ``nll_K``: trajectory lengths (even).
        gamma_samples: M of the one quick Gamma calibration when the backbone has no Gamma.
        pool_size: training examples that calibration draws from (None: the whole training set).
        batch_size: network batch of the calibration and the NLL.
        every_n_epochs: report after every n-th epoch (0: only ``at_fit_end``); ``at_fit_end``: after the last one.
        output_dir: where head_epochXXX.json go (None: ``<trainer.default_root_dir>/head``).
        progress: progress bars. seed: base seed of the callback's generators (None: the module's seed).
    """

    def __init__(
        self,
        num_bands: int = 4,
        nll_images: int = 16,
        nll_K: Sequence[int] = (10, 100),
        gamma_samples: int = 10,
        pool_size: int | None = None,
        batch_size: int = 250,
        every_n_epochs: int = 1,
        at_fit_end: bool = True,
        output_dir: str | None = None,
        progress: bool = False,
        seed: int | None = None,
    ):
        if int(num_bands) < 1 or int(gamma_samples) < 1 or int(batch_size) < 1:
            raise ValueError(f"num_bands, gamma_samples and batch_size must be >= 1, got {num_bands}, "
                             f"{gamma_samples}, {batch_size}")
        self.num_bands = int(num_bands)
        self.nll_images = int(nll_images)
        self.nll_K = [int(k) for k in nll_K]
        self.gamma_samples = int(gamma_samples)
        self.pool_size = None if pool_size is None else int(pool_size)
        self.batch_size = int(batch_size)
        self.every_n_epochs, self.at_fit_end = int(every_n_epochs), bool(at_fit_end)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.progress = bool(progress)
        self.seed = seed
        self.history: list[dict[str, Any]] = []  # rank 0: one record per report
        self._gamma: tuple[Tensor, dict[str, Any]] | None = None
        self._epoch_start: tuple[float, int] | None = None

    @staticmethod
    def _is_head_module(pl_module: LightningModule) -> bool:
        return callable(getattr(pl_module, "timestep_losses", None)) and hasattr(pl_module, "head_kind")

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start = (time.perf_counter(), int(getattr(pl_module, "images_trained", 0)))
        if self._is_head_module(pl_module):
            pl_module.reset_timestep_losses()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if not self._is_head_module(pl_module):
            log.warning("HeadDiagnostics only reports on a covariance-head run (HeadModule); skipped")
            return
        pl_module.check_divergence()  # a diverged run stops here, with its own message
        scalars: dict[str, float] = {}
        if self._epoch_start is not None:
            seconds = time.perf_counter() - self._epoch_start[0]
            images = int(pl_module.images_trained) - self._epoch_start[1]
            if seconds > 0 and images > 0:
                scalars = {"train/epoch_seconds": seconds, "train/images_per_second": images * trainer.world_size /
                           seconds}
        due = self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        due = due or (self.at_fit_end and _is_last_epoch(trainer))
        if due and getattr(trainer, "received_sigterm", False):
            log.warning("SIGTERM received: the head diagnostics of this epoch end are skipped")
            due = False
        if due:
            scalars.update(self.report(trainer, pl_module))
        if trainer.is_global_zero and scalars:
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)

    # ------------------------------------------------------------------ work
    def _seed(self, pl_module: LightningModule, *what: Any) -> int:
        base = self.seed if self.seed is not None else getattr(pl_module, "seed", 0)
        return mix_seed(int(base), "head-diagnostics", *what)

    def backbone_gamma(self, trainer: Trainer, pl_module: LightningModule) -> tuple[Tensor, dict[str, Any]]:
        """The backbone's Gamma (its checkpoint's), or one quick calibration, kept for the run."""
        if self._gamma is not None:
            return self._gamma
        bb = pl_module.backbone
        if bb.gamma is not None:
            self._gamma = (bb.gamma, {"source": "backbone checkpoint", **dict(bb.gamma_meta)})
            return self._gamma
        dm = trainer.datamodule
        seed = self._seed(pl_module, "gamma")
        pool = dm.train_pool(self.pool_size, generator=torch.Generator().manual_seed(seed)) if self.pool_size \
            else dm.train_pool(None)
        try:
            gamma, seconds = calibrate_gamma(
                pl_module.ema_head_model().eps_model, pl_module.noise_schedule, pool, self.gamma_samples,
                self.batch_size, seed=seed, device=pl_module.device, autocast=trainer.precision_plugin.forward_context,
                progress=self.progress, where="the head diagnostics' Gamma calibration of the backbone",
            )  # fmt: skip
        finally:
            pl_module.train(pl_module.training)  # calibration put the shared backbone in eval mode
        log.info("head diagnostics: calibrated the backbone's Gamma once (M=%d, %.1f s)", self.gamma_samples, seconds)
        self._gamma = (gamma, {"source": "quick calibration", "M": self.gamma_samples, "seconds": seconds,
                               "seed": seed})
        return self._gamma

    def report(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """One report (every rank takes part in the band reduction; rank 0 computes the rest)."""
        N = pl_module.N
        bands = band_edges(N, self.num_bands)
        stats = pl_module.timestep_losses()
        if stats is None:
            sums = counts = torch.zeros(N + 1, device=pl_module.device)
        else:
            sums, counts = stats
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums.clone(), reduce_op="sum")
            counts = trainer.strategy.reduce(counts.clone(), reduce_op="sum")
        if not trainer.is_global_zero:
            return {}
        per_band = band_losses(sums, counts, bands)
        scalars = {f"head/loss_{name}": b["loss"] for name, b in per_band.items() if b["count"] > 0}
        nll: dict[str, float] = {}
        nll_seconds = 0.0
        gamma_meta: dict[str, Any] = {}
        method = f"{pl_module.head_kind}_ddpm"
        if self.nll_images > 0 and self.nll_K:
            gamma, gamma_meta = self.backbone_gamma(trainer, pl_module)
            t0 = time.perf_counter()
            gen = torch.Generator(device=pl_module.device).manual_seed(self._seed(pl_module, "nll"))
            try:
                nll = quick_nll(
                    pl_module.ema_head_model(), pl_module.noise_schedule, trainer.datamodule, gamma, self.nll_K,
                    num_images=self.nll_images, methods=["analytic_ddpm", method], batch_size=self.batch_size,
                    generator=gen, autocast=trainer.precision_plugin.forward_context, progress=self.progress,
                )  # fmt: skip
            finally:
                pl_module.train(pl_module.training)  # the NLL put the shared backbone in eval mode
            nll_seconds = time.perf_counter() - t0
            for K in self.nll_K:
                a, h = nll.get(f"nll_K{K}/analytic_ddpm"), nll.get(f"nll_K{K}/{method}")
                if a is not None and h is not None:
                    nll[f"nll_K{K}/gain"] = a - h
            scalars.update({f"head/{k}": v for k, v in nll.items()})
            scalars["head/nll_seconds"] = nll_seconds
        epoch, step = int(trainer.current_epoch), int(trainer.global_step)
        record = {
            "epoch": epoch, "step": step, "head_kind": pl_module.head_kind, "mode": pl_module.mode,
            "backbone_identity": pl_module.backbone_identity, "loss_bands": per_band, "nll_bpd": nll,
            "nll_images": self.nll_images, "nll_seconds": nll_seconds,
            "gamma": {k: v for k, v in gamma_meta.items() if isinstance(v, (int, float, str)) or v is None},
        }  # fmt: skip
        out_dir = self.output_dir or Path(trainer.default_root_dir) / "head"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"head_epoch{epoch:03d}.json"
        path.write_text(json.dumps(record, indent=1))
        self.history.append({**record, "file": str(path)})
        bands_txt = ", ".join(f"{n}: {b['loss']:.4g}" for n, b in per_band.items())
        nll_txt = "; ".join(f"K={K}: {method} {nll[f'nll_K{K}/{method}']:.3f} vs analytic_ddpm "
                            f"{nll[f'nll_K{K}/analytic_ddpm']:.3f} bits/dim" for K in self.nll_K
                            if f"nll_K{K}/{method}" in nll)
        log.info("head diagnostics at epoch %d / step %d: loss per band %s%s", epoch, step, bands_txt,
                 f"; NLL {nll_txt}" if nll_txt else "")
        return scalars
