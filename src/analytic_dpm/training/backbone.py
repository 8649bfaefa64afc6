"""The frozen noise predictor a covariance head is trained on (spec section 11): from one of our checkpoints or from
another project's released network.

A backbone spec (the ``backbone`` config group, ``conf/backbone/*.yaml``) is one of

* ``{"ckpt_path": PATH, "use_checkpoint_data": true}``: a training checkpoint of this package; its EMA weights, its
  schedule, its Gamma and (by default) its data config;
* ``{"kind": "improved_diffusion" | "ddpm", "source": PATH, "options": {...}}``: the same options as ``evaluate.py
  pretrained=...`` (:func:`analytic_dpm.pretrained.load`); the network keeps its format's timestep convention
  (``t_offset``, ``t_scale``: what :class:`~analytic_dpm.pretrained.EpsAdapter` feeds it for our t in 1..N), the
  schedule is the format's. ``diffusers`` networks are not this package's UNet, so no head can read their decoder
  features: refused.

:func:`load_backbone` returns a :class:`Backbone`: our :class:`~analytic_dpm.nets.UNet` (eval mode), its timestep
rule, schedule, a plain network config that rebuilds it through :mod:`analytic_dpm.registry`'s allow list, and its
identity: the sha256 of its weights (:func:`analytic_dpm.identity.digest_state_dict`), which a head checkpoint records
so that it is never resumed or loaded against another backbone.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, MissingFileError, UserError
from ..identity import digest_state_dict
from ..nets import UNet
from ..registry import build_network, plain
from ..schedule import NoiseSchedule

log = logging.getLogger(__name__)

__all__ = ["PRETRAINED_KINDS", "Backbone", "BackboneError", "backbone_spec", "check_data_shape", "load_backbone",
           "network_config"]

#: pretrained formats whose networks map onto our UNet (a head reads its decoder's last feature map)
PRETRAINED_KINDS = ("improved_diffusion", "ddpm")
UNET_TARGET = "analytic_dpm.nets.UNet"


class BackboneError(UserError, ValueError):
    """The backbone of a head run cannot be used as given; the message says what to do."""


@dataclass
class Backbone:
    """A frozen noise predictor ready to carry a head.

    Attributes:
        unet: our UNet with the backbone's weights (eval mode, CPU, float32).
        t_offset, t_scale: the network is fed ``(t + t_offset) * t_scale`` for our t in 1..N (``EpsAdapter``'s rule).
        eps_channels: output channels that are eps_hat (a learned-variance network outputs 2C; eps is the first C).
        schedule: the backbone's noise schedule (float64).
        network: a plain config (``_target_`` + kwargs) that rebuilds ``unet`` through the registry.
        identity: ``sha256:...`` of ``unet``'s weights.
        source: JSON-able description of where it came from (checkpoint path and step, or pretrained kind, file,
            file sha256, options, timestep convention).
        spec: the normalised spec it was loaded from (:func:`backbone_spec`).
        gamma, gamma_meta: the backbone's calibrated Gamma (our checkpoints) and its metadata; None / {} otherwise.
        data: the checkpoint's data config (plain), None for a pretrained source.
        timestep_convention: what the network is fed, in words (``"t"``, ``"t - 1"``, ``"t * 1000 / 1000"``).
    """

    unet: UNet
    t_offset: int
    t_scale: float
    eps_channels: int
    schedule: NoiseSchedule
    network: dict[str, Any]
    identity: str
    source: dict[str, Any]
    spec: dict[str, Any]
    gamma: Tensor | None = None
    gamma_meta: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    timestep_convention: str = "t"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.unet.in_channels, self.unet.image_size, self.unet.image_size)


def backbone_spec(spec: Any) -> dict[str, Any]:
    """The normalised spec: ``{"ckpt_path", "use_checkpoint_data"}`` or ``{"kind", "source", "options"}`` (options
    given as None are left out, so the format's defaults apply, as ``evaluate.py pretrained=...`` does)."""
    spec = plain(spec, missing_ok=False) if spec is not None else None
    if not isinstance(spec, Mapping) or not spec:
        raise BackboneError(
            "a head run needs a backbone: backbone=checkpoint backbone.ckpt_path=PATH (a checkpoint of this package) "
            "or backbone=improved_diffusion / backbone=ddpm with backbone.source=PATH and its options"
        )
    if "ckpt_path" in spec:
        unknown = sorted(set(spec) - {"ckpt_path", "use_checkpoint_data"})
        if unknown:
            raise BackboneError(f"backbone: unknown key(s) {unknown} next to ckpt_path; a checkpoint backbone takes "
                                "backbone.ckpt_path and backbone.use_checkpoint_data")
        if not spec["ckpt_path"]:
            raise BackboneError("backbone.ckpt_path is empty: pass the path of a training checkpoint (last.ckpt)")
        return {"ckpt_path": str(spec["ckpt_path"]), "use_checkpoint_data": bool(spec.get("use_checkpoint_data", True))}
    unknown = sorted(set(spec) - {"kind", "source", "options"})
    if unknown or "kind" not in spec:
        raise BackboneError(f"backbone: unknown key(s) {unknown or sorted(spec)}; give backbone.ckpt_path (a "
                            "checkpoint of this package) or backbone.kind, backbone.source and backbone.options.*")
    kind = spec["kind"]
    if kind == "diffusers":
        raise BackboneError(
            "backbone kind 'diffusers': a diffusers UNet2DModel is not this package's UNet, so a covariance head "
            "cannot read its decoder's last feature map. Train a head on an improved_diffusion or ddpm network "
            "(or on a checkpoint of this package); a diffusers model can still be evaluated with the isotropic methods"
        )
    if kind not in PRETRAINED_KINDS:
        raise BackboneError(f"unknown backbone kind {kind!r}; choose checkpoint (backbone.ckpt_path=...) or one of "
                            f"{', '.join(PRETRAINED_KINDS)}")
    if spec.get("source") in (None, ""):
        raise BackboneError(f"backbone.source is required: the path of the {kind} weights file")
    options = {k: v for k, v in (spec.get("options") or {}).items() if v is not None}
    return {"kind": str(kind), "source": str(spec["source"]), "options": options}


def network_config(unet_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A plain registry config (``_target_`` + kwargs) for our UNet's keyword arguments."""
    return {"_target_": UNET_TARGET, **plain(dict(unet_kwargs))}


def _check_rebuilds(unet: UNet, config: Mapping[str, Any], what: str) -> None:
    """The recorded network config must rebuild exactly this network (keys and shapes), or no head checkpoint of it
    could be loaded; checked on the meta device (no memory)."""
    with torch.device("meta"):
        rebuilt = build_network(dict(config), where=f"{what} network config")
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:  # pragma: no cover - a bug in a format's unet_kwargs
        diff = sorted(set(want.items()) ^ set(got.items()))[:4]
        raise RuntimeError(f"the network config of {what} does not rebuild its network: {diff}")


def _from_checkpoint(spec: Mapping[str, Any]) -> Backbone:
    from .checkpoint import load_checkpoint
    from .head_checkpoint import is_head_checkpoint

    path = Path(spec["ckpt_path"]).expanduser()
    if not path.exists():
        raise MissingFileError(f"backbone.ckpt_path={spec['ckpt_path']}: no such checkpoint file")
    if is_head_checkpoint(path):
        raise BackboneError(f"backbone.ckpt_path={path} is a covariance-head checkpoint; a backbone is a noise "
                            "predictor: pass the checkpoint the head was trained on (or train another head on that)")
    loaded = load_checkpoint(path, map_location="cpu")
    if not isinstance(loaded.model, UNet):  # pragma: no cover - the registry only builds UNets
        raise BackboneError(f"{path}: the network is a {type(loaded.model).__name__}, not this package's UNet")
    hp = loaded.hparams
    network = dict(hp["model"])
    network.setdefault("emb_act", False)  # as load_checkpoint: a config of analytic_dpm 0.1.0 lacks the key
    network = plain(network)
    _check_rebuilds(loaded.model, network, str(path))
    meta = dict(loaded.gamma_meta)
    source = {"type": "checkpoint", "path": str(path.resolve()), "weights": meta.get("weights"),
              "global_step": meta.get("checkpoint_step"), "epoch": meta.get("checkpoint_epoch")}
    gamma_meta = {k: meta.get(k) for k in ("M", "epoch", "step", "seconds", "seed")} if loaded.gamma is not None else {}
    return Backbone(
        unet=loaded.model.eval(), t_offset=0, t_scale=1.0, eps_channels=loaded.model.in_channels,
        schedule=loaded.schedule, network=network, identity=digest_state_dict(loaded.model), source=plain(source),
        spec=dict(spec), gamma=loaded.gamma, gamma_meta=plain(gamma_meta),
        data=plain(hp["data"]) if isinstance(hp.get("data"), Mapping) else None, timestep_convention="t",
    )  # fmt: skip


def _from_pretrained(spec: Mapping[str, Any]) -> Backbone:
    from .. import pretrained

    kind = spec["kind"]
    try:
        m = pretrained.load(kind, spec["source"], device="cpu", **dict(spec["options"]))
    except FileNotFoundError as e:
        raise MissingFileError(f"backbone={kind}: {e}") from None
    except pretrained.PretrainedError as e:
        raise BackboneError(f"backbone={kind}: {e}") from None
    adapter = m.eps_model
    unet = getattr(adapter, "net", None)
    if not isinstance(unet, UNet):  # pragma: no cover - both kinds map onto our UNet
        raise BackboneError(f"backbone={kind}: the network is a {type(unet).__name__}, not this package's UNet")
    if m.head_model is not None:
        log.info("backbone=%s was loaded with a covariance head (method=%s); the new head is trained on its noise "
                 "predictor alone", kind, m.options.get("method"))
    kwargs = importlib.import_module(f"analytic_dpm.pretrained.{pretrained.KINDS[kind]}").unet_kwargs(m.options)
    network = network_config(kwargs)
    _check_rebuilds(unet, network, f"backbone={kind} ({m.source})")
    source = {"type": "pretrained", "kind": kind, "source": str(Path(m.source).resolve()),
              "options": plain(dict(spec["options"])), "identity": plain(m.identity)}
    return Backbone(
        unet=unet.eval(), t_offset=int(adapter.t_offset), t_scale=float(adapter.t_scale),
        eps_channels=int(adapter.eps_channels or unet.in_channels), schedule=m.schedule, network=network,
        identity=digest_state_dict(unet), source=source, spec=dict(spec), timestep_convention=m.timestep_convention,
    )  # fmt: skip


def load_backbone(spec: Any) -> Backbone:
    """The backbone of ``spec`` (a ``backbone`` config; see the module docstring), on the CPU, frozen, eval mode."""
    spec = backbone_spec(spec)
    backbone = _from_checkpoint(spec) if "ckpt_path" in spec else _from_pretrained(spec)
    backbone.unet.requires_grad_(False)
    if not all(torch.isfinite(p).all() for p in backbone.unet.parameters()):
        raise BackboneError(f"the backbone ({backbone.source.get('path') or backbone.source.get('source')}) holds "
                            "NaN or inf weights: it is broken; use another checkpoint")
    log.info("backbone: %s (%s), weights %s, timestep fed %s", backbone.source.get("type"),
             backbone.source.get("path") or backbone.source.get("source"), backbone.identity[:23],
             backbone.timestep_convention)
    return backbone


def check_data_shape(backbone: Backbone, shape: tuple[int, ...]) -> None:
    """The images of the head's training data must be those the backbone takes (``ConfigError`` otherwise)."""
    if tuple(shape) != backbone.image_shape:
        c, h, w = backbone.image_shape
        raise ConfigError(
            f"the training data give images of shape {tuple(shape)} but the backbone takes {c}x{h}x{w}: choose the "
            "data the backbone was trained on (data=..., or backbone.use_checkpoint_data=true for a checkpoint)"
        )

