"""``train(cfg)``: the training run behind ``train.py`` (Hydra config ``conf/train.yaml``)."""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..data import DatasetNotAvailableError
from ..errors import ConfigError, MissingFileError, report_user_errors
from ..registry import plain
from .data import ReproducibleDataModule
from .interrupt import SigtermCheckpoint, SIGTERMException
from .module import DiffusionModule
from .resume import finished_summary, network_differences, resolve_resume

log = logging.getLogger(__name__)

__all__ = ["fit", "run_cli", "start_run", "train"]


def _instantiate(node, what: str, **kwargs):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, (DatasetNotAvailableError, FileNotFoundError)):
            raise cause from None
        raise ConfigError(f"cannot build {what}: {cause}") from None


def _collect(section, what: str) -> list:
    """Instantiate every ``_target_`` entry of a callbacks / logger section (dict of named configs)."""
    out: list = []
    if not section:
        return out
    if not isinstance(section, (DictConfig, Mapping)):
        raise ConfigError(f"{what} must be a mapping of named configs, got {type(section).__name__}")
    for name, node in section.items():
        if isinstance(node, (DictConfig, Mapping)) and "_target_" in node:
            log.info("instantiating %s <%s>", what, node["_target_"])
            out.append(_instantiate(node, f"{what} {name!r}"))
    return out


def _finish_wandb() -> None:
    mod = sys.modules.get("wandb")
    if mod is not None and getattr(mod, "run", None) is not None:
        try:
            mod.finish()
        except Exception as e:  # pragma: no cover
            log.warning("wandb.finish() failed: %s", e)


