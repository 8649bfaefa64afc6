"""Covariance-head checkpoints (SN / NPR, spec section 11): what they hold, how to tell one, how to load one.

A head checkpoint is a Lightning checkpoint written by :class:`~analytic_dpm.training.HeadModule`, self-contained
(the backbone's weights are inside: evaluating it needs no other file) and loadable with ``torch.load(...,
weights_only=True)``:

- ``state_dict``: ``net.unet.*`` (the frozen backbone, our UNet), ``net.head.*`` (the trained head),
  ``ema_head.*`` (the head's EMA, used for evaluation);
- ``hyper_parameters``: the run config as plain containers: ``head`` (kind, mode, optimisation), ``backbone`` (the
  spec it was trained from), ``model`` (the backbone's network config), ``diffusion`` (its schedule name and N),
  ``data`` (the training data config), ``trainer``, ``seed``, ...;
- ``analytic_dpm_head`` (:data:`HEAD_CHECKPOINT_KEY`): ``format_version``, ``head_kind`` (``sn`` | ``npr``), ``mode``
  (``simple`` | ``complex``), ``zero_init``, ``backbone_mode`` (``eval`` | ``train``), ``eps_channels``, ``backbone``
  (``identity``: sha256 of its weights; ``source``: where it came from; ``network``: the registry config that
  rebuilds it; ``t_offset``, ``t_scale``, ``timestep_convention``: what it is fed for our t), ``schedule`` (``name``,
  ``betas``: the float64 table [N+1]), ``gamma`` (the backbone's Gamma [N+1] when it came with one, else None) and
  ``gamma_meta``, plus the training counters of an exact resume.

:func:`is_head_checkpoint` tells one from a backbone checkpoint (memory-mapped: the weights are not read);
:func:`load_head_checkpoint` returns a :class:`LoadedHeadCheckpoint` whose ``head_model(x_t, t) -> (eps_hat, head)``
takes our timestep convention. The backbone weights are checked against the recorded identity on every load, and an
expected backbone (``expect_backbone=``) is compared with it: a head is never used on another noise predictor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MissingFileError, UserError
from ..files import safe_torch_load
from ..identity import digest_state_dict
from ..nets import HEAD_KINDS, HEAD_MODES, HeadUNet, UNet
from ..pretrained.heads import HeadAdapter
from ..registry import UnsafeConfigError, build_network
from ..schedule import NoiseSchedule

__all__ = ["HEAD_CHECKPOINT_KEY", "HEAD_FORMAT_VERSION", "HeadCheckpointError", "LoadedHeadCheckpoint",
           "is_head_checkpoint", "load_head_checkpoint", "read_head_record"]

#: key of a head checkpoint's own entry (a backbone checkpoint has ``analytic_dpm`` instead)
HEAD_CHECKPOINT_KEY = "analytic_dpm_head"
HEAD_FORMAT_VERSION = 1


class HeadCheckpointError(UserError, ValueError):
    """A head checkpoint cannot be used as asked (another backbone, damaged weights, not a head checkpoint)."""


@dataclass
class LoadedHeadCheckpoint:
    """A trained covariance head on its backbone, ready for evaluation.

    Attributes:
        head_model: ``head_model(x_t, t) -> (eps_hat, head)``, our convention (integer t in 1..N), one backbone
            forward, the EMA head weights, eval mode, on ``map_location``; ``head_model.head_kind`` is ``"sn"``
            (head = h ~ E[eps^2 | x_t]) or ``"npr"`` (head = g ~ E[(eps - eps_hat)^2 | x_t]); ``head_model.eps_model``
            is the backbone alone.
        eps_model: the backbone noise predictor alone (the same parameters), our convention.
        schedule: the backbone's noise schedule.
        gamma, gamma_meta: the backbone's calibrated Gamma (float64 [N+1]) when it came with one (a checkpoint of
            this package), else None and {}; ``gamma_meta`` also holds ``weights`` (``"ema"`` or ``"raw"``: which head
            weights were loaded), ``checkpoint_step`` and ``checkpoint_epoch``.
        hparams: the head run's config (``data``, ``head``, ``backbone``, ``model``, ``diffusion``, ...).
        backbone_identity: ``sha256:...`` of the backbone's weights.
        backbone_source: where the backbone came from (checkpoint path and step, or pretrained kind and file).
        head_kind, mode: ``"sn"`` | ``"npr"`` and ``"simple"`` | ``"complex"``.
        path: the checkpoint file.
    """

    head_model: HeadAdapter
    eps_model: nn.Module
    schedule: NoiseSchedule
    gamma: Tensor | None
    gamma_meta: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    backbone_identity: str = ""
    backbone_source: dict[str, Any] = field(default_factory=dict)
    head_kind: str = ""
    mode: str = ""
    path: Path | None = None

    @property
    def methods(self) -> tuple[str, str]:
        """The head methods this checkpoint serves (``sn_ddpm``, ``sn_ddim`` or ``npr_ddpm``, ``npr_ddim``)."""
        return (f"{self.head_kind}_ddpm", f"{self.head_kind}_ddim")


def _read(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingFileError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise ValueError(f"{p} is not a file (expected a .ckpt checkpoint file)")
    kwargs = {"mmap": True} if mmap else {}
    try:
        ckpt = safe_torch_load(p, map_location="cpu", what="checkpoint", **kwargs)
    except (ValueError, RuntimeError):
        if not mmap:
            raise
        ckpt = safe_torch_load(p, map_location="cpu", what="checkpoint")  # a legacy (non-zip) file cannot be mapped
    if not isinstance(ckpt, dict):
        raise ValueError(f"{p} does not hold a checkpoint dictionary (found {type(ckpt).__name__})")
    return ckpt


def is_head_checkpoint(path_or_checkpoint: str | os.PathLike | Mapping) -> bool:
    """Whether a checkpoint (a path, or an already loaded dict) is a covariance-head checkpoint of this package.

    Cheap: the file is memory-mapped, so its tensors are not read. Errors of an unreadable file propagate
    (``FileNotFoundError`` / ``ValueError``), as :func:`~analytic_dpm.training.load_checkpoint`'s do.
    """
    ckpt = path_or_checkpoint if isinstance(path_or_checkpoint, Mapping) else _read(path_or_checkpoint, mmap=True)
    return isinstance(ckpt.get(HEAD_CHECKPOINT_KEY), Mapping)


def read_head_record(ckpt: Mapping, where: str = "checkpoint") -> dict[str, Any]:
    """The checked ``analytic_dpm_head`` entry of a loaded head checkpoint (``HeadCheckpointError`` when it is not
    one, or when the entry is incomplete)."""
    record = ckpt.get(HEAD_CHECKPOINT_KEY)
    if not isinstance(record, Mapping):
        raise HeadCheckpointError(
            f"{where} is not a covariance-head checkpoint (no {HEAD_CHECKPOINT_KEY!r} entry): a noise predictor's "
            "checkpoint loads with analytic_dpm.training.load_checkpoint"
        )
    version = record.get("format_version")
    if version != HEAD_FORMAT_VERSION:
        raise HeadCheckpointError(f"{where}: head checkpoint format {version!r}; this version reads format "
                                  f"{HEAD_FORMAT_VERSION}")
    bb = record.get("backbone")
    sched = record.get("schedule")
    problems = []
    if record.get("head_kind") not in HEAD_KINDS:
        problems.append(f"head_kind={record.get('head_kind')!r}")
    if record.get("mode") not in HEAD_MODES:
        problems.append(f"mode={record.get('mode')!r}")
    if not isinstance(bb, Mapping) or not all(k in bb for k in ("identity", "network", "t_offset", "t_scale")):
        problems.append("backbone (identity, network, t_offset, t_scale)")
    if not isinstance(sched, Mapping) or not torch.is_tensor(sched.get("betas")):
        problems.append("schedule (name, betas)")
    if problems:
        raise HeadCheckpointError(f"{where}: the head checkpoint's {HEAD_CHECKPOINT_KEY!r} entry is damaged: "
                                  f"{', '.join(problems)}")
    return dict(record)


def _identity_of(expect: Any) -> str:
    if isinstance(expect, str):
        return expect
    if isinstance(expect, (nn.Module, Mapping)):
        net = getattr(expect, "net", expect) if isinstance(expect, nn.Module) else expect  # an EpsAdapter: its net
        return digest_state_dict(net)
    raise TypeError(f"expect_backbone must be an identity string, a network or a state dict, got {type(expect)}")


def load_head_checkpoint(path: str | os.PathLike, map_location="cpu", *,
                         expect_backbone: str | nn.Module | Mapping | None = None) -> LoadedHeadCheckpoint:
    """Load a head checkpoint for evaluation: the backbone with the EMA head, schedule, the backbone's Gamma, config.

    Args:
        path: a checkpoint written by a head run (:func:`is_head_checkpoint`).
        map_location: where the networks go.
        expect_backbone: the backbone this head must belong to (its identity ``sha256:...``, the network, or its state
            dict); another one is refused. Without it the checkpoint's own backbone is used.

    Raises:
        FileNotFoundError: no such file. HeadCheckpointError (a ValueError): not a head checkpoint, a damaged entry,
        backbone weights that do not hash to the recorded identity, or another backbone than ``expect_backbone``.
    """
    p = Path(path).expanduser()
    ckpt = _read(p)
    record = read_head_record(ckpt, str(p))
    bb = record["backbone"]
    identity = str(bb["identity"])
    if expect_backbone is not None:
        want = _identity_of(expect_backbone)
        if want != identity:
            raise HeadCheckpointError(
                f"{p} holds a head trained on another backbone (weights {identity[:23]}..., from "
                f"{_describe(bb.get('source'))}) than the one given ({want[:23]}...): a head only fits the noise "
                "predictor it was trained on; train a head on this backbone (train.py experiment=head_... )"
            )
    try:
        unet = build_network(dict(bb["network"]), where=f"{p}: {HEAD_CHECKPOINT_KEY}.backbone.network")
    except UnsafeConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a wrong argument value inside an allowed class
        raise HeadCheckpointError(f"{p}: cannot build the backbone network from its recorded config: {e}") from None
    if not isinstance(unet, UNet):  # pragma: no cover - the registry only builds UNets
        raise HeadCheckpointError(f"{p}: the backbone network is a {type(unet).__name__}, not this package's UNet")
    net = HeadUNet(unet, record["head_kind"], record["mode"], eps_channels=int(record.get("eps_channels") or
                                                                              unet.in_channels),
                   zero_init=bool(record.get("zero_init", True)))
    sd = ckpt.get("state_dict") or {}
    backbone_sd = {k[len("net.unet."):]: v for k, v in sd.items() if k.startswith("net.unet.")}
    head_sd = {k[len("ema_head."):]: v for k, v in sd.items() if k.startswith("ema_head.")}
    weights = "ema"
    if not head_sd:
        head_sd, weights = {k[len("net.head."):]: v for k, v in sd.items() if k.startswith("net.head.")}, "raw"
    try:
        unet.load_state_dict(backbone_sd)
        net.head.load_state_dict(head_sd)
    except RuntimeError as e:
        raise HeadCheckpointError(f"{p}: the weights do not match the recorded networks: "
                                  f"{str(e).splitlines()[0]}") from None
    if digest_state_dict(unet) != identity:
        raise HeadCheckpointError(
            f"{p}: the backbone weights inside do not hash to the recorded backbone identity {identity[:23]}...: the "
            "file was altered or damaged; use another copy"
        )
    bad = [k for k, v in head_sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise HeadCheckpointError(f"{p}: the head weights hold NaN or inf (e.g. {bad[0]}): the run diverged or the "
                                  "file is damaged; use an earlier checkpoint")
    net = net.to(map_location if map_location is not None else "cpu").eval()
    head_model = HeadAdapter(net, t_offset=int(bb["t_offset"]), t_scale=float(bb["t_scale"])).eval()
    sched = record["schedule"]
    schedule = NoiseSchedule(torch.as_tensor(sched["betas"], dtype=torch.float64), name=str(sched.get("name")))
    gamma = record.get("gamma")
    if gamma is not None:
        gamma = torch.as_tensor(gamma).to("cpu", torch.float64)
        if gamma.shape != (schedule.N + 1,) or not bool(torch.isfinite(gamma).all()):
            raise HeadCheckpointError(f"{p}: the backbone's Gamma has shape {tuple(gamma.shape)} or non-finite "
                                      f"values (expected [{schedule.N + 1}], finite)")
    meta = dict(record.get("gamma_meta") or {}) if gamma is not None else {}
    meta.update(weights=weights, checkpoint_step=ckpt.get("global_step"), checkpoint_epoch=ckpt.get("epoch"))
    return LoadedHeadCheckpoint(
        head_model=head_model, eps_model=head_model.eps_model, schedule=schedule, gamma=gamma, gamma_meta=meta,
        hparams=dict(ckpt.get("hyper_parameters") or {}), backbone_identity=identity,
        backbone_source=dict(bb.get("source") or {}), head_kind=record["head_kind"], mode=record["mode"], path=p,
    )  # fmt: skip


def _describe(source: Any) -> str:
    if not isinstance(source, Mapping):
        return "an unknown source"
    if source.get("type") == "checkpoint":
        return f"checkpoint {source.get('path')} at step {source.get('global_step')}"
    return f"{source.get('kind')} {source.get('source')}"
