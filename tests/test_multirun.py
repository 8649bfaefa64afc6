"""Hydra multiruns as the docs type them: no hydra.sweep.dir, from the project root (issue 16).

Every multirun used to crash in about a second ("HydraConfig was not set", full_key hydra.sweep.dir) because the
sweep directory is resolved before any job installs HydraConfig; the tests always passed hydra.sweep.dir, so
none saw it. Here the commands of README.md, conf/ and the entry points run exactly as typed, in a subprocess:

* the issue's ``python evaluate.py -m model=oracle_gaussian eval.K=2,10`` (no checkpoint, but ~9 s: slow) from
  the project root, writing where a user's run writes (<repo>/outputs/evaluate/multirun/<date>_<time>/<job>;
  removed afterwards); in the fast suite a two-cell oracle sweep launched from another directory, which still
  writes under the repository's outputs/ (and tests/test_configs.py resolves the sweep directory as Hydra does);
* the README's checkpoint multiruns (slow) on a tiny checkpoint: ``<ckpt>`` is its path and ADPM_ROOT (the
  repository root the config already reads; train.py / evaluate.py only set it when it is unset) points the
  outputs at a temporary directory; then the README's merge command on the sweep directory, as typed;
* a local ``train.py -m`` with the tiny training config, outputs under a temporary ADPM_ROOT.

The SLURM commands run in tests/slurm/test_multirun_slurm.py (``make test-slurm``).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from analytic_dpm.evaluation import load_rows

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
#: analytic_ddpm NLL of the exact Gaussian oracle (x0 ~ N(0, 0.5^2)): 0.5 log2(2 pi e s^2) bits/dim
EXACT_NLL = 0.5 * math.log2(2 * math.pi * math.e * 0.25)
SWEEP_NAME = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}")

# ------------------------------------------------------------------------------- the documented multiruns
#: The issue's command: cheap (the exact Gaussian oracle, no checkpoint), runs as typed from the project root.
ISSUE_COMMAND = "python evaluate.py -m model=oracle_gaussian eval.K=2,10"
CELLS = "python evaluate.py -m ckpt_path=<ckpt> eval.K=10,25 eval.method=analytic_ddpm,ddim"
SHARDS = "python evaluate.py -m ckpt_path=<ckpt> eval.shard=0,1,2,3 eval.num_shards=4"
SLURM_CPU_TRAIN = "python train.py -m launcher=slurm_cpu hydra.launcher.partition=cpu experiment=quickstart"
#: GPU SLURM commands: on the CPU-only test cluster sbatch must refuse them, after the sweep directory was made.
SLURM_GPU = [
    "python train.py -m launcher=slurm experiment=cifar10_ls data.batch_size=32 hydra.launcher.partition=gpu"
    " hydra.launcher.gpus_per_node=4 hydra.launcher.tasks_per_node=4 hydra.launcher.nodes=1"
    " hydra.launcher.timeout_min=2880 hydra.launcher.account=myproject",
    "python evaluate.py -m launcher=slurm ckpt_path=<ckpt> eval.shard=0,1,2,3 eval.num_shards=4"
    " eval.fid.reference_cache=/shared/fid_ref hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1"
    " hydra.launcher.tasks_per_node=1 hydra.launcher.array_parallelism=4",
    "python train.py -m launcher=slurm experiment=cifar10_ls hydra.launcher.partition=gpu",
    "python train.py -m launcher=slurm experiment=cifar10_cs trainer=ddp",
    "python evaluate.py -m launcher=slurm ckpt_path=<ckpt> eval.shard=0,1,2,3 eval.num_shards=4",
    "python train.py -m hydra/launcher=slurm ...",
]
#: Every documented multirun (checkpoint placeholders written <ckpt>) and the test that runs it as typed.
DOCUMENTED = {
    CELLS: "test_readme_cells_multirun_and_merge",
    SHARDS: "test_readme_shards_multirun_and_merge",
    SLURM_CPU_TRAIN: "slurm/test_multirun_slurm.py::test_readme_slurm_cpu_quickstart_as_typed",
    **{cmd: "slurm/test_multirun_slurm.py::test_readme_gpu_commands_reach_sbatch" for cmd in SLURM_GPU},
}
DOC_FILES = ["README.md", "train.py", "evaluate.py", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("docs/*.md")),
             *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("conf/**/*.yaml"))]
_COMMAND = re.compile(r"python (?:train|evaluate)\.py -m .*")


def documented_multiruns() -> dict[str, list[str]]:
    """Every ``python train.py -m`` / ``python evaluate.py -m`` command in DOC_FILES (continuation lines joined,
    trailing comments cut, checkpoint placeholders written ``<ckpt>``) -> the files that show it."""
    found: dict[str, list[str]] = {}
    for name in DOC_FILES:
        text = re.sub(r"\\\n[#\s]*", " ", (ROOT / name).read_text())
        for match in _COMMAND.finditer(text):
            cmd = re.split(r"\s#|`", match.group(0))[0]
            cmd = re.sub(r"ckpt_path=(\.\.\.|/path/last\.ckpt)", "ckpt_path=<ckpt>", " ".join(cmd.split()))
            found.setdefault(cmd, []).append(name)
    return found


def test_every_documented_multirun_is_run_as_typed():
    found = documented_multiruns()
    missing = {cmd: files for cmd, files in found.items() if cmd not in DOCUMENTED}
    assert not missing, f"multiruns in the docs that no test runs (add them to DOCUMENTED): {missing}"
    stale = set(DOCUMENTED) - set(found)
    assert not stale, f"DOCUMENTED commands no longer in the docs: {stale}"


# ------------------------------------------------------------------------------------------------ helpers
def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: no ADPM_ROOT / ADPM_DATA_DIR unless given, W&B offline into tmp_path."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), WANDB_MODE="offline", WANDB_SILENT="true",
               WANDB_DIR=str(tmp_path / "wandb"), WANDB_CACHE_DIR=str(tmp_path / "wandb" / "cache"),
               WANDB_CONFIG_DIR=str(tmp_path / "wandb" / "config"))
    for key in ("ADPM_ROOT", "ADPM_DATA_DIR", "HYDRA_FULL_ERROR"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_typed(command: str, cwd: Path, env: dict[str, str], timeout: float = 600, **subs: str):
    """Run a documented command line as typed: ``python`` is this interpreter; ``<name>`` placeholders from subs;
    in another directory than the repository, the script is named by its path (``python /repo/evaluate.py``)."""
    for key, value in subs.items():
        command = command.replace(f"<{key}>", value)
    argv = shlex.split(command)
    assert argv[0] == "python"
    if cwd != ROOT and argv[1].endswith(".py"):
        argv[1] = str(ROOT / argv[1])
    proc = subprocess.run([PY, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"`{command}` failed (exit {proc.returncode}):\n{output}"
    return proc


def sweep_dirs(multirun: Path) -> set[Path]:
    return {p for p in multirun.iterdir() if p.is_dir()} if multirun.is_dir() else set()


def recorded_overrides(sweep: Path) -> list[str]:
    """The command line's overrides as the sweep's multirun.yaml records them (task and hydra.*), sorted."""
    recorded = OmegaConf.load(sweep / "multirun.yaml").hydra.overrides
    return sorted(o for o in [*recorded.task, *recorded.hydra] if o != "hydra.mode=MULTIRUN")


def the_new_sweep(multirun: Path, before: set[Path], overrides: list[str]) -> Path:
    """The one sweep directory this command made: <log_dir>/<task>/multirun/<date>_<time>, holding multirun.yaml."""
    new = [p for p in sweep_dirs(multirun) - before if recorded_overrides(p) == sorted(overrides)]
    assert len(new) == 1, f"expected one new sweep directory under {multirun}, found {sorted(sweep_dirs(multirun))}"
    assert SWEEP_NAME.fullmatch(new[0].name), new[0]
    return new[0]


@contextlib.contextmanager
def sweeps_removed_afterwards(multirun: Path):
    """Yields (the sweep directories under ``multirun`` now, a list to append the overrides of each sweep the
    caller is about to make); afterwards removes the new sweeps with those overrides (a user's own sweeps, even new
    ones, stay) and the parents up to <root>/outputs that did not exist before and are empty."""
    parents = [multirun, multirun.parent, multirun.parent.parent]
    existed = {p for p in parents if p.exists()}
    before = sweep_dirs(multirun)
    made: list[list[str]] = []
    try:
        yield before, made
    finally:
        for sweep in sweep_dirs(multirun) - before:
            if (sweep / "multirun.yaml").is_file() and recorded_overrides(sweep) in [sorted(m) for m in made]:
                shutil.rmtree(sweep)
        for p in parents:
            if p not in existed and p.is_dir() and not any(p.iterdir()):
                p.rmdir()


@pytest.fixture
def repo_outputs():
    """<repo>/outputs/evaluate/multirun, where a user's evaluation sweep goes; cleaned as above."""
    multirun = ROOT / "outputs" / "evaluate" / "multirun"
    with sweeps_removed_afterwards(multirun) as (before, made):
        yield multirun, before, made


