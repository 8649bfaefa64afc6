"""The typed boundary of ``evaluate.py``: the whole request parsed once, before anything costly runs.

:meth:`EvalRequest.from_config` turns the composed Hydra config into frozen values: the evaluation settings
(:class:`~.settings.EvalSettings`), the source of the noise predictor (:class:`CheckpointSource`,
:class:`PretrainedSource` or :class:`OracleSource`: exactly one), the data config (plain, or None for the
checkpoint's own), the trainer (devices, DDP, nodes), W&B, and the output directory. Every problem is a
:class:`~analytic_dpm.errors.UserError` naming the key; below this module no code reads a ``DictConfig``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..registry import plain
from .settings import EvalSettings

log = logging.getLogger(__name__)

__all__ = ["CheckpointSource", "EvalRequest", "OracleSource", "PretrainedSource", "WandbSettings"]

WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class CheckpointSource:
    """A training checkpoint of this package (EMA weights, schedule, Gamma, data config inside)."""

    path: str


@dataclass(frozen=True)
class PretrainedSource:
    """Another project's network: ``analytic_dpm.pretrained.load(kind, source, **options)``."""

    kind: str
    source: Any
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> PretrainedSource:
        """From the ``pretrained`` config group (``kind``, ``source``, ``options.*``; null options are left out, so
        the format's own defaults apply)."""
        if not isinstance(spec, Mapping):
            raise UserError(f"pretrained must be a config group (diffusers, improved_diffusion, ddpm), got {spec!r}")
        unknown = sorted(set(spec) - {"kind", "source", "options"})
        if unknown:
            raise UserError(f"pretrained: unknown key(s) {unknown}; give pretrained.kind, .source and .options.*")
        options = {k: v for k, v in (spec.get("options") or {}).items() if v is not None}
        return cls(kind=str(spec.get("kind")), source=spec.get("source"), options=options)


@dataclass(frozen=True)
class OracleSource:
    """An exact noise predictor (spec section 9): ``model`` is the oracle's config, on the ``diffusion`` schedule."""

    model: Mapping[str, Any]
    schedule: str
    N: int


Source = CheckpointSource | PretrainedSource | OracleSource


@dataclass(frozen=True)
class WandbSettings:
    mode: str = "offline"  # offline (files under the run directory) | online | disabled
    project: str = "analytic-dpm"
    name: str | None = None
    group: str | None = None  # "" / None: the multirun's sweep directory name
    tags: tuple[str, ...] = ()
    config: Mapping[str, Any] | None = None  # the whole resolved config, as W&B's run config


@dataclass(frozen=True)
class EvalRequest:
    settings: EvalSettings
    source: Source
    out_dir: Path
    data: Mapping[str, Any] | None = None  # the data config (plain); None: the checkpoint's own
    trainer: Mapping[str, Any] | None = None  # the trainer config (plain): devices, strategy, nodes
    wandb: WandbSettings = field(default_factory=WandbSettings)

    @classmethod
    def from_config(cls, cfg) -> EvalRequest:
        """Parse the composed ``conf/evaluate.yaml`` (a DictConfig or a dict); raises :class:`UserError`."""
        settings = EvalSettings.from_config(cfg.get("eval"))  # SettingsError is a UserError
        source = _source(cfg)
        if isinstance(source, PretrainedSource) and not cfg.get("data"):
            raise UserError(
                "pretrained=... needs data=<name> (and its paths): the dataset the model was trained on; Gamma is "
                "calibrated on its training split, NLL uses its held-out split, FID its training statistics"
            )
        _warn_ignored(cfg, source)
        data = plain(cfg.get("data"), missing_ok=False) if cfg.get("data") else None
        trainer = plain(cfg.get("trainer")) if cfg.get("trainer") else None
        paths = cfg.get("paths") or {}
        out_dir = paths.get("output_dir") if hasattr(paths, "get") else None
        if not out_dir:
            raise UserError("paths.output_dir is not set: run through evaluate.py (Hydra sets it) or pass it")
        return cls(settings=settings, source=source, out_dir=Path(str(out_dir)), data=data, trainer=trainer,
                   wandb=_wandb(cfg))


def _source(cfg) -> Source:
    """Exactly one source of the noise predictor: ``ckpt_path``, ``pretrained`` or ``model=oracle_*``."""
    model_cfg = cfg.get("model") or {}
    if not isinstance(model_cfg, Mapping) and not hasattr(model_cfg, "get"):
        raise UserError(f"model must be a config group (oracle_gaussian, oracle_gmm), got {model_cfg!r}")
    given = [name for name, value in (("ckpt_path", cfg.get("ckpt_path")), ("model", model_cfg.get("oracle")),
                                      ("pretrained", cfg.get("pretrained"))) if value]
    if len(given) > 1:
        raise UserError(f"give one source of the noise predictor, not several: {' and '.join(given)}")
    if cfg.get("pretrained"):
        return PretrainedSource.from_spec(plain(cfg.get("pretrained")))
    if model_cfg.get("oracle"):
        diffusion = plain(cfg.get("diffusion") or {})
        try:
            schedule, N = str(diffusion["schedule"]), int(diffusion["N"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"diffusion: needs schedule and N for an oracle ({e})") from None
        return OracleSource(model=plain(model_cfg), schedule=schedule, N=N)
    if model_cfg:
        raise UserError("model= selects an exact oracle (oracle_gaussian, oracle_gmm) for evaluation; a trained "
                        "network comes from ckpt_path=PATH")
    if not cfg.get("ckpt_path"):
        raise UserError("pass ckpt_path=PATH (a training checkpoint), pretrained=KIND pretrained.source=PATH (another "
                        "project's network), or model=oracle_gaussian / model=oracle_gmm")
    return CheckpointSource(path=str(cfg.get("ckpt_path")))


def _command_line_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not running under Hydra (tests, notebooks)
        return []


def _warn_ignored(cfg, source: Source) -> None:
    """Options that have no effect with the chosen source are warned about, not silently dropped."""
    if isinstance(source, CheckpointSource):
        ignored = [o for o in _command_line_overrides() if o.split("=", 1)[0].lstrip("+~") in ("diffusion",)
                   or o.startswith("diffusion.")]
        for o in ignored:
            log.warning("%s is ignored: a checkpoint carries its own noise schedule", o)


def _wandb(cfg) -> WandbSettings:
    w = plain(cfg.get("wandb") or {})
    mode = str(w.get("mode", "offline"))
    if mode not in WANDB_MODES:
        raise UserError(f"wandb.mode: unknown value {mode!r}; choose one of {', '.join(WANDB_MODES)}")
    config = None
    if mode != "disabled":
        config = plain(cfg)  # the whole resolved config, W&B's run config
    return WandbSettings(mode=mode, project=w.get("project") or "analytic-dpm", name=w.get("name"),
                         group=w.get("group") or None, tags=tuple(plain(cfg.get("tags")) or ()), config=config)
