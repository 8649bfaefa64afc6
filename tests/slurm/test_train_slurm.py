"""train.py on a real SLURM cluster through submitit (hydra-submitit-launcher): no mocks.

* a sweep of one tiny CPU run goes through sbatch/srun to completion and writes its checkpoint with Gamma;
* a run requeued mid-training resumes from its own checkpoints/last.ckpt and ends with the same weights and EMA
  weights as the uninterrupted run, for both kinds of requeue:
  - USR2 (``scancel --signal=USR2``, what SLURM sends before the time limit): submitit calls the task's
    ``checkpoint()``, which resubmits the same Hydra job, and requeues it;
  - ``scontrol requeue`` from outside (a preemption): the job is killed and restarts from its original
    arguments; only what training saved itself survives.
"""

from __future__ import annotations

import csv
import subprocess
import time
from pathlib import Path

import pytest
import torch
from slurm_helpers import JOB, PY, ROOT, accounting, run_script, submitit_jobs, tail

pytestmark = pytest.mark.slurm

MAX_STEPS = 120
# 1x8x8 Gaussian data, the ~650k-parameter UNet, N=50: ~12 epochs of 10 steps, last.ckpt after each epoch, Gamma
# (M=2) once at the end. The run trains for several seconds after its first checkpoint so a requeue lands mid-run.
TRAIN = [
    "data=gaussian",
    "data.image_size=8",
    "data.num_train=96",
    "data.num_test=16",
    "data.batch_size=8",
    "data.pin_memory=false",
    "model=unet_tiny",
    "diffusion.N=50",
    "module.lr=1e-3",
    "module.ema_decay=0.9",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.limit_train_batches=10",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.model_checkpoint.save_top_k=1",
    "callbacks.gamma_calibration.every_n_epochs=1000",  # only at the end of training
    "callbacks.gamma_calibration.num_samples=2",
    "callbacks.gamma_calibration.batch_size=100",
    "callbacks.gamma_calibration.nll_images=4",
    "callbacks.gamma_calibration.nll_K=[5]",
    "callbacks.gamma_calibration.bounds_K=[5]",
    "callbacks.gamma_calibration.plots=false",
    "callbacks.gamma_calibration.progress=false",
]


def last_ckpt(run_dir: Path) -> dict:
    path = run_dir / "checkpoints" / "last.ckpt"
    assert path.is_file(), f"no {path}; the job's log:\n{tail(run_dir / 'train.log')}"
    return torch.load(path, map_location="cpu", weights_only=True)


