"""Typed parsing of another project's flags (given as Python values, CLI strings or Hydra values).

Options reach the adapters from Python calls, from ``evaluate.py pretrained.options.*`` overrides (Hydra has
already turned ``true`` / ``3`` / ``[16,8]`` into values) or pasted from a project's own command line (strings such
as ``"True"``, as its ``str2bool`` accepts). Each flag is coerced to the type of its default; anything else is
refused with a message naming the flag.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import PretrainedError

__all__ = ["as_bool", "as_float", "as_int", "as_int_list", "complete", "resolutions_string"]

_TRUE = {"yes", "true", "t", "y", "1"}
_FALSE = {"no", "false", "f", "n", "0"}


def as_bool(name: str, value: Any) -> bool:
    """A bool, or one of the strings improved-diffusion's ``str2bool`` accepts (yes/no, true/false, t/f, y/n, 1/0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise PretrainedError(f"option {name} must be a boolean (true/false), got {value!r}")


def as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise PretrainedError(f"option {name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise PretrainedError(f"option {name} must be an integer, got {value!r}")


def as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise PretrainedError(f"option {name} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise PretrainedError(f"option {name} must be a number, got {value!r}")


def as_int_list(name: str, value: Any) -> list[int]:
    """``[16, 8]``, ``(16,)``, ``16`` or the comma string ``"16,8"`` (``""``: empty)."""
    if isinstance(value, str):
        items: Sequence[Any] = [v for v in value.replace(" ", "").strip("()[]").split(",") if v]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, Sequence):
        items = list(value)
    else:
        raise PretrainedError(f"option {name} must be a list of integers or a comma string, got {value!r}")
    return [as_int(name, v) for v in items]


def resolutions_string(name: str, value: Any) -> str:
    """improved-diffusion's ``attention_resolutions`` as its canonical comma string (``"16,8"``)."""
    return ",".join(str(v) for v in as_int_list(name, value))


def _coerce(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        return as_bool(name, value)
    if isinstance(default, int):
        return as_int(name, value)
    if isinstance(default, float):
        return as_float(name, value)
    if isinstance(default, str):
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise PretrainedError(f"option {name} must be a string, got {value!r}")
    return value


def complete(options: Mapping[str, Any], defaults: Mapping[str, Any], kind: str,
             extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``defaults`` updated with ``options`` (each coerced to its default's type); unknown names are refused.

    ``extra`` holds this project's own options of the adapter (taken as given, checked by the caller).
    """
    extra = dict(extra or {})
    unknown = sorted(set(options) - set(defaults) - set(extra))
    if unknown:
        raise PretrainedError(
            f"unknown {kind} option(s) {', '.join(unknown)}; known options are that project's flags "
            f"({', '.join(defaults)}) and this tool's own ({', '.join(extra) or 'none'})"
        )
    out = dict(defaults)
    for name, value in options.items():
        if name in defaults:
            out[name] = _coerce(name, value, defaults[name])
    for name, default in extra.items():
        out[name] = options.get(name, default)
    return out
