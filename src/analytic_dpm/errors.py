"""The one base class of the errors a user fixes, and how every command line reports them.

Every command of this package (``train.py``, ``evaluate.py``, ``python -m analytic_dpm.calibrate``, ``python -m
analytic_dpm.evaluation.merge``) ends a :class:`UserError` with one ``error: <message>`` line on stderr and exit code
2, without a traceback: the message says what is wrong and what to do. Each part of the package raises its own
subclass (a settings error, an unsafe config, a missing dataset, a diverged run, ...); those also derive from the
built-in type a Python caller would expect (``ValueError``, ``FileNotFoundError``, ``RuntimeError``), so code that
catches those keeps working.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

__all__ = ["ConfigError", "MissingFileError", "UserError", "missing_value_message", "report_user_errors"]


class UserError(Exception):
    """A problem the user fixes (a bad setting, a missing file, no Gamma, ...); the message says what to do."""


class ConfigError(UserError, ValueError):
    """A setting of a run config is wrong; the message says which and how to fix it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named does not exist; the message names it and what to pass instead."""


def missing_value_message(err) -> str:
    """``data.train_dir is required: pass data.train_dir=...`` for OmegaConf's MissingMandatoryValue (``???``)."""
    key = getattr(err, "full_key", None) or str(err).split("\n")[0]
    return f"{key} is required: pass {key}=... on the command line"


@contextlib.contextmanager
def report_user_errors(log: logging.Logger | None = None, prefix: str = "") -> Iterator[None]:
    """Turn a :class:`UserError` (or OmegaConf's missing ``???`` value) raised inside the block into one
    ``error: ...`` line on stderr and ``SystemExit(2)``; anything else propagates with its traceback."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        yield
    except UserError as err:
        if log is not None:
            log.error("%s", err)
        print(f"{prefix}error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except MissingMandatoryValue as err:
        print(f"{prefix}error: {missing_value_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None
