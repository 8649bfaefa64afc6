"""Hydra callbacks of train.py and evaluate.py (wired in conf/hydra/default.yaml, ``hydra.callbacks``).

``SweepHydraConfig``: lets the sweep directory of a multirun use ``${hydra:...}`` interpolations.

In a multirun, Hydra 1.3 resolves ``hydra.sweep.dir`` on the launching process (the basic sweeper creates it and
writes multirun.yaml there; the submitit launcher creates it and puts ``.submitit/`` below it) before any job has
started. ``HydraConfig``, which the ``${hydra:...}`` resolver reads, is only installed by each job
(``hydra.core.utils.run_job``), so there ``${hydra:runtime.cwd}`` raises "HydraConfig was not set". Our sweep
directory is ``${paths.log_dir}/...`` with ``paths.root_dir: ${oc.env:ADPM_ROOT,${hydra:runtime.cwd}}``, and
OmegaConf evaluates every argument of a resolver before calling it: the default branch ``${hydra:runtime.cwd}``
is evaluated, and fails, even when ADPM_ROOT is set (train.py and evaluate.py always set it). A single run is not
affected: its ``hydra.run.dir`` is resolved inside run_job, after HydraConfig is installed.

The composed config that the sweeper and launcher receive already holds what ``${hydra:runtime.cwd}`` asks for
(``hydra.runtime.cwd`` is filled in when the config is composed); only its installation is missing. Hydra calls
``on_multirun_start`` with that config before it instantiates the sweeper and the launcher, so installing it
there makes ``${hydra:...}`` resolve on the launching process as it does in a job (the same fix upstream Hydra
made in ``Hydra.multirun``, hydra-ecosystem/hydra PR #3439, not in the 1.3 releases). Each job still installs its
own config in run_job (and restores the previous one afterwards); values that exist only per job
(``hydra.job.num``, ``hydra.runtime.output_dir``) stay unavailable on the launching process.
"""

from __future__ import annotations

from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepHydraConfig(Callback):
    """Install the multirun's composed config as ``HydraConfig`` while the sweep is set up and launched."""

    def __init__(self) -> None:
        self._previous: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._previous = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().cfg = self._previous
        self._previous = None
