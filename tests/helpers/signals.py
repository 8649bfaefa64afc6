"""A Lightning callback for the tests: sends this process SIGTERM after a given training step (as SLURM does before
a kill), so an interruption lands on a known step."""

import os
import signal

from lightning import Callback


class SigtermAtStep(Callback):
    def __init__(self, step: int):
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def nan_gaussian_data(**kwargs):
    """A Gaussian datamodule whose `sample` puts NaN into one value of every 10th example: data, not weights, at
    fault (for tests of the divergence message)."""
    from analytic_dpm.data import GaussianDataModule

    class NanGaussian(GaussianDataModule):
        def sample(self, n, generator=None):
            x = super().sample(n, generator)
            x[::10].view(x[::10].shape[0], -1)[:, 0] = float("nan")
            return x

    return NanGaussian(**kwargs)
