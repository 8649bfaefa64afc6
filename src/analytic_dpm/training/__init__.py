"""Training half of Analytic-DPM: the Lightning modules, the Gamma callback, checkpoints, the run behind ``train.py``.

    cfg -> train(cfg) -> DiffusionModule (eps-MSE, EMA) + ReproducibleDataModule under a Lightning Trainer
        -> GammaCalibration at epoch ends -> checkpoints with Gamma inside -> load_checkpoint / calibrate_checkpoint
    cfg with backbone=... head=... -> HeadModule (an SN / NPR covariance head on a frozen noise predictor, spec 11)
        -> HeadDiagnostics at epoch ends -> head checkpoints -> load_head_checkpoint

What a user needs:

- :class:`DiffusionModule`: epsilon-MSE training of ``eps_model(x_t, t)`` (t in 1..N) with AdamW and an EMA.
- :class:`GammaCalibration`: Lightning callback estimating Gamma with the EMA weights at epoch ends.
- :func:`load_checkpoint` -> :class:`LoadedCheckpoint`: EMA model, schedule, Gamma and config of a checkpoint.
- :func:`calibrate_checkpoint`: estimate Gamma for a checkpoint and write it back
  (CLI: ``python -m analytic_dpm.calibrate --ckpt PATH --num-samples M``).
- :class:`HeadModule`: trains a covariance head (SN or NPR) on a frozen backbone (our checkpoint or an
  improved-diffusion / DDPM network); :class:`HeadDiagnostics`: its per-epoch loss per timestep band and quick NLL.
- :func:`load_head_checkpoint` -> :class:`LoadedHeadCheckpoint`: ``head_model(x_t, t) -> (eps_hat, head)``, the
  backbone, schedule and the backbone's Gamma; :func:`is_head_checkpoint` tells a head checkpoint from a backbone one.
- :func:`train`: the run behind ``train.py`` (a composed Hydra config in, a summary dict out).

The building blocks live in the submodules: :mod:`.base` (the step loop both modules share), :mod:`.module`,
:mod:`.gamma_callback`, :mod:`.checkpoint`, :mod:`.data` (the reproducible batch order), :mod:`.resume`, :mod:`.run`,
and for heads :mod:`.backbone`, :mod:`.head_module`, :mod:`.head_callback`, :mod:`.head_checkpoint`, :mod:`.head_run`.
"""

from .checkpoint import LoadedCheckpoint, calibrate_checkpoint, load_checkpoint
from .gamma_callback import GammaCalibration
from .head_callback import HeadDiagnostics
from .head_checkpoint import (
    HEAD_CHECKPOINT_KEY,
    HeadCheckpointError,
    LoadedHeadCheckpoint,
    is_head_checkpoint,
    load_head_checkpoint,
)
from .head_module import HeadModule
from .module import DiffusionModule
from .run import train

__all__ = ["HEAD_CHECKPOINT_KEY", "DiffusionModule", "GammaCalibration", "HeadCheckpointError", "HeadDiagnostics",
           "HeadModule", "LoadedCheckpoint", "LoadedHeadCheckpoint", "calibrate_checkpoint", "is_head_checkpoint",
           "load_checkpoint", "load_head_checkpoint", "train"]