def assert_cells(sweep: Path, expected: list[tuple[int, str]]) -> None:
    """Job i of the sweep wrote its run directory <sweep>/<i> with the grid cells of its (K, method)."""
    for num, (k, method) in enumerate(expected):
        rows = load_rows(sweep / str(num))
        assert rows, f"no results in {sweep / str(num)}"
        assert {(r["K"], r["method"]) for r in rows} == {(k, method)}, (num, rows[:2])
        assert (sweep / str(num) / ".hydra" / "config.yaml").is_file()
    assert not (sweep / str(len(expected))).exists()


# ------------------------------------------------------------------------------------------ evaluate.py -m
@pytest.mark.slow  # ~9 s on an idle 2-core machine: two jobs of the oracle's default grid (30 cells, plots)
def test_issue_command_as_typed_from_the_project_root(tmp_path, repo_outputs):
    multirun, before, made = repo_outputs
    made.append(["model=oracle_gaussian", "eval.K=2,10"])
    run_typed(ISSUE_COMMAND, ROOT, cli_env(tmp_path), timeout=300)
    sweep = the_new_sweep(multirun, before, made[-1])
    for num, k in enumerate((2, 10)):
        rows = load_rows(sweep / str(num))
        assert {r["K"] for r in rows} == {k} and len(rows) == 3 * 5  # trajectories x methods
        analytic = [r["nll_bpd"] for r in rows if r["method"] == "analytic_ddpm"]
        assert analytic == pytest.approx([EXACT_NLL] * 3, abs=0.05)  # even, quadratic, optimal
    assert not (sweep / "2").exists()


