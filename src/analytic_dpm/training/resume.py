"""Resuming training: which checkpoint a run directory continues from, and exact epoch boundaries after a resume.

* :func:`resolve_resume`: ``train.py`` into a directory that already holds checkpoints resumes the same run
  automatically (a requeued SLURM job restarts with its original arguments and must pick up its own last
  checkpoint), refuses another config (saying what differs and how to proceed), or with ``overwrite=true`` moves the
  old checkpoints aside.
* :func:`normalize_epoch_end_checkpoint`: a checkpoint written at the end of an epoch (``ModelCheckpoint`` with
  ``save_on_train_epoch_end``, as this project configures it) records that epoch as processed but not completed.
  Lightning 2.6, in step-based training, then resumes "at the epoch end" and runs the next epoch one batch short,
  so every later kept checkpoint and Gamma calibration lands one step early (2, 3, 5 instead of 2, 4, 6). Marking
  the epoch completed and the batch counters of the new epoch at zero restores it exactly as the start of the next
  epoch, which is what the uninterrupted run did next.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["finished_summary", "normalize_epoch_end_checkpoint", "resolve_resume"]

#: config sections that define a training run: resuming a directory with any of them changed is refused (a head
#: run, spec section 11, is also defined by its frozen noise predictor ``backbone`` and its ``head``; its ``model`` and
#: ``diffusion`` are the backbone's)
RUN_DEFINING = ("data", "model", "diffusion", "module", "seed", "backbone", "head")
#: keys of those sections that only set how fast the same run goes (no change to what is trained beyond float
#: rounding): changing them, or their absence in a checkpoint written before they existed, never refuses a resume
SPEED_ONLY = tuple(f"{section}.{key}" for section in ("module", "head")
                   for key in ("compile", "compile_mode", "channels_last", "attention_float32", "fused_optimizer"))
#: trainer keys that change what is trained (max_steps may grow: that continues the run)
TRAINER_DEFINING = ("precision", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
                    "limit_train_batches", "devices", "num_nodes", "strategy")


def _global_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between a stored and a new plain config (``model.base_channels: 32 -> 64``).

    Only keys of the new config count: a stored checkpoint may record more (the module writes every argument).
    """
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for k in sorted(new, key=str):
            out += _differences(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoints of a run directory, the one to resume first: ``last.ckpt``, then the others, newest first."""
    if not ckpt_dir.is_dir():
        return []
    others = sorted((p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt"), key=lambda p: p.stat().st_mtime,
                    reverse=True)
    last = ckpt_dir / "last.ckpt"
    return ([last] if last.is_file() else []) + others


def resolve_resume(config: Mapping[str, Any], output_dir: Path, overwrite: bool, seed_given: bool
                   ) -> tuple[str | None, dict[str, Any] | None]:
    """What to do with a run directory that already holds checkpoints (``ckpt_path`` not given).

    Returns ``(checkpoint to resume from or None, its stored config or None)``: the same run config resumes
    automatically (exact resume, kept checkpoints and Gamma calibrations on the same steps as without the
    interruption); another config raises :class:`ConfigError` saying what differs and how to proceed;
    ``overwrite`` moves the old checkpoints aside and starts afresh.
    """
    from .checkpoint import read_checkpoint

    ckpt_dir = output_dir / "checkpoints"
    candidates = _candidates(ckpt_dir)
    if not candidates:
        return None, None
    if overwrite:
        if _global_rank() == 0:
            aside = ckpt_dir.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            ckpt_dir.rename(aside)
            log.warning("overwrite=true: moved the previous checkpoints of %s to %s", output_dir, aside)
        return None, None
    existing, stored, unreadable = None, None, []
    for path in candidates:  # a job killed while writing last.ckpt (preemption) leaves it damaged: use the next
        try:
            stored = dict(read_checkpoint(path)["hyper_parameters"])
            existing = path
            break
        except (OSError, ValueError) as e:
            unreadable.append(f"{path.name}: {e}")
            log.warning("cannot resume from %s (%s); trying the next checkpoint", path, e)
    if existing is None:
        raise ConfigError(
            f"{output_dir} holds checkpoints, but none can be resumed ({'; '.join(unreadable)}). Resume from "
            "another one with ckpt_path=..., pick a new directory (hydra.run.dir=...), or pass overwrite=true to "
            "move the checkpoints aside and start afresh"
        )
    keys = [k for k in RUN_DEFINING if k != "seed" or seed_given]
    diffs = [d for k in keys for d in _differences(stored.get(k, "<absent>"), config.get(k, "<absent>"), f"{k}.")
             if d.split(":", 1)[0] not in SPEED_ONLY]
    old_tr, new_tr = stored.get("trainer") or {}, config.get("trainer") or {}
    diffs += [d for k in TRAINER_DEFINING for d in _differences(old_tr.get(k, "<absent>"),
                                                                new_tr.get(k, "<absent>"), f"trainer.{k}.")]
    if diffs:
        listing = "\n  ".join(diffs[:12]) + (f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise ConfigError(
            f"{output_dir} already holds a run trained with another config ({existing.name}); training into it "
            f"would mix two runs. Differences (stored -> now):\n  {listing}\nResume that run with "
            f"ckpt_path={existing}, pick a new directory (hydra.run.dir=...), or pass overwrite=true to move its "
            "checkpoints aside and start afresh"
        )
    return str(existing), stored


def network_differences(stored: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """What makes a checkpoint's network unusable for this config: differences in ``model`` and ``diffusion``
    (``model.base_channels: 32 -> 64``); speed-only keys do not count."""
    return [d for k in ("model", "diffusion")
            for d in _differences(stored.get(k, "<absent>"), config.get(k, "<absent>"), f"{k}.")]


def finished_summary(ckpt_path: str, cfg: Any, output_dir: Path, explicit: bool = False) -> dict[str, Any] | None:
    """The summary of a run that already reached ``trainer.max_steps`` (nothing to train), else None.

    ``explicit``: the checkpoint was given as ``ckpt_path`` (possibly of another run directory): the message names
    it and says that nothing is written to ``output_dir``."""
    from ..files import safe_torch_load

    max_steps = cfg.trainer.get("max_steps")
    if max_steps is None or int(max_steps) < 0:
        return None
    ckpt = safe_torch_load(Path(ckpt_path), what="checkpoint")
    step = int(ckpt.get("global_step", 0))
    if step < int(max_steps):
        return None
    if explicit:
        log.warning("ckpt_path=%s is already trained to step %d (trainer.max_steps=%d): nothing to train, and nothing "
                    "is written to %s. Raise trainer.max_steps to train it further", ckpt_path, step, int(max_steps),
                    output_dir)
    else:
        log.info("%s is already trained to step %d (trainer.max_steps=%d): nothing to do; raise trainer.max_steps "
                 "to train further", output_dir, step, int(max_steps))
    return {"output_dir": str(output_dir), "last_checkpoint": ckpt_path, "global_step": step,
            "epoch": int(ckpt.get("epoch", 0)), "seconds": 0.0, "metrics": {}, "gamma_history": [],
            "module": None, "trainer": None, "already_finished": True}




def _progress(d: Mapping, *names: str) -> Mapping | None:
    for n in names:
        if not isinstance(d, Mapping) or n not in d:
            return None
        d = d[n]
    return d


def _zero(counters: Any) -> None:
    """Set every counter of a Lightning progress ``current`` dict (possibly nested) to 0."""
    if isinstance(counters, dict):
        for k, v in counters.items():
            if isinstance(v, dict):
                _zero(v)
            elif isinstance(v, int) and not isinstance(v, bool):
                counters[k] = 0


def _zero_current(progress: Any) -> None:
    if isinstance(progress, dict):
        for k, v in progress.items():
            if k == "current":
                _zero(v)
            elif isinstance(v, dict):
                _zero_current(v)


def normalize_epoch_end_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """Make a checkpoint written at an epoch end resume as the start of the next epoch (module docstring).

    Returns True when the checkpoint was changed (in place). Checkpoints written elsewhere are left alone.
    """
    fit = _progress(checkpoint, "loops", "fit_loop")
    epoch = _progress(fit or {}, "epoch_progress")
    batch = _progress(fit or {}, "epoch_loop.batch_progress")
    if not (isinstance(epoch, dict) and isinstance(batch, dict)):
        return False
    tot, cur = epoch.get("total", {}), epoch.get("current", {})
    btot = batch.get("total", {})
    at_epoch_end = (
        batch.get("is_last_batch") is True
        and tot.get("ready") == tot.get("started") == tot.get("processed") == tot.get("completed", -2) + 1
        and btot.get("ready") == btot.get("started") == btot.get("processed") == btot.get("completed")
    )
    if not at_epoch_end:
        return False
    tot["completed"] = tot["processed"]
    cur["completed"] = cur.get("processed", cur.get("completed"))
    batch["is_last_batch"] = False
    _zero(batch.get("current"))
    for key in ("epoch_loop.scheduler_progress", "epoch_loop.automatic_optimization.optim_progress"):
        _zero_current(fit.get(key))
    return True
