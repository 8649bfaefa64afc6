"""``train_head(cfg)``: the covariance-head run behind ``train.py`` (spec section 11), chosen by a ``backbone`` section.

    python train.py experiment=head_quickstart backbone.ckpt_path=outputs/demo/train/checkpoints/last.ckpt
    python train.py experiment=head_cifar10_ls backbone.source=cifar10_ls.pth head=sn
    python train.py experiment=head_cifar10_ls backbone=checkpoint backbone.ckpt_path=PATH   # our own CIFAR-10 model

The config's sections, as a head run reads them:

* ``backbone`` (config group ``conf/backbone``): the frozen noise predictor (:mod:`.backbone`);
* ``head`` (config group ``conf/head``: ``sn`` / ``npr``): what the head estimates, its architecture (``mode``),
  ``backbone_mode`` and the optimisation (:class:`~.head_module.HeadModule`'s arguments);
* ``data``: the training data. A checkpoint backbone trains on its checkpoint's own data config
  (``backbone.use_checkpoint_data=true``, the default; this run's ``data`` is then not used, and its differences are
  logged), a pretrained backbone on this run's ``data``;
* ``trainer``, ``callbacks``, ``logger``, ``seed``, ``ckpt_path``, ``overwrite``: as for any training run;
* ``model``, ``diffusion`` and ``module`` describe a noise predictor's training and are not used: the network and
  the schedule are the backbone's (they are recorded as the head checkpoint's ``model`` and ``diffusion``).

Resuming follows :mod:`.resume` (the backbone and the head are run-defining) and is refused against another backbone
(the weights identity recorded in the checkpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..errors import ConfigError, MissingFileError
from ..registry import build_datamodule, plain
from .backbone import Backbone, backbone_spec, load_backbone
from .data import ReproducibleDataModule
from .fitting import fit, instantiate, start_run
from .gamma_callback import GammaCalibration
from .head_checkpoint import HeadCheckpointError, _read, read_head_record
from .head_module import HeadModule, check_resume_record
from .resume import _differences

log = logging.getLogger(__name__)

__all__ = ["head_data_config", "train_head"]


def head_data_config(cfg: DictConfig, backbone: Backbone) -> tuple[dict[str, Any], bool]:
    """``(the head's training data config, whether it was read from the backbone's checkpoint)`` (module docstring)."""
    spec = backbone.spec
    use_checkpoint = "ckpt_path" in spec and spec.get("use_checkpoint_data", True)
    # a mandatory value (???) of this run's data matters only when the data are used
    run_data = plain(cfg.get("data"), missing_ok=use_checkpoint) if cfg.get("data") is not None else None
    if use_checkpoint:
        if backbone.data is None:
            raise ConfigError(f"the backbone checkpoint {spec['ckpt_path']} records no data config: pass "
                              "backbone.use_checkpoint_data=false and data=... (the data it was trained on)")
        if run_data is not None:
            diffs = _differences(backbone.data, run_data, "data.")
            if diffs:
                log.info("training data: the backbone checkpoint's data config; this run's data=... differs in %s "
                         "and is not used (backbone.use_checkpoint_data=false trains on it instead)",
                         "; ".join(diffs[:6]))
        return dict(backbone.data), True
    if not isinstance(run_data, Mapping) or "_target_" not in run_data:
        raise ConfigError("a head on a pretrained backbone needs data=<name> (and its paths): the dataset the backbone "
                          "was trained on")
    return run_data, False


def _check_resumable(ckpt_path: str, module_like: Any, what: str) -> None:
    """The checkpoint a head run resumes must be a head checkpoint of this backbone and head (clear refusals)."""
    try:
        record = read_head_record(_read(ckpt_path, mmap=True), str(ckpt_path))
    except HeadCheckpointError as e:
        raise ConfigError(f"{what}={ckpt_path} cannot be resumed by a head run: {e}") from None
    check_resume_record(record, module_like)


class _Expected:
    """The backbone identity and head settings a resumed checkpoint must match (before the module exists)."""

    def __init__(self, backbone: Backbone, head: Mapping[str, Any]):
        self.backbone = backbone
        self.backbone_identity = backbone.identity
        self.head_kind = head.get("kind")
        self.mode = head.get("mode", "simple")


def train_head(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) a covariance head on a frozen backbone; returns the summary of :func:`~.run.train` (plus
    ``head_history``: one record per :class:`~.head_callback.HeadDiagnostics` report)."""
    if cfg.get("head") is None:
        raise ConfigError("backbone=... trains a covariance head on that noise predictor: choose it with head=npr or "
                          "head=sn (and head.mode=simple|complex), or use experiment=head_quickstart / head_cifar10_ls")
    if cfg.get("backbone") is None:
        raise ConfigError("head=... needs the noise predictor it is trained on: backbone=checkpoint "
                          "backbone.ckpt_path=PATH (a checkpoint of this package), or backbone=improved_diffusion / "
                          "backbone=ddpm with backbone.source=PATH and its options")
    spec = backbone_spec(cfg.get("backbone"))
    head = plain(cfg.get("head"), missing_ok=False)
    if not isinstance(head, Mapping):
        raise ConfigError(f"head must be a config group (head=npr or head=sn), got {head!r}")
    backbone = load_backbone(spec)
    data_cfg, data_from_file = head_data_config(cfg, backbone)

    config = plain(cfg)  # resolves every interpolation
    config.pop("module", None)  # the noise predictor's training settings: not used here (module docstring)
    config.update(data=data_cfg, backbone=backbone.spec, head=dict(head), model=dict(backbone.network),
                  diffusion={"schedule": backbone.schedule.name, "N": backbone.schedule.N})
    expected = _Expected(backbone, head)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path not in (None, ""):
        if not Path(str(ckpt_path)).expanduser().is_file():
            raise MissingFileError(f"ckpt_path={ckpt_path}: no such checkpoint file (resume needs an existing .ckpt)")
        _check_resumable(str(ckpt_path), expected, "ckpt_path")
        ckpt_path = str(Path(str(ckpt_path)).expanduser())
    else:
        ckpt_path = None
    ckpt_path, output_dir, seed, finished = start_run(cfg, config, ckpt_path)
    if ckpt_path:
        _check_resumable(ckpt_path, expected, "the run directory's checkpoint")
    if finished is not None:
        return finished

    if data_from_file:  # read from a file: rebuilt through the registry's allow list, never by Hydra
        log.info("instantiating datamodule <%s> (the backbone checkpoint's data config)", data_cfg.get("_target_"))
        inner = build_datamodule(data_cfg, where=f"{spec['ckpt_path']}: hyper_parameters.data")
    else:
        log.info("instantiating datamodule <%s>", data_cfg.get("_target_"))
        inner = instantiate(cfg.data, "the datamodule (data=...)")
    datamodule = ReproducibleDataModule(inner, seed=seed)

    try:
        module = HeadModule(backbone=backbone, seed=seed, config=config, **dict(head))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build the head module: {e}") from None
    log.info("head: %s (%s) with %.3fM trainable parameters on a frozen backbone of %.2fM", module.head_kind,
             module.mode, module.num_parameters() / 1e6, sum(p.numel() for p in backbone.unet.parameters()) / 1e6)
    summary = fit(cfg, module, datamodule, ckpt_path, output_dir, drop_callbacks=(GammaCalibration,))
    last = summary["last_checkpoint"]
    if last and not summary["interrupted"]:
        log.info("head checkpoint (%s head on backbone %s): %s", module.head_kind, backbone.identity[:23], last)
    return summary
