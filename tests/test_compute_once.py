"""Cached results that several processes want at once (DDP ranks started by srun, shard jobs): one computes, the
others wait for its file and read it (analytic_dpm.files.file_lock around the cache)."""

import subprocess
import sys
from pathlib import Path

import torch

HELPER = Path(__file__).parent / "helpers" / "compute_once.py"


def _race(kind: str, target: Path, tmp_path: Path) -> list[Path]:
    """Two processes started together; returns their outputs. Each computation takes >= 3 s, far longer than the
    two start-ups differ, so without the lock both would find no cache and both would compute."""
    log = tmp_path / "log"
    outs = [tmp_path / f"out{i}.pt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(HELPER), kind, str(target), str(log), str(out)],
                              stderr=subprocess.PIPE, text=True) for out in outs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert len(log.read_text().splitlines()) == 1, log.read_text()  # computed once
    return outs


def test_fid_reference_statistics_are_computed_once(tmp_path):
    a, b = _race("reference", tmp_path / "ref" / "data_train_16.npz", tmp_path)
    ra, rb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert torch.equal(ra["mean"], rb["mean"]) and torch.equal(ra["cov"], rb["cov"])
    assert ra["mean"].abs().sum() > 0


def test_pretrained_gamma_is_calibrated_once(tmp_path):
    a, b = _race("gamma", tmp_path / "gamma_cache", tmp_path)
    ga, gb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert torch.equal(ga, gb) and ga.shape == (51,)
    assert len(list((tmp_path / "gamma_cache").glob("gamma-*.pt"))) == 1


def test_a_file_system_without_locks_goes_on_without_the_lock(tmp_path, monkeypatch, caplog):
    """ENOLCK (e.g. an NFS mount without lockd) is not "held by another process": no endless wait."""
    import errno
    import fcntl
    import logging

    from analytic_dpm.files import file_lock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    ran = []
    with caplog.at_level(logging.WARNING, logger="analytic_dpm.files"), file_lock(tmp_path / "x.lock", timeout=1):
        ran.append(True)
    assert ran and "without the lock" in caplog.text


def test_two_identical_grids_started_at_once_compute_each_cell_once(tmp_path):
    """Each NLL group is claimed before it is computed: the two processes share the three groups (each computed by
    exactly one of them) and both end with the whole grid."""
    log, run_dir = tmp_path / "log", tmp_path / "grid"
    outs = [tmp_path / f"out{i}.pt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(HELPER), "grid", str(run_dir), str(log), str(out)],
                              stderr=subprocess.PIPE, text=True) for out in outs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    computed = [line.rsplit(" ", 1)[0] for line in log.read_text().splitlines()]
    assert sorted(computed) == ["computed nll K=2", "computed nll K=3", "computed nll K=5"], log.read_text()
    a, b = (torch.load(o, weights_only=False) for o in outs)
    assert a == b and len(a) == 6 and all(v == v for v in a.values())
