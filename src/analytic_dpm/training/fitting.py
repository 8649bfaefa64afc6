"""What every training run does around its module: resuming, seeding, the run directory, callbacks, loggers, the
trainer, ``fit`` (stopped cleanly by SIGTERM) and the run's summary. Shared by :func:`~.run.train` (a noise predictor)
and :func:`~.head_run.train_head` (a covariance head)."""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..data import DatasetNotAvailableError
from ..errors import ConfigError
from .interrupt import SigtermCheckpoint, SIGTERMException
from .resume import finished_summary, resolve_resume

log = logging.getLogger(__name__)

__all__ = ["collect", "fit", "instantiate", "start_run"]


def instantiate(node, what: str, **kwargs):
    """Hydra's ``instantiate`` of a user's config node; a failure becomes one :class:`ConfigError` naming ``what``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, (DatasetNotAvailableError, FileNotFoundError)):
            raise cause from None
        raise ConfigError(f"cannot build {what}: {cause}") from None


def collect(section, what: str) -> list:
    """Instantiate every ``_target_`` entry of a callbacks / logger section (dict of named configs)."""
    out: list = []
    if not section:
        return out
    if not isinstance(section, (DictConfig, Mapping)):
        raise ConfigError(f"{what} must be a mapping of named configs, got {type(section).__name__}")
    for name, node in section.items():
        if isinstance(node, (DictConfig, Mapping)) and "_target_" in node:
            log.info("instantiating %s <%s>", what, node["_target_"])
            out.append(instantiate(node, f"{what} {name!r}"))
    return out


def _finish_wandb() -> None:
    mod = sys.modules.get("wandb")
    if mod is not None and getattr(mod, "run", None) is not None:
        try:
            mod.finish()
        except Exception as e:  # pragma: no cover
            log.warning("wandb.finish() failed: %s", e)


def start_run(cfg: DictConfig, config: dict[str, Any], ckpt_path: str | None
              ) -> tuple[str | None, Path, int, dict[str, Any] | None]:
    """What every training run does before building anything: pick the checkpoint to resume (``ckpt_path`` given,
    or this run directory's own: :func:`~.resume.resolve_resume`), fix and apply the seed, create the run directory.

    ``config`` is the run config as it will be stored (its ``seed`` is set here). Returns ``(checkpoint to resume or
    None, output directory, seed, summary of an already finished run or None)``.
    """
    import lightning as L
    import torch

    seed = cfg.get("seed")
    output_dir = Path(config.get("paths", {}).get("output_dir") or os.getcwd())
    resumed_config = None
    if ckpt_path is None:  # a directory with checkpoints: resume the same run, refuse another (resolve_resume)
        ckpt_path, resumed_config = resolve_resume(config, output_dir, bool(cfg.get("overwrite", False)),
                                                   seed_given=seed is not None)
        if ckpt_path:
            log.info("%s already holds this run: resuming from %s", output_dir, ckpt_path)
    if seed is None:
        seed = (resumed_config or {}).get("seed")
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
            log.info("seed=null: drew seed %d", seed)
    seed = int(seed)
    L.seed_everything(seed, workers=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(str(cfg.float32_matmul_precision))
    config["seed"] = seed
    output_dir.mkdir(parents=True, exist_ok=True)
    finished = None
    if ckpt_path:  # a finished run: nothing to train (said, naming the checkpoint and where nothing was written)
        finished = finished_summary(ckpt_path, cfg, output_dir, explicit=resumed_config is None)
    return ckpt_path, output_dir, seed, finished


def fit(cfg: DictConfig, module, datamodule, ckpt_path: str | None, output_dir: Path,
        drop_callbacks: tuple[type, ...] = ()) -> dict[str, Any]:
    """Build the callbacks, loggers and trainer of ``cfg``, run ``trainer.fit`` (a SIGTERM stops it cleanly after the
    batch, with ``last.ckpt``) and return the run's summary (:func:`train`). ``drop_callbacks``: callback classes that
    do not apply to this module (dropped with a log line)."""
    import lightning as L

    callbacks = collect(cfg.get("callbacks"), "callback")
    dropped = [c for c in callbacks if isinstance(c, drop_callbacks)] if drop_callbacks else []
    if dropped:
        callbacks = [c for c in callbacks if c not in dropped]
        log.info("callbacks not used by %s: %s", type(module).__name__, ", ".join(type(c).__name__ for c in dropped))
    loggers = collect(cfg.get("logger"), "logger")
    if cfg.trainer.get("enable_progress_bar", True) is False:  # Lightning refuses a bar callback then
        from lightning.pytorch.callbacks.progress import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        dropped = [c for c in callbacks if type(c).__name__ == "LearningRateMonitor"]
        callbacks = [c for c in callbacks if c not in dropped]
        if dropped:
            log.info("no logger: LearningRateMonitor disabled")
    trainer: L.Trainer = instantiate(cfg.trainer, "the trainer (trainer=...)", callbacks=callbacks,
                                      logger=loggers if loggers else False)

    start = time.perf_counter()
    interrupted = False
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    except SIGTERMException:  # stopped by SIGTERM after a batch; SigtermCheckpoint wrote last.ckpt
        interrupted = True
    finally:
        _finish_wandb()
    seconds = time.perf_counter() - start

    last = None
    ckpt_cb = getattr(trainer, "checkpoint_callback", None)
    if ckpt_cb is not None:
        last = getattr(ckpt_cb, "last_model_path", None) or getattr(ckpt_cb, "best_model_path", None) or None
    history: list = []
    head_history: list = []
    for cb in trainer.callbacks:
        history.extend(getattr(cb, "history", []) if type(cb).__name__ == "GammaCalibration" else [])
        head_history.extend(getattr(cb, "history", []) if type(cb).__name__ == "HeadDiagnostics" else [])
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
    summary = {
        "output_dir": str(output_dir),
        "last_checkpoint": last,
        "global_step": int(trainer.global_step),
        "epoch": int(trainer.current_epoch),
        "seconds": seconds,
        "metrics": metrics,
        "gamma_history": history,
        "head_history": head_history,
        "module": module,
        "trainer": trainer,
        "interrupted": interrupted,
    }
    if interrupted:
        saved = [cb.path for cb in trainer.callbacks if isinstance(cb, SigtermCheckpoint) and cb.path is not None]
        where = f"{saved[0]}" if saved else "its last checkpoint"
        log.warning("stopped by SIGTERM at step %d: rerun the same command to resume from %s", trainer.global_step,
                    where)
        summary["last_checkpoint"] = str(saved[0]) if saved else last
    return summary