def _check_ckpt_path(ckpt_path, config: dict) -> str | None:
    """An explicit ``ckpt_path`` to resume: it must be readable and trained with this network and noise schedule
    (anything else fails inside Lightning with a state-dict dump); the differences are listed otherwise."""
    if ckpt_path in (None, ""):
        return None
    from .checkpoint import read_checkpoint

    p = Path(str(ckpt_path)).expanduser()
    if not p.is_file():
        raise MissingFileError(f"ckpt_path={ckpt_path}: no such checkpoint file (resume needs an existing .ckpt)")
    try:
        ckpt = read_checkpoint(p)  # a corrupt, empty or foreign file fails here, clearly
    except ValueError as e:
        raise ConfigError(f"ckpt_path={ckpt_path}: cannot resume from it: {e}") from None
    from .head_checkpoint import is_head_checkpoint

    if is_head_checkpoint(ckpt):
        raise ConfigError(f"ckpt_path={ckpt_path} is a covariance-head checkpoint: resume it with its head run's "
                          "config (experiment=head_... with its backbone=... and head=...), not a noise-predictor run")
    stored = ckpt["hyper_parameters"]
    diffs = network_differences(stored, config)
    if diffs:
        listing = "\n  ".join(diffs[:12]) + (f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise ConfigError(
            f"ckpt_path={ckpt_path} was trained with another network or noise schedule, so this run cannot resume "
            f"it. Differences (checkpoint -> now):\n  {listing}\nResume it with the options it was trained with, "
            "or start a new run without ckpt_path"
        )
    return str(p)


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


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume, with ``cfg.ckpt_path``) one model; returns a summary dict.

    A config with a ``backbone`` (or ``head``) section trains a covariance head on a frozen noise predictor instead
    (:func:`~.head_run.train_head`).

    Summary keys: ``output_dir``, ``last_checkpoint`` (path or None), ``global_step``, ``epoch``,
    ``seconds`` (wall time of ``fit``), ``metrics`` (last logged scalars), ``gamma_history`` (one record
    per calibration), ``module`` and ``trainer`` (the objects, for tests and notebooks).
    """
    if cfg.get("backbone") is not None or cfg.get("head") is not None:
        from .head_run import train_head

        return train_head(cfg)
    if cfg.get("data") is None or cfg.get("model") is None or cfg.get("diffusion") is None:
        raise ConfigError("the config needs data, model and diffusion sections (see conf/train.yaml)")
    config = plain(cfg)  # resolves every interpolation (paths, ${data.channels}, ...)
    ckpt_path = _check_ckpt_path(cfg.get("ckpt_path"), config)
    ckpt_path, output_dir, seed, finished = start_run(cfg, config, ckpt_path)
    if finished is not None:
        return finished

    log.info("instantiating datamodule <%s>", cfg.data.get("_target_"))
    inner = _instantiate(cfg.data, "the datamodule (data=...)")
    datamodule = ReproducibleDataModule(inner, seed=seed)

    mod_cfg = dict(config.get("module") or {})
    target = mod_cfg.pop("_target_", "analytic_dpm.training.DiffusionModule")
    from hydra.utils import get_class

    module_cls = get_class(target)
    try:
        module: DiffusionModule = module_cls(
            model=config["model"], schedule=config["diffusion"]["schedule"], N=int(config["diffusion"]["N"]),
            seed=seed, config=config, **mod_cfg,
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build the module / network: {e}") from None
    log.info("model: %s with %.2fM parameters", config["model"].get("_target_"), module.num_parameters() / 1e6)
    summary = fit(cfg, module, datamodule, ckpt_path, output_dir)
    last = summary["last_checkpoint"]
    if last and not summary["interrupted"]:
        with_gamma = getattr(module, "gamma", None) is not None
        log.info("checkpoint with Gamma: %s" if with_gamma else "checkpoint (no Gamma calibrated: add it with "
                 "`python -m analytic_dpm.calibrate --ckpt %s`): %s", *([last] if with_gamma else [last, last]))
    return summary


def fit(cfg: DictConfig, module, datamodule, ckpt_path: str | None, output_dir: Path,
        drop_callbacks: tuple[type, ...] = ()) -> dict[str, Any]:
    """Build the callbacks, loggers and trainer of ``cfg``, run ``trainer.fit`` (a SIGTERM stops it cleanly after the
    batch, with ``last.ckpt``) and return the run's summary (:func:`train`). ``drop_callbacks``: callback classes that
    do not apply to this module (dropped with a log line)."""
    import lightning as L

    callbacks = _collect(cfg.get("callbacks"), "callback")
    dropped = [c for c in callbacks if isinstance(c, drop_callbacks)] if drop_callbacks else []
    if dropped:
        callbacks = [c for c in callbacks if c not in dropped]
        log.info("callbacks not used by %s: %s", type(module).__name__, ", ".join(type(c).__name__ for c in dropped))
    loggers = _collect(cfg.get("logger"), "logger")
    if cfg.trainer.get("enable_progress_bar", True) is False:  # Lightning refuses a bar callback then
        from lightning.pytorch.callbacks.progress import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not loggers:  # LearningRateMonitor refuses to run without a logger
        dropped = [c for c in callbacks if type(c).__name__ == "LearningRateMonitor"]
        callbacks = [c for c in callbacks if c not in dropped]
        if dropped:
            log.info("no logger: LearningRateMonitor disabled")
    trainer: L.Trainer = _instantiate(cfg.trainer, "the trainer (trainer=...)", callbacks=callbacks,
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


def run_cli(cfg: DictConfig) -> float | None:
    """The Hydra task of ``train.py``: a user error ends with one ``error: ...`` line and exit code 2."""
    if cfg.get("print_config", False):
        print(OmegaConf.to_yaml(cfg, resolve=False))
    with report_user_errors(log, prefix="\n"):
        summary = train(cfg)
    if summary.get("interrupted"):
        print(f"\nstopped by SIGTERM: rerun the same command to resume from {summary['last_checkpoint']}",
              file=sys.stderr)
        raise SystemExit(143)  # 128 + SIGTERM, as a process killed by it
    return summary["metrics"].get("train/loss")
