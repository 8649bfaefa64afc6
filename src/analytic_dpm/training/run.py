"""``train(cfg)``: the training run behind ``train.py`` (Hydra config ``conf/train.yaml``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, MissingFileError, report_user_errors
from ..registry import plain
from .data import ReproducibleDataModule
from .fitting import fit, start_run
from .fitting import instantiate as _instantiate
from .module import DiffusionModule
from .resume import network_differences

log = logging.getLogger(__name__)

__all__ = ["run_cli", "train"]


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
