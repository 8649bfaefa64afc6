"""The README's first command, ``make demo``, exactly as typed (slow: about 7 minutes on 2 cores, then a rerun).

It runs in a copy of the repository (the tracked and untracked-but-not-ignored files, modification times kept) so the
outputs land in the copy's ``outputs/demo`` and not in this checkout's. The copy borrows this checkout's ``.venv``,
``data/`` and ``weights/`` (links): the install step then has nothing to do (its stamp is newer than
``pyproject.toml``) and the FID weights need no download. Checked: it finishes; its results hold the rows the README
shows, with the README's NLL table values; and the rerun the README promises ("loses and mixes nothing") trains
nothing, computes no cell and leaves the results byte for byte as they were.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _copy_checkout(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)  # keeps mtimes: make sees pyproject.toml older than the install stamp
    for shared in (".venv", "data", "weights"):
        (dest / shared).symlink_to(ROOT / shared)


def _readme_nll_table() -> dict[tuple[str, str, str], float]:
    """{(method, trajectory, K): value} of the README's demo NLL table."""
    text = (ROOT / "README.md").read_text()
    header = re.search(r"^\| trajectory \| K \|(.*)\|$", text, re.M)
    methods = [m.strip() for m in header.group(1).split("|")]
    table = {}
    for traj, K, rest in re.findall(r"^\| (even|optimal) \| (\d+) \|(.*)\|$", text, re.M):
        for method, cell in zip(methods, rest.split("|")):
            table[(method, traj, K)] = float(cell.strip().strip("*"))
    return table


def _make_demo(cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ADPM_ROOT", "ADPM_DATA_DIR", "MAKEFLAGS", "MFLAGS")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    return subprocess.run(["make", "demo"], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


def test_make_demo_as_typed_and_its_rerun(tmp_path):
    stamp = ROOT / ".venv" / ".installed"
    if not stamp.is_file() or stamp.stat().st_mtime < (ROOT / "pyproject.toml").stat().st_mtime:
        pytest.skip("run `make install` first (the copy shares this checkout's .venv and must not reinstall it)")
    if not (ROOT / "weights" / "pt_inception-2015-12-05.pth").is_file():
        pytest.skip("run `make fid-weights` first")
    repo = tmp_path / "repo"
    repo.mkdir()
    _copy_checkout(repo)

    first = _make_demo(repo)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    results = repo / "outputs" / "demo" / "evaluate_head" / "results.csv"
    rows = {(r["method"], r["trajectory"], r["K"]): r for r in csv.DictReader(results.open())}
    assert {r["head"] for r in rows.values()} == {"npr:complex"}
    for key, value in _readme_nll_table().items():
        assert key in rows, key
        assert f"{float(rows[key]['nll_bpd']):.2f}" == f"{value:.2f}", (key, rows[key]["nll_bpd"], value)
    for method in ("analytic_ddpm", "npr_ddpm", "npr_ddim"):  # the head methods' FID beside analytic_ddpm's
        assert float(rows[(method, "even", "10")]["fid"]) > 0, method
    for name in ("tables.md", "variance_maps.png", "run.json", "identities.json"):
        assert (results.parent / name).is_file(), name
    before = results.read_bytes()

    again = _make_demo(repo)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]
    assert log.count("nothing to do") >= 2, log[-4000:]  # both trainings find their finished runs
    assert "to compute: 0 NLL group(s)" in log and "and 0 FID cell(s)" in log, log[-4000:]
    assert results.read_bytes() == before
