"""Helpers of the SLURM tests: run the entry points, find submitit's jobs, read sacct."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
PARTITION = os.environ.get("ADPM_SLURM_PARTITION", "cpu")

#: Resources of one test job on the one-node cluster (2 cores here: two jobs run side by side).
JOB = [
    "launcher=slurm_cpu",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=10",  # <= 10 min: submitit counts a USR2 as a time-out (max_num_timeout > 0)
]


def sh(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def run_script(script: str, args: list[str], env: dict[str, str], log: Path, timeout: float):
    """Run ``python <script> args`` in the repository root, output into ``log``; returns (returncode, seconds)."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(
            [PY, script, *args], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout
        )
    return proc.returncode, time.perf_counter() - start


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no {path})"


_JOB_DIR = re.compile(r"^(\d+)(?:_(\d+))?$")


def submitit_jobs(sweep_dir: Path) -> dict[int, str]:
    """Hydra job number -> SLURM job id, from submitit's folders: "12_0" for task 0 of job array 12 (an array's
    own folder "12" holds only its submission script), "12" for a job that is not an array."""
    root = sweep_dir / ".submitit"
    names = [d.name for d in root.iterdir() if d.is_dir() and _JOB_DIR.match(d.name)] if root.is_dir() else []
    tasks = {int(n.split("_")[1]): n for n in names if "_" in n}
    if tasks:
        return tasks
    return {0: names[0]} if len(names) == 1 else {}


@dataclass
class Accounting:
    job_id: str
    states: list[str]  # one per run of the job, oldest first (sacct --duplicates): REQUEUED, ..., COMPLETED
    nodes: list[str]


def accounting(job_id: str, wait_s: float = 20) -> Accounting:
    """sacct's record of every run of ``job_id``, waiting until the last one has a final state."""
    deadline = time.monotonic() + wait_s
    while True:
        out = sh(["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "JobID,State,NodeList"]).stdout
        rows = [line.split("|") for line in out.splitlines() if line.strip()]
        rows = [r for r in rows if r[0] == job_id]
        states = [r[1].split()[0] for r in rows]
        final = states and states[-1] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING")
        if final or time.monotonic() > deadline:
            return Accounting(job_id, states, [r[2] for r in rows])
        time.sleep(0.5)
