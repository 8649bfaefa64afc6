"""Training half of Analytic-DPM: the Lightning module, the Gamma callback, checkpoints, the run behind ``train.py``.

    cfg -> train(cfg) -> DiffusionModule (eps-MSE, EMA) + ReproducibleDataModule under a Lightning Trainer
        -> GammaCalibration at epoch ends -> checkpoints with Gamma inside -> load_checkpoint / calibrate_checkpoint

What a user needs:

- :class:`DiffusionModule`: epsilon-MSE training of ``eps_model(x_t, t)`` (t in 1..N) with AdamW and an EMA.
- :class:`GammaCalibration`: Lightning callback estimating Gamma with the EMA weights at epoch ends.
- :func:`load_checkpoint` -> :class:`LoadedCheckpoint`: EMA model, schedule, Gamma and config of a checkpoint.
- :func:`calibrate_checkpoint`: estimate Gamma for a checkpoint and write it back
  (CLI: ``python -m analytic_dpm.calibrate --ckpt PATH --num-samples M``).
- :func:`train`: the run behind ``train.py`` (a composed Hydra config in, a summary dict out).

The building blocks live in the submodules: :mod:`.module`, :mod:`.gamma_callback`, :mod:`.checkpoint`,
:mod:`.data` (the reproducible batch order), :mod:`.resume`, :mod:`.run`.
"""

from .checkpoint import LoadedCheckpoint, calibrate_checkpoint, load_checkpoint
from .gamma_callback import GammaCalibration
from .module import DiffusionModule
from .run import train

__all__ = ["DiffusionModule", "GammaCalibration", "LoadedCheckpoint", "calibrate_checkpoint", "load_checkpoint",
           "train"]
