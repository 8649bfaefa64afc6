"""Stopping cleanly on SIGTERM (SLURM sends it before the kill; so do ``scancel`` and most job schedulers).

Lightning notices the signal, finishes the batch it is on and stops. :class:`SigtermCheckpoint` then writes
``last.ckpt`` into the checkpoint directory, so the same command resumes exactly where the run stopped (the batch
order, the RNG of every step and the EMA are functions of the batch count: :mod:`.data`, :mod:`.module`), and the
Gamma calibration of an epoch end that the signal interrupted is skipped (:class:`~.gamma_callback.GammaCalibration`
checks ``trainer.received_sigterm``): a job about to be killed should stop, not start minutes of work.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

__all__ = ["SIGTERMException", "SigtermCheckpoint"]


class SigtermCheckpoint(Callback):
    """On SIGTERM, write ``last.ckpt`` (where ``ModelCheckpoint`` writes it) before the run stops."""

    def __init__(self, filename: str = "last.ckpt"):
        self.filename = filename
        self.path: Path | None = None  # the checkpoint written, once it is

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not (isinstance(exception, SIGTERMException) or getattr(trainer, "received_sigterm", False)):
            return
        ckpt = getattr(trainer, "checkpoint_callback", None)
        directory = getattr(ckpt, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        self.path = Path(directory) / self.filename
        trainer.save_checkpoint(self.path)  # every rank calls it; the strategy writes once
        log.warning("SIGTERM: stopped after step %d; wrote %s (the same command resumes from it)",
                    trainer.global_step, self.path)
