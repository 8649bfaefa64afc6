"""Where the evaluated network's Gamma comes from: a file, a calibration, or the locked cache of a pretrained model.

* :func:`load_gamma_file`: ``eval.gamma_path`` (a calibrate-CLI file, a checkpoint, ``.npy``/``.json``), checked;
  its M, when the file records one, goes into the rows' ``gamma_M``.
* :func:`calibrate_for_eval`: M = ``eval.calibration.num_samples`` on the training split, the network at
  ``eval.precision`` / ``eval.compile`` (like the grid's), through the package's one calibration path
  (:func:`analytic_dpm.calibration.calibrate_gamma`).
* :func:`cached_gamma`: a pretrained model's Gamma, calibrated once per (model, training data, M, batch, seed,
  precision) and kept in ``eval.gamma_cache``; one process calibrates under a file lock, the others (DDP ranks,
  shard jobs) read its file. A cached file is used only when it holds the key it is looked up with and its vector
  matches the checksum written with it; anything else is recomputed, with a warning naming the file.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch

from ..errors import UserError
from ..files import file_lock
from ..gamma import gamma_warnings, read_gamma_file, save_gamma_file
from ..identity import digest_json, digest_tensor, short
from ..validation import check_gamma
from .provenance import gamma_cache_key, precision_label
from .settings import EvalSettings

log = logging.getLogger(__name__)

__all__ = ["GAMMA_LOCK_TIMEOUT_S", "cached_gamma", "calibrate_for_eval", "load_gamma_file", "warn_gamma"]

#: how long a process waits for another one calibrating the same pretrained model's Gamma (a holder that dies
#: releases the lock at once)
GAMMA_LOCK_TIMEOUT_S = 4 * 3600.0


def load_gamma_file(path: str | Path, N: int, where: str = "eval.gamma_path") -> tuple[torch.Tensor, int | None]:
    """``(Gamma of length N+1, the M it was calibrated with or None)`` from a file, checked; :class:`UserError`
    naming ``where`` and the file otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{where}: no such file {p}")
    try:
        g, meta = read_gamma_file(p)
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user error
        raise UserError(f"{where} {p} could not be read as a Gamma vector: {e}") from None
    try:
        gamma = check_gamma(g, N)
    except ValueError as e:
        raise UserError(f"{where} {p}: {e}") from None
    M = meta.get("M")
    return gamma, (int(M) if isinstance(M, int) and not isinstance(M, bool) else None)


def warn_gamma(gamma: torch.Tensor, where: str) -> None:
    """A warning (Python's and the log's) for an implausible Gamma (:func:`analytic_dpm.gamma.gamma_warnings`)."""
    for message in gamma_warnings(gamma):
        warnings.warn(f"{where}: {message}", stacklevel=3)


def calibrate_for_eval(eps_model, schedule, datamodule, s: EvalSettings, device) -> torch.Tensor:
    """Gamma with M = eval.calibration.num_samples, the network at eval.precision / eval.compile (like the grid's)."""
    from ..calibration import calibrate_gamma

    M = s.calibration.num_samples
    log.info("calibrating Gamma with M = %d on the training split (%d network calls, %s)", M, M * schedule.N,
             s.precision)
    gamma, _ = calibrate_gamma(eps_model, schedule, datamodule.train_pool(None), M, s.calibration.batch_size,
                               seed=s.seed, device=device, precision=s.precision, compile=s.compile,
                               compile_mode=s.compile_mode, check=False)
    return gamma


def _cache_problem(path: Path, key: dict, N: int) -> tuple[torch.Tensor | None, str]:
    """The cached Gamma at ``path`` if it is usable for ``key`` (else None and why not)."""
    try:
        gamma, meta = read_gamma_file(path)
        gamma = check_gamma(gamma, N)
    except Exception as e:  # noqa: BLE001 - unreadable, changed or malformed: recomputed
        return None, str(e)
    stored = meta.get("key")
    if stored != json.loads(json.dumps(key, default=str)):
        return None, "it was computed for another model, data or settings (its key differs)"
    if meta.get("sha256") is None:
        return None, "it carries no checksum of its vector"
    return gamma, ""


def cached_gamma(eps_model, schedule, datamodule, s: EvalSettings, device, model_identity: dict
                 ) -> tuple[torch.Tensor, int | None]:
    """Gamma of a pretrained model: ``eval.gamma_path``, else calibrated once on the training split and kept in
    ``eval.gamma_cache`` under a key of (model, training data, M, batch, seed, precision), so later runs reuse it."""
    if s.gamma_path:
        return load_gamma_file(s.gamma_path, schedule.N)
    M = s.calibration.num_samples
    key = gamma_cache_key(model_identity, digest_tensor(datamodule.train_pool(None)), s,
                          precision_label(s.precision, eps_model))
    path = Path(s.gamma_cache).expanduser() / f"gamma-{short(digest_json(key))}.pt" if s.gamma_cache else None
    if path is None:
        return calibrate_for_eval(eps_model, schedule, datamodule, s, device), M
    # one process calibrates, the others (DDP ranks started by srun, shard jobs) wait and then read its file
    with file_lock(path.with_name(path.name + ".lock"), timeout=GAMMA_LOCK_TIMEOUT_S, what=f"the Gamma cache {path}"):
        if path.is_file() and not s.recalibrate:
            gamma, problem = _cache_problem(path, key, schedule.N)
            if gamma is not None:
                log.info("Gamma from the cache %s", path)
                return gamma, M
            message = (f"the cached Gamma {path} is not used: {problem}; recalibrating (M={M}) and replacing it "
                       "(eval.recalibrate=true does this on purpose; deleting the file does too)")
            warnings.warn(message, stacklevel=2)
            log.warning("%s", message)
        gamma = calibrate_for_eval(eps_model, schedule, datamodule, s, device)
        save_gamma_file(path, gamma, M=M, key=json.loads(json.dumps(key, default=str)))
    log.info("Gamma (M=%d) cached in %s", M, path)
    return gamma, M
