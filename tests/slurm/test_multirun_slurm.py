"""The documented multiruns on a real SLURM cluster, as typed: no hydra.sweep.dir (issue 16).

Every multirun used to stop on the launching process ("HydraConfig was not set", full_key hydra.sweep.dir) before
submitting anything; the other SLURM tests pass hydra.sweep.dir or paths.log_dir, which hid it.

* the issue's oracle sweep (``evaluate.py -m model=oracle_gaussian eval.K=2,10``) with the test cluster's
  launcher settings, from the project root without ADPM_ROOT, like a user: the sweep directory and the jobs' run
  directories are <repo>/outputs/evaluate/multirun/<date>_<time>/<job> (removed afterwards), both jobs COMPLETED;
* the README's ``train.py -m launcher=slurm_cpu hydra.launcher.partition=cpu experiment=quickstart`` as typed,
  outputs under a temporary ADPM_ROOT and Fashion-MNIST from ADPM_DATA_DIR: the job trains in
  <root>/outputs/train/multirun/<date>_<time>/0 until it has logged a training loss, then it is cancelled (the
  whole run is 200 steps, 5 to 15 minutes of the 2-core node);
* the GPU commands (README, conf/, train.py) as typed, outputs under a temporary ADPM_ROOT: this CPU-only cluster
  refuses them at sbatch (no such partition, no GPUs), after Hydra has made the sweep directory at its default
  place, which is as far as a CPU cluster lets them go.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

import pytest
from slurm_helpers import JOB, PY, ROOT, accounting, run_script, sh, submitit_jobs, tail
from test_multirun import (
    EXACT_NLL,
    ISSUE_COMMAND,
    SLURM_CPU_TRAIN,
    SLURM_GPU,
    SWEEP_NAME,
    recorded_overrides,
    sweep_dirs,
    sweeps_removed_afterwards,
    the_new_sweep,
)

pytestmark = pytest.mark.slurm


def _argv(command: str, **subs: str) -> list[str]:
    """``python script.py -m args...`` of a documented command -> [script.py, -m, args...] (``...``: no more)."""
    for key, value in subs.items():
        command = command.replace(f"<{key}>", value)
    argv = [a for a in shlex.split(command) if a != "..."]
    assert argv[0] == "python" and argv[1].endswith(".py"), command
    return argv[1:]


def _overrides(args: list[str]) -> list[str]:
    """The overrides of a command line: its arguments without -m."""
    return [a for a in args if a != "-m"]


def test_issue_multirun_on_slurm_without_sweep_dir(slurm_cluster, job_env, tmp_path):
    env = {k: v for k, v in job_env.items() if k != "ADPM_ROOT"}  # evaluate.py sets it; sbatch exports it
    script, *args = _argv(ISSUE_COMMAND)
    args += JOB
    multirun = ROOT / "outputs" / "evaluate" / "multirun"
    with sweeps_removed_afterwards(multirun) as (before, made):
        made.append(_overrides(args))
        rc, seconds = run_script(script, args, env, tmp_path / "launcher.log", timeout=600)
        assert rc == 0, f"{ISSUE_COMMAND} {shlex.join(JOB)} failed (exit {rc}):\n{tail(tmp_path / 'launcher.log')}"
        print(f"\n[slurm] the issue's oracle sweep, 2 jobs: {seconds:.1f} s")
        sweep = the_new_sweep(multirun, before, _overrides(args))
        jobs = submitit_jobs(sweep)
        assert sorted(jobs) == [0, 1], f"expected 2 SLURM jobs, submitit made {jobs}"
        for num, k in enumerate((2, 10)):
            assert accounting(jobs[num]).states == ["COMPLETED"]
            from analytic_dpm.evaluation.results import load_rows

            rows = load_rows(sweep / str(num))
            assert {r["K"] for r in rows} == {k} and len(rows) == 3 * 5, rows[:2]
            analytic = [r["nll_bpd"] for r in rows if r["method"] == "analytic_ddpm"]
            assert analytic == pytest.approx([EXACT_NLL] * 3, abs=0.05)


@pytest.fixture(scope="module")
def fashion_mnist_dir(tmp_path_factory) -> Path:
    """A data root holding FashionMNIST/raw: the repository's data/ (make install), else filled from Debian's
    dataset-fashion-mnist (installed with apt when missing, as make install does)."""
    from analytic_dpm.data.fashion_mnist_files import missing_raw_files
    from analytic_dpm.data.fashion_mnist_setup import setup_fashion_mnist

    if not missing_raw_files(ROOT / "data"):
        return ROOT / "data"
    root = tmp_path_factory.mktemp("data")
    try:
        setup_fashion_mnist(root, verbose=False)
    except (FileNotFoundError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"Fashion-MNIST is not available offline here: {e}")
    return root


def _job_stdout(sweep: Path, job_id: str) -> str:
    return "".join(p.read_text(errors="replace") for p in (sweep / ".submitit" / job_id).glob("*_log.out"))


def test_readme_slurm_cpu_quickstart_as_typed(slurm_cluster, job_env, fashion_mnist_dir, tmp_path):
    root = tmp_path / "root"
    env = dict(job_env, ADPM_ROOT=str(root), ADPM_DATA_DIR=str(fashion_mnist_dir))
    env.pop("OMP_NUM_THREADS")  # the command's own resources: 2 CPUs for its one task
    script, *args = _argv(SLURM_CPU_TRAIN)
    multirun = root / "outputs" / "train" / "multirun"
    log = tmp_path / "launcher.log"
    start = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen([PY, script, *args], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    sweep, job_id = None, None
    try:
        while True:
            elapsed = time.monotonic() - start
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended before training was seen (exit {proc.returncode}):\n{tail(log)}")
            if elapsed > 1200:
                pytest.fail(f"no training loss logged after {elapsed:.0f} s:\n{tail(log)}")
            if sweep is None and any((p / "multirun.yaml").is_file() for p in sweep_dirs(multirun)):
                sweep = the_new_sweep(multirun, set(), _overrides(args))
            if sweep is not None and job_id is None:
                job_id = submitit_jobs(sweep).get(0)
            if job_id is not None and "train/loss=" in _job_stdout(sweep, job_id):
                break
            time.sleep(2)
        print(f"\n[slurm] README quickstart on SLURM: a training loss logged after {elapsed:.0f} s; cancelling")
    finally:
        if job_id is not None:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
        proc.terminate()  # submitit would take a minute or two to notice the cancelled job
        proc.wait(timeout=30)
    run_dir = sweep / "0"
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert (run_dir / "wandb").is_dir(), "the W&B logger did not write into the job's run directory"
    assert accounting(job_id).states[-1].startswith("CANCELLED"), accounting(job_id)


@pytest.fixture(scope="module")
def cpu_only_cluster(slurm_cluster) -> None:
    """The GPU commands are only run where sbatch must refuse them: no partition 'gpu', no GPU anywhere."""
    out = sh(["sinfo", "-h", "-o", "%R %G"]).stdout.split()
    partitions, gres = out[0::2], out[1::2]
    if "gpu" in partitions or any("gpu" in g for g in gres):
        pytest.skip(f"this cluster has GPUs ({out}): the README's GPU commands would really be submitted")


@pytest.mark.parametrize("command", SLURM_GPU, ids=[f"gpu{i}" for i in range(len(SLURM_GPU))])
def test_readme_gpu_commands_reach_sbatch(cpu_only_cluster, job_env, tmp_path, command):
    root = tmp_path / "root"
    script, *args = _argv(command, ckpt="/path/last.ckpt")
    rc, _ = run_script(script, args, dict(job_env, ADPM_ROOT=str(root)), tmp_path / "launcher.log", timeout=120)
    out = (tmp_path / "launcher.log").read_text(errors="replace")
    sweeps = sweep_dirs(root / "outputs" / script.removesuffix(".py") / "multirun")
    for sweep in sweeps:  # nothing may stay queued, whatever happened
        for job_id in submitit_jobs(sweep).values():
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    assert "HydraConfig was not set" not in out, tail(tmp_path / "launcher.log")
    assert rc != 0 and "sbatch: error" in out, f"expected sbatch to refuse it (exit {rc}):\n{out[-3000:]}"
    assert len(sweeps) == 1, sweeps
    sweep = sweeps.pop()
    assert SWEEP_NAME.fullmatch(sweep.name) and recorded_overrides(sweep) == sorted(_overrides(args)), sweep
    assert (sweep / ".submitit").is_dir() and not submitit_jobs(sweep)