def test_multirun_from_another_directory_writes_under_the_repository(tmp_path, repo_outputs):
    """The fast-suite guard of the crash: a two-job oracle sweep launched outside the repository, no sweep dir."""
    multirun, before, made = repo_outputs
    overrides = ["model=oracle_gaussian", "eval.K=2,10", "eval.method=analytic_ddpm", "eval.trajectory=even",
                 "model.num_heldout=256", "wandb.mode=disabled"]
    made.append(overrides)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_typed(f"python evaluate.py -m {' '.join(overrides)}", elsewhere, cli_env(tmp_path), timeout=300)
    sweep = the_new_sweep(multirun, before, overrides)
    assert_cells(sweep, [(2, "analytic_ddpm"), (10, "analytic_ddpm")])
    assert not any(elsewhere.iterdir()), f"the launch directory got {list(elsewhere.iterdir())}"


def _merge_as_typed(root: Path, sweep: Path, env: dict[str, str]) -> list[dict]:
    """The README's ``python -m analytic_dpm.evaluation.merge outputs/evaluate/multirun/<date>_<time>``, run in
    the root the outputs went to (so the relative path is as typed); the merged grid is in <sweep>/merged."""
    rel = sweep.relative_to(root)
    assert rel.parts[:3] == ("outputs", "evaluate", "multirun")
    proc = subprocess.run([PY, "-m", "analytic_dpm.evaluation.merge", str(rel)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"merge failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return load_rows(sweep / "merged")


@pytest.mark.slow
def test_readme_cells_multirun_and_merge(tmp_path, tiny_ckpt):
    """README: one job per cell of a checkpoint's grid, then merge (tiny checkpoint; outputs under ADPM_ROOT)."""
    root = tmp_path / "root"
    env = cli_env(tmp_path, ADPM_ROOT=str(root))
    run_typed(CELLS, ROOT, env, ckpt=str(tiny_ckpt))
    sweep = the_new_sweep(root / "outputs" / "evaluate" / "multirun", set(),
                          [f"ckpt_path={tiny_ckpt}", "eval.K=10,25", "eval.method=analytic_ddpm,ddim"])
    assert_cells(sweep, [(10, "analytic_ddpm"), (10, "ddim"), (25, "analytic_ddpm"), (25, "ddim")])
    assert not (ROOT / "outputs" / "evaluate" / "multirun" / sweep.name).exists()
    merged = _merge_as_typed(root, sweep, env)
    assert {(r["K"], r["method"]) for r in merged} == {(k, m) for k in (10, 25) for m in ("analytic_ddpm", "ddim")}
    even = [r for r in merged if r["method"] == "analytic_ddpm" and r["trajectory"] == "even"]
    assert len(even) == 2 and all(r["num_nll_images"] == 16 and math.isfinite(r["nll_bpd"]) for r in even), even


@pytest.fixture(scope="module")
def tiny_ckpt_n1000(tmp_path_factory):
    """The tiny checkpoint with N = 1000 steps: the full default grid (K up to 1000) is defined for it."""
    from test_training import make_cfg

    from analytic_dpm.training import train

    run_dir = tmp_path_factory.mktemp("train_n1000") / "run"
    train(make_cfg(run_dir, "diffusion.N=1000"))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_readme_shards_multirun_and_merge(tmp_path, tiny_ckpt_n1000):
    """README: the default grid of a checkpoint split in 4 shard jobs, then merge: every NLL cell complete."""
    root = tmp_path / "root"
    env = cli_env(tmp_path, ADPM_ROOT=str(root))
    run_typed(SHARDS, ROOT, env, ckpt=str(tiny_ckpt_n1000))
    sweep = the_new_sweep(root / "outputs" / "evaluate" / "multirun", set(),
                          [f"ckpt_path={tiny_ckpt_n1000}", "eval.shard=0,1,2,3", "eval.num_shards=4"])
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]
    merged = _merge_as_typed(root, sweep, env)
    even_ddpm = [r for r in merged if r["trajectory"] == "even" and r["method"] == "analytic_ddpm"]
    assert sorted(r["K"] for r in even_ddpm) == [10, 25, 50, 100, 200, 400, 1000]
    assert all(r["num_nll_images"] == 16 and math.isfinite(r["nll_bpd"]) for r in even_ddpm), even_ddpm


# --------------------------------------------------------------------------------------------- train.py -m
@pytest.mark.slow
def test_train_multirun_without_sweep_dir(tmp_path):
    """Two tiny training jobs (seed=1,2) under <ADPM_ROOT>/outputs/train/multirun/<date>_<time>/<job>."""
    from test_training import TINY

    root = tmp_path / "root"
    overrides = [*TINY, "seed=1,2"]
    run_typed(f"python train.py -m {shlex.join(overrides)}", ROOT, cli_env(tmp_path, ADPM_ROOT=str(root)))
    sweep = the_new_sweep(root / "outputs" / "train" / "multirun", set(), overrides)
    for num in (0, 1):
        assert (sweep / str(num) / "checkpoints" / "last.ckpt").is_file(), sorted((sweep / str(num)).iterdir())
    assert not (sweep / "2").exists()
