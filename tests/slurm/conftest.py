"""Fixtures for the tests on a real SLURM cluster (``make test-slurm``; tools/slurm_local.sh starts one locally).

Every test module here sets ``pytestmark = pytest.mark.slurm`` (excluded from ``make test``). Without a
reachable cluster they are skipped, unless ``ADPM_REQUIRE_SLURM=1`` (set by ``make test-slurm``) makes that a
failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from slurm_helpers import PARTITION, sh


def _cluster_problem() -> str | None:
    """None when sinfo/sacct reach a cluster with an up partition PARTITION and a usable node; else why not."""
    for tool in ("sinfo", "sbatch", "sacct", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    try:
        info = sh(["sinfo", "-h", "-p", PARTITION, "-o", "%a %T"])
        acct = sh(["sacct", "-n", "-X", "-S", "now"])
    except subprocess.TimeoutExpired as e:
        return f"{e.cmd[0]} timed out"
    if info.returncode != 0:
        return f"sinfo failed: {info.stderr.strip()[:300]}"
    states = [line.split() for line in info.stdout.splitlines() if line.strip()]
    if not states:
        return f"no partition {PARTITION!r} (set ADPM_SLURM_PARTITION)"
    if not any(a == "up" and s.rstrip("*~#!%$@^-") in ("idle", "mixed", "allocated", "completing") for a, s in states):
        return f"partition {PARTITION!r} has no usable node: {info.stdout.strip()}"
    if acct.returncode != 0:
        return f"sacct failed (accounting, which submitit polls, is not running): {acct.stderr.strip()[:300]}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The partition of a working SLURM cluster (skip, or fail under ADPM_REQUIRE_SLURM=1, when there is none)."""
    problem = _cluster_problem()
    if problem:
        msg = f"no usable SLURM cluster ({problem}); start one with `tools/slurm_local.sh start` or `make test-slurm`"
        if os.environ.get("ADPM_REQUIRE_SLURM") == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return PARTITION


@pytest.fixture(scope="session")
def job_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the launching process; sbatch exports it to the jobs (W&B offline, one thread per job)."""
    wb = tmp_path_factory.mktemp("wandb")
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(wb),
        WANDB_CACHE_DIR=str(wb / "cache"),
        WANDB_CONFIG_DIR=str(wb / "config"),
        OMP_NUM_THREADS="1",  # one core per job: two jobs share the 2-core node without oversubscribing it
        HYDRA_FULL_ERROR="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("ADPM_DATA_DIR", None)
    return env