def segments(run_dir: Path) -> list[list[int]]:
    """The training steps each start of the task logged (one CSV logger version per start), in start order."""
    out = []
    for f in sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        with open(f) as fh:
            out.append(sorted({int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")}))
    return out


# ------------------------------------------------------------------------------------------ uninterrupted
@pytest.fixture(scope="module")
def reference(slurm_cluster, job_env, tmp_path_factory):
    """One uninterrupted training job submitted by ``train.py -m launcher=slurm_cpu``."""
    base = tmp_path_factory.mktemp("train_ref")
    sweep = base / "sweep"
    rc, seconds = run_script(
        "train.py",
        ["-m", *JOB, f"hydra.sweep.dir={sweep}", f"paths.log_dir={base}", *TRAIN],
        job_env,
        base / "launcher.log",
        timeout=300,
    )
    assert rc == 0, f"train.py -m launcher=slurm_cpu failed (exit {rc}):\n{tail(base / 'launcher.log')}"
    print(f"\n[slurm] one training job, submit to result: {seconds:.1f} s")
    return sweep


def test_train_sweep_runs_to_completion_on_slurm(reference):
    run_dir = reference / "0"
    jobs = submitit_jobs(reference)
    assert list(jobs) == [0], f"expected one submitit job folder, found {jobs}"
    acct = accounting(jobs[0])
    assert acct.states == ["COMPLETED"], f"sacct says {acct}"
    assert acct.nodes[-1], "sacct names no node"
    ckpt = last_ckpt(run_dir)
    assert ckpt["global_step"] == MAX_STEPS
    state = ckpt["analytic_dpm"]
    assert state["gamma"].shape == (51,) and state["gamma"][0] == 0 and torch.isfinite(state["gamma"]).all()
    assert state["gamma_M"] == 2 and state["gamma_step"] == MAX_STEPS
    assert ckpt["hyper_parameters"]["model"]["_target_"].endswith("UNet")
    assert segments(run_dir) == [list(range(MAX_STEPS))], "an uninterrupted run logs every step once"
    # submitit's own record of the task: a result pickle next to the job's stdout/stderr
    assert list((reference / ".submitit" / jobs[0]).glob("*_result.pkl"))


# ------------------------------------------------------------------------------------------ requeued
CASES = ("usr2", "requeue")  # Hydra job 0 gets USR2, job 1 an outside `scontrol requeue`


def _interrupt(case: str, job_id: str) -> None:
    if case == "usr2":
        cmd = ["scancel", "--signal=USR2", job_id]
    else:
        cmd = ["scontrol", "requeue", job_id]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def requeued(reference, job_env, tmp_path_factory):
    """A sweep of two identical training jobs (``+case=usr2,requeue``), each interrupted once mid-run.

    The sweep directory is Hydra's default, ``<log_dir>/train/multirun/<date>_<time>``: a restarted job must find
    the same directory (the launcher pickles the resolved time stamp), or it could not resume.
    """
    base = tmp_path_factory.mktemp("train_requeue")
    multirun = base / "train" / "multirun"
    sweep = None
    log = base / "launcher.log"
    args = ["-m", *JOB, f"paths.log_dir={base}", *TRAIN, f"+case={','.join(CASES)}"]
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([PY, "train.py", *args], cwd=ROOT, env=job_env, stdout=fh, stderr=subprocess.STDOUT)
    interrupted: dict[int, dict] = {}
    rc = None
    try:
        deadline = time.monotonic() + 240
        while len(interrupted) < len(CASES):
            if proc.poll() is not None:
                pytest.fail(f"the sweep ended before both interruptions (exit {proc.returncode}):\n{tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"no first checkpoint within 240 s:\n{tail(log)}")
            found = sorted(multirun.glob("*")) if multirun.is_dir() else []
            assert len(found) <= 1, f"more than one sweep directory: {found}"
            if not found:
                time.sleep(0.1)
                continue
            sweep = found[0]
            jobs = submitit_jobs(sweep)
            for num, case in enumerate(CASES):
                ready = num in jobs and (sweep / str(num) / "checkpoints" / "last.ckpt").is_file()
                if num not in interrupted and ready:
                    _interrupt(case, jobs[num])
                    interrupted[num] = {"job_id": jobs[num], "at": time.perf_counter() - start}
            time.sleep(0.1)
        rc = proc.wait(timeout=300)
    finally:
        if rc is None:  # failed or timed out: stop the launcher and its jobs
            proc.kill()
            for job_id in submitit_jobs(sweep).values() if sweep else ():
                subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    seconds = time.perf_counter() - start
    assert rc == 0, f"the requeued sweep failed (exit {rc}):\n{tail(log)}"
    assert sorted(multirun.glob("*")) == [sweep], "a restarted job wrote to another sweep directory"
    print(f"\n[slurm] two requeued training jobs, submit to results: {seconds:.1f} s; interrupted at {interrupted}")
    return sweep, interrupted


@pytest.mark.parametrize("num", range(len(CASES)), ids=CASES)
def test_requeued_run_resumes_and_matches_uninterrupted(requeued, reference, num):
    sweep, interrupted = requeued
    run_dir = sweep / str(num)
    job_id = interrupted[num]["job_id"]
    # SLURM requeued the job once and then ran it to completion
    acct = accounting(job_id)
    assert acct.states == ["REQUEUED", "COMPLETED"], f"sacct --duplicates says {acct}"
    # the first start was interrupted mid-run; the second resumed where the checkpoint left off (not from step 0)
    segs = segments(run_dir)
    assert len(segs) == 2, f"expected two starts of the task, got {len(segs)}:\n{tail(run_dir / 'train.log')}"
    first, second = segs
    assert first and first[0] == 0 and first[-1] < MAX_STEPS - 1, f"first start logged steps {first[:3]}..{first[-3:]}"
    assert second, "the second start logged no training step"
    assert second[0] > 0, (
        "the requeued job trained again from step 0: train.py must resume from the run directory's "
        "checkpoints/last.ckpt when it is restarted with its original arguments"
    )
    assert second[0] <= first[-1] + 1, "steps were skipped between the two starts"
    assert second[-1] == MAX_STEPS - 1
    # same end state as the uninterrupted run: weights, EMA weights, Gamma
    a, b = last_ckpt(reference / "0"), last_ckpt(run_dir)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["analytic_dpm"]["ema_updates"] == b["analytic_dpm"]["ema_updates"]
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys() and any(k.startswith("ema_model.") for k in sa)
    worst = max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point())
    assert worst <= 1e-6, f"weights/EMA differ from the uninterrupted run by up to {worst:.3g}"
    assert torch.allclose(a["analytic_dpm"]["gamma"], b["analytic_dpm"]["gamma"], rtol=0, atol=1e-6)
    same = "bitwise equal" if all(torch.equal(sa[k], sb[k]) for k in sa) else f"equal to {worst:.2g}"
    print(f"\n[slurm] {CASES[num]}: resumed at step {second[0]}; weights and EMA {same}")
