"""Training half of Analytic-DPM: Lightning module, EMA, Gamma calibration callback, checkpoints.

Public API:

- :class:`DiffusionModule`: epsilon-MSE training of ``eps_model(x_t, t)`` (t in 1..N) with AdamW and an EMA.
- :class:`GammaCalibration`: Lightning callback estimating Gamma with the EMA weights at epoch ends.
- :class:`ReproducibleDataModule`: wraps an :mod:`analytic_dpm.data` datamodule; the batch order is a
  function of (seed, batch number), so resuming is exact.
- :func:`load_checkpoint` -> :class:`LoadedCheckpoint`: EMA model, schedule, Gamma and config of a checkpoint.
- :func:`calibrate_checkpoint`: estimate Gamma for a checkpoint and write it back
  (CLI: ``python -m analytic_dpm.training.calibrate --ckpt PATH --num-samples M``).
- :func:`train`: the run behind ``train.py`` (a composed Hydra config in, a summary dict out).
"""

from .calibration import (
    GammaCalibration,
    GammaCalibrationError,
    calibrate_gamma,
    check_calibrated_gamma,
    plot_gamma,
    plot_variance_bounds,
    quick_nll,
)
from .checkpoint import LoadedCheckpoint, build_datamodule, calibrate_checkpoint, load_checkpoint, read_checkpoint
from .data import ReproducibleDataModule, StreamBatchSampler, mix_seed
from .module import CHECKPOINT_KEY, DiffusionModule, TrainingDivergedError, build_model
from .run import USER_ERRORS, ConfigError, run_cli, train

__all__ = [
    "CHECKPOINT_KEY",
    "USER_ERRORS",
    "ConfigError",
    "DiffusionModule",
    "GammaCalibration",
    "GammaCalibrationError",
    "LoadedCheckpoint",
    "ReproducibleDataModule",
    "StreamBatchSampler",
    "TrainingDivergedError",
    "build_datamodule",
    "build_model",
    "calibrate_checkpoint",
    "calibrate_gamma",
    "check_calibrated_gamma",
    "load_checkpoint",
    "mix_seed",
    "plot_gamma",
    "plot_variance_bounds",
    "quick_nll",
    "read_checkpoint",
    "run_cli",
    "train",
]
