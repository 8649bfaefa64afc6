"""Fast checks of the SLURM launcher configs and the local-cluster script (no cluster needed: default suite)."""

from __future__ import annotations

import subprocess

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from slurm_helpers import ROOT

SCRIPT = ROOT / "tools" / "slurm_local.sh"


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_slurm_cpu_launcher_runs_the_cpu_trainer_on_its_tasks():
    cfg = _cfg("launcher=slurm_cpu", "hydra.launcher.partition=cpu", "hydra.launcher.tasks_per_node=2")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "cpu" and launcher.gpus_per_node == 0 and launcher.tasks_per_node == 2
    # a time-limit warning (USR2) requeues the job instead of failing the sweep; training resumes from last.ckpt
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0
    HydraConfig.instance().set_config(cfg)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 2 and cfg.trainer.num_nodes == 1


def test_slurm_cpu_launcher_wins_over_an_experiments_gpu_trainer():
    cfg = _cfg("launcher=slurm_cpu", "experiment=cifar10_ls")
    HydraConfig.instance().set_config(cfg)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1 and cfg.trainer.precision == "32-true"


def test_gpu_launcher_requeues_on_time_limit():
    assert _cfg("launcher=slurm").hydra.launcher.max_num_timeout > 0


def test_local_cluster_script_parses_and_explains_itself():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert usage.returncode == 2
    for command in ("install", "start", "status", "check", "stop", "wipe"):
        assert f"slurm_local.sh {command}" in usage.stdout
