"""Rebuilding networks and datamodules from configs read out of files, through an explicit allow list.

A checkpoint stores the config it was trained with (``hyper_parameters["model"]``, ``["data"]``). Handing that to
Hydra's ``instantiate`` would let whoever wrote the file choose any Python callable (``builtins.open``,
``torch.load`` of a pickle, ...) at any depth of the config. Here the ``_target_`` only selects a class from the
fixed tables below, every other value must be plain data (str, int, float, bool, None, lists and dicts of them)
with no Hydra keys (``_target_``, ``_args_``, ``_partial_``, ...) anywhere inside, and every key must be a
parameter of that class. Anything else raises :class:`UnsafeConfigError` before a single object is built.

Configs composed by the user on the command line (``train.py data=... model=...``) are the user's own and still go
through Hydra; whatever was read from a file comes through here.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, UserError

__all__ = ["DATAMODULE_CLASSES", "NETWORK_CLASSES", "UnsafeConfigError", "build_datamodule", "build_network",
           "check_plain", "plain"]

#: accepted ``_target_`` -> "module:Class" (networks)
NETWORK_CLASSES: dict[str, str] = {
    "analytic_dpm.nets.UNet": "analytic_dpm.nets.unet:UNet",
    "analytic_dpm.nets.unet.UNet": "analytic_dpm.nets.unet:UNet",
}

_DATA = {
    "CIFAR10DataModule": "images",
    "CelebA64DataModule": "images",
    "FashionMNISTDataModule": "images",
    "ImageFolderDataModule": "images",
    "GaussianDataModule": "synthetic",
    "GaussianMixtureDataModule": "synthetic",
}
#: accepted ``_target_`` -> "module:Class" (datamodules)
DATAMODULE_CLASSES: dict[str, str] = {
    **{f"analytic_dpm.data.{name}": f"analytic_dpm.data.{mod}:{name}" for name, mod in _DATA.items()},
    **{f"analytic_dpm.data.{mod}.{name}": f"analytic_dpm.data.{mod}:{name}" for name, mod in _DATA.items()},
}

_PLAIN = (str, int, float, bool, type(None))


class UnsafeConfigError(UserError, ValueError):
    """A config read from a file names something outside the allow list or holds non-plain data."""


def check_plain(value: Any, where: str) -> Any:
    """Return ``value`` as plain lists/dicts of str/int/float/bool/None; refuse Hydra keys and other objects."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise UnsafeConfigError(f"{where}: keys must be strings, got {k!r}")
            if k.startswith("_") and k.endswith("_"):
                raise UnsafeConfigError(
                    f"{where}.{k}: Hydra directives ({k}) are not accepted in a config read from a file; only the "
                    "top-level _target_ may name a class, and only one of this package's"
                )
            out[k] = check_plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [check_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise UnsafeConfigError(f"{where}: {type(value).__name__} values are not accepted (plain data only)")


def _resolve(table: dict[str, str], target: Any, what: str, where: str):
    if not isinstance(target, str) or target not in table:
        raise UnsafeConfigError(
            f"{where}._target_ = {target!r} is not one of this package's {what} classes; refusing to build it "
            f"(allowed: {', '.join(sorted(t for t in table if t.count('.') == 2))})"
        )
    module, name = table[target].split(":")
    return getattr(importlib.import_module(module), name)


def _build(table: dict[str, str], cfg: Mapping, what: str, where: str, overrides: Mapping[str, Any]):
    if not isinstance(cfg, Mapping):
        raise UnsafeConfigError(f"{where} must be a mapping with a _target_, got {type(cfg).__name__}")
    cfg = dict(cfg)
    cls = _resolve(table, cfg.pop("_target_", None), what, where)
    kwargs = check_plain({**cfg, **dict(overrides)}, where)
    params = inspect.signature(cls).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise UnsafeConfigError(
                f"{where}: {cls.__name__} has no parameter(s) {unknown}; it takes {', '.join(params)}"
            )
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise ConfigError(f"{where}: {cls.__name__} needs {', '.join(missing)}; add "
                          + ", ".join(f"{m}=..." for m in missing))
    return cls(**kwargs)


def build_network(cfg: Mapping, where: str = "model", **overrides: Any):
    """A network of this package from a config read from a file (``_target_`` + plain keyword arguments)."""
    from torch import nn

    net = _build(NETWORK_CLASSES, cfg, "network", where, overrides)
    if not isinstance(net, nn.Module):  # pragma: no cover - the table only holds modules
        raise UnsafeConfigError(f"{where} did not build an nn.Module")
    return net


def build_datamodule(cfg: Mapping, where: str = "data", **overrides: Any):
    """A datamodule of this package from a config read from a file; ``overrides`` replace keys (e.g. a new root)."""
    return _build(DATAMODULE_CLASSES, cfg, "datamodule", where, overrides)


def plain(obj: Any, *, missing_ok: bool = True) -> Any:
    """A deep copy of ``obj`` made only of dict / list / str / int / float / bool / None (OmegaConf resolved).

    ``missing_ok=False``: a mandatory value left unset (``???``) raises OmegaConf's ``MissingMandatoryValue``
    (which every command line reports as ``<key> is required: pass <key>=...``) instead of staying the text ``???``.
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True, throw_on_missing=not missing_ok)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {str(k): plain(v, missing_ok=missing_ok) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, missing_ok=missing_ok) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(getattr(obj, "numel", None)) and obj.numel() == 1:  # a one-element tensor
        return obj.item()
    if callable(getattr(obj, "tolist", None)):  # numpy arrays and scalars, tensors: their Python values
        return plain(obj.tolist(), missing_ok=missing_ok)
    return str(obj)
