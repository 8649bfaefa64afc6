"""Reading trained checkpoints for evaluation, and calibrating Gamma of an existing checkpoint.

Checkpoint layout (a Lightning checkpoint, loadable with ``torch.load(..., weights_only=True)``):

- ``state_dict``: ``eps_model.*`` (trained weights) and ``ema_model.*`` (EMA weights, used for evaluation)
- ``hyper_parameters``: the full run config as plain containers (sections ``data``, ``model``, ``diffusion``,
  ``module``, ``trainer``, ``seed``, ...)
- ``analytic_dpm``: ``gamma`` (float64 [N+1] or None), ``gamma_M``, ``gamma_epoch``, ``gamma_step``,
  ``calibration_seconds``, ``schedule``, ``N``, plus the training counters used for exact resume
- Lightning's own keys: ``global_step``, ``epoch``, ``optimizer_states``, ``lr_schedulers``, ``loops``,
  ``callbacks``, ...
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MissingFileError
from ..files import atomic_write, safe_torch_load
from ..registry import UnsafeConfigError, build_datamodule, build_network
from ..schedule import NoiseSchedule
from ..seeding import mix_seed

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_KEY", "FORMAT_VERSION", "LoadedCheckpoint", "calibrate_checkpoint", "load_checkpoint",
           "read_checkpoint"]

#: key of this project's entry in a Lightning checkpoint (written by DiffusionModule.on_save_checkpoint)
CHECKPOINT_KEY = "analytic_dpm"
FORMAT_VERSION = 1

CALIBRATE_COMMAND = "python -m analytic_dpm.training.calibrate --ckpt {path} --num-samples 100"


@dataclass
class LoadedCheckpoint:
    """A trained model ready for evaluation.

    Attributes:
        model: the noise predictor with the EMA weights, in eval mode, on ``map_location``.
        schedule: the training noise schedule.
        gamma: calibrated Gamma (float64 [N+1], CPU) or None when the checkpoint has none.
        gamma_meta: ``M``, ``epoch``, ``step``, ``seconds``, ``seed`` of that calibration (absent when there is
            none), plus ``weights`` (``"ema"``; ``"raw"`` if the checkpoint had no EMA), ``checkpoint_step`` and
            ``checkpoint_epoch`` (Lightning's ``global_step`` / ``epoch`` of the checkpoint).
        hparams: the full training config (plain dict; ``data`` and ``model`` sections included).
        path: the checkpoint file.
    """

    model: nn.Module
    schedule: NoiseSchedule
    gamma: Tensor | None
    gamma_meta: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def calibrate_command(self) -> str:
        """The command that adds Gamma to this checkpoint."""
        return CALIBRATE_COMMAND.format(path=self.path)


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with clear errors (FileNotFoundError / ValueError)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingFileError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise ValueError(f"{p} is not a file (expected a .ckpt checkpoint file)")
    ckpt = safe_torch_load(p, map_location=map_location, what="checkpoint")
    if not isinstance(ckpt, dict):
        raise ValueError(f"{p} does not hold a checkpoint dictionary (found {type(ckpt).__name__})")
    missing = [k for k in ("state_dict", "hyper_parameters") if k not in ckpt]
    if missing:
        raise ValueError(f"{p} is not an analytic_dpm training checkpoint: missing {', '.join(missing)}")
    hp = ckpt["hyper_parameters"]
    if not isinstance(hp, Mapping):
        raise ValueError(f"{p}: hyper_parameters is not a dictionary")
    for section in ("model", "diffusion"):
        if not isinstance(hp.get(section), Mapping):
            raise ValueError(f"{p}: hyper_parameters has no {section!r} section (not trained with analytic_dpm?)")
    diff = hp["diffusion"]
    if "schedule" not in diff or "N" not in diff:
        raise ValueError(f"{p}: hyper_parameters.diffusion needs 'schedule' and 'N', got {dict(diff)}")
    return ckpt


def _schedule_of(hp: Mapping, p: Path) -> NoiseSchedule:
    try:
        return NoiseSchedule.from_name(str(hp["diffusion"]["schedule"]), int(hp["diffusion"]["N"]))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{p}: bad diffusion section {dict(hp['diffusion'])}: {e}") from None


def _model_of(ckpt: Mapping, p: Path, map_location) -> tuple[nn.Module, str]:
    hp = ckpt["hyper_parameters"]
    model_cfg = dict(hp["model"]) if isinstance(hp["model"], Mapping) else hp["model"]
    if isinstance(model_cfg, dict) and "emb_act" not in model_cfg:
        # written by analytic_dpm 0.1.0, whose UNet had no SiLU on the time embedding inside ResBlocks
        model_cfg["emb_act"] = False
    try:
        model = build_network(model_cfg, where=f"{p}: hyper_parameters.model")
    except UnsafeConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a wrong argument value inside an allowed class
        raise ValueError(f"{p}: cannot build the network from hyper_parameters.model: {e}") from None
    sd = ckpt["state_dict"]
    weights = {k[len("ema_model."):]: v for k, v in sd.items() if k.startswith("ema_model.")}
    kind = "ema"
    if not weights:
        weights = {k[len("eps_model."):]: v for k, v in sd.items() if k.startswith("eps_model.")}
        kind = "raw"
        if weights:
            log.warning("%s has no EMA weights (ema_model.*): using the trained weights", p)
    if not weights:
        raise ValueError(f"{p}: state_dict has neither ema_model.* nor eps_model.* weights")
    bad = [k for k, v in weights.items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{p}: {len(bad)} weight tensor(s) of the {kind} network hold NaN or inf (e.g. {bad[0]}): the run "
            "diverged or the file is damaged; evaluate an earlier checkpoint, or retrain with a lower lr / in fp32"
        )
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{p}: the weights do not match hyper_parameters.model: {str(e).splitlines()[0]}") from None
    return model.to(map_location if map_location is not None else "cpu").eval(), kind


def _gamma_of(ckpt: Mapping, schedule: NoiseSchedule, p: Path) -> tuple[Tensor | None, dict[str, Any]]:
    state = ckpt.get(CHECKPOINT_KEY) or {}
    if not isinstance(state, Mapping):
        raise ValueError(f"{p}: checkpoint[{CHECKPOINT_KEY!r}] is not a dictionary")
    gamma = state.get("gamma")
    if gamma is None:
        return None, {}
    gamma = torch.as_tensor(gamma).to("cpu", torch.float64)
    if gamma.shape != (schedule.N + 1,):
        raise ValueError(f"{p}: gamma has shape {tuple(gamma.shape)}, expected [{schedule.N + 1}] (N={schedule.N})")
    if not torch.isfinite(gamma).all():
        raise ValueError(f"{p}: gamma holds non-finite values; recalibrate with: {CALIBRATE_COMMAND.format(path=p)}")
    meta = {"M": state.get("gamma_M"), "epoch": state.get("gamma_epoch"), "step": state.get("gamma_step"),
            "seconds": state.get("calibration_seconds"), "seed": state.get("gamma_seed")}
    return gamma, meta


def _refuse_head_checkpoint(ckpt: Mapping, p: Path) -> None:
    """A covariance-head checkpoint (spec section 11) holds a backbone and a head, not ``ema_model.*``: say so."""
    from .head_checkpoint import HEAD_CHECKPOINT_KEY, HeadCheckpointError

    record = ckpt.get(HEAD_CHECKPOINT_KEY)
    if isinstance(record, Mapping):
        raise HeadCheckpointError(
            f"{p} is a covariance-head checkpoint (an {str(record.get('head_kind')).upper()} head on a frozen "
            "backbone): load it with analytic_dpm.training.load_head_checkpoint (its .eps_model is the backbone, "
            "its .gamma the backbone's Gamma)"
        )


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> LoadedCheckpoint:
    """Load a training checkpoint for evaluation: EMA network (eval mode), schedule, Gamma, config.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a checkpoint / corrupt / not from this project / weights or Gamma inconsistent.
    A checkpoint without Gamma loads with ``gamma=None``; ``LoadedCheckpoint.calibrate_command`` says how to add it.
    """
    p = Path(path).expanduser()
    ckpt = read_checkpoint(p, map_location="cpu")
    _refuse_head_checkpoint(ckpt, p)
    hp = ckpt["hyper_parameters"]
    schedule = _schedule_of(hp, p)
    model, kind = _model_of(ckpt, p, map_location)
    gamma, meta = _gamma_of(ckpt, schedule, p)
    meta.update(weights=kind, checkpoint_step=ckpt.get("global_step"), checkpoint_epoch=ckpt.get("epoch"))
    return LoadedCheckpoint(model=model, schedule=schedule, gamma=gamma, gamma_meta=meta, hparams=dict(hp), path=p)


def _atomic_save(obj: Any, out: Path) -> None:
    atomic_write(out, lambda fh: torch.save(obj, fh))


def calibration_precision(precision: str | None, autocast: str | None = None) -> str:
    """The network precision of a calibration: ``precision`` (None: fp32), with ``autocast="bf16"`` as the older
    spelling of ``precision="bf16"``; ``ValueError`` when the two disagree."""
    if autocast not in (None, "none", "bf16"):
        raise ValueError(f"autocast must be None or 'bf16', got {autocast!r}")
    if autocast != "bf16":
        return precision or "fp32"
    if precision not in (None, "bf16"):
        raise ValueError(f"autocast='bf16' and precision={precision!r} disagree: pass precision only")
    return "bf16"


def calibrate_checkpoint(
    path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    num_samples: int = 100,
    batch_size: int = 500,
    datamodule=None,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    autocast: str | None = None,
    data_overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    precision: str | None = None,
    compile: bool | str = False,
) -> LoadedCheckpoint:
    """Estimate Gamma for a checkpoint with its EMA weights and write it into the checkpoint.

    Args:
        path: the checkpoint; ``out_path``: where to write (None: overwrite ``path``, atomically).
        num_samples, batch_size: M and the network batch of :func:`analytic_dpm.estimate_gamma`.
        datamodule: the training data; None builds it from the checkpoint's ``data`` config
            (``data_overrides`` replaces keys, e.g. ``{"root": "/new/data"}``).
        device: default CUDA when available.
        precision, compile: the network's speed options (:func:`analytic_dpm.accel.prepare_eps_model`): ``"fp32"``
            (TF32 off; the default, None), ``"tf32"`` or ``"bf16"``; ``compile`` True / False / ``"auto"`` (CUDA only).
            ``autocast="bf16"`` is the older spelling of ``precision="bf16"``.
    Returns the :class:`LoadedCheckpoint` of the written file (model on ``device``).
    """
    p = Path(path).expanduser()
    ckpt = read_checkpoint(p, map_location="cpu")
    _refuse_head_checkpoint(ckpt, p)
    hp = ckpt["hyper_parameters"]
    schedule = _schedule_of(hp, p)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, kind = _model_of(ckpt, p, dev)
    if datamodule is None:
        if not isinstance(hp.get("data"), Mapping):
            raise ValueError(f"{p}: hyper_parameters has no 'data' section; pass a datamodule")
        datamodule = build_datamodule(hp["data"], where="hyper_parameters.data", **dict(data_overrides or {}))
    precision = calibration_precision(precision, autocast)
    from ..calibration import calibrate_gamma

    gseed = mix_seed(int(seed), "gamma-calibration", "checkpoint")
    gamma, seconds = calibrate_gamma(model.eval(), schedule, datamodule.train_pool(None), num_samples, batch_size,
                                     seed=gseed, device=dev, precision=precision, compile=compile,
                                     progress=progress, where=f"Gamma calibration of {p}")
    state = dict(ckpt.get(CHECKPOINT_KEY) or {})
    state.update(
        gamma=gamma, gamma_M=int(num_samples), gamma_epoch=ckpt.get("epoch"), gamma_step=ckpt.get("global_step"),
        calibration_seconds=float(seconds), gamma_seed=gseed, schedule=schedule.name, N=schedule.N,
        gamma_precision=precision,
    )  # fmt: skip
    ckpt[CHECKPOINT_KEY] = state
    out = Path(out_path).expanduser() if out_path is not None else p
    _atomic_save(ckpt, out)
    log.info("wrote Gamma (M=%d, %.1fs) into %s", num_samples, seconds, out)
    meta = {"M": int(num_samples), "epoch": ckpt.get("epoch"), "step": ckpt.get("global_step"), "seconds": seconds,
            "seed": gseed, "weights": kind, "checkpoint_step": ckpt.get("global_step"),
            "checkpoint_epoch": ckpt.get("epoch")}
    return LoadedCheckpoint(model=model, schedule=schedule, gamma=gamma, gamma_meta=meta, hparams=dict(hp), path=out)
