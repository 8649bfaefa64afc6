"""The helpers of tools/gpu_session.sh: CIFAR archive unpacking, loss-curve comparison, and (slow) the dry run."""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import compare_loss_curves  # noqa: E402
import unpack_cifar_npz  # noqa: E402


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def test_unpack_cifar_archive_restores_the_files_byte_for_byte(tmp_path):
    files = [_jpeg(v) for v in (10, 120, 240)]
    header_len = 20  # JPEGs of one encoder share their first bytes; the archive stores them once
    assert len({f[:header_len] for f in files}) == 1
    bodies = [f[header_len:] for f in files]
    offsets = np.cumsum([0] + [len(b) for b in bodies])
    arrays = {"classes": np.array(["cat", "dog"])}
    for split in ("train", "test"):
        arrays.update({f"{split}_header": np.frombuffer(files[0][:header_len], np.uint8),
                       f"{split}_bodies": np.frombuffer(b"".join(bodies), np.uint8),
                       f"{split}_offsets": offsets, f"{split}_labels": np.array([1, 0, 1])})
    np.savez(tmp_path / "a.npz", **arrays)
    assert unpack_cifar_npz.main([str(tmp_path / "a.npz"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out/train/dog/0000.jpg").read_bytes() == files[0]
    assert (tmp_path / "out/train/cat/0000.jpg").read_bytes() == files[1]
    assert (tmp_path / "out/test/dog/0001.jpg").read_bytes() == files[2]
    assert Image.open(tmp_path / "out/test/dog/0001.jpg").getpixel((4, 4))[0] in range(230, 250)
    assert unpack_cifar_npz.main([str(tmp_path / "a.npz"), str(tmp_path / "lim"), "--limit", "1"]) == 0
    assert len(list((tmp_path / "lim").rglob("*.jpg"))) == 2
    del arrays["test_offsets"]
    np.savez(tmp_path / "bad.npz", **arrays)
    assert unpack_cifar_npz.main([str(tmp_path / "bad.npz"), str(tmp_path / "x")]) == 2


def _metrics_csv(path: Path, losses: dict[int, float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "gamma/nll"])
        for step, loss in losses.items():
            w.writerow([0, step, loss, ""])
        w.writerow([0, max(losses), "", 3.5])  # another metric's row, no loss
    return path


def test_compare_loss_curves_verdicts(tmp_path):
    base = {s: 1.0 / (1 + s / 50) for s in range(10, 410, 10)}
    a = _metrics_csv(tmp_path / "a/metrics.csv", base)
    same = _metrics_csv(tmp_path / "b/metrics.csv", {s: v * 1.005 for s, v in base.items()})
    worse = _metrics_csv(tmp_path / "c/metrics.csv", {s: v * 1.1 for s, v in base.items()})
    out = tmp_path / "ab.json"
    assert compare_loss_curves.main([str(a), str(same), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["verdict"] == "unchanged" and res["steps_compared"] == 40
    assert res["last_quarter_relative_difference"] == pytest.approx(0.005)
    assert res["paired_relative_difference_max"] == pytest.approx(0.005)
    assert compare_loss_curves.compare(compare_loss_curves.read_loss(a), compare_loss_curves.read_loss(worse)
                                       )["verdict"] == "changed"
    (tmp_path / "x.csv").write_text("step,other\n1,2\n")
    assert compare_loss_curves.main([str(a), str(tmp_path / "x.csv")]) == 2


@pytest.mark.slow
def test_gpu_session_dry_run(tmp_path):
    """Both device calls at toy sizes on the CPU: every step runs and every result file is written."""
    shared = ROOT.parent / "shared"
    weights = ROOT / "weights" / "pt_inception-2015-12-05.pth"
    if not (shared / "data/cifar10/jpeg_q75.npz").is_file() or not weights.is_file():
        pytest.skip("needs ../shared (CIFAR archive, wheels) and make fid-weights")
    env = {**os.environ, "OUT_DRY": str(tmp_path / "out"), "PY": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "tools/gpu_session.sh"), "dry-run"], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = (tmp_path / "out/steps.tsv").read_text()
    for name in ("bench_gpu", "head_sampling_simple", "head_sampling_complex", "train", "precision", "fid_features",
                 "attention_a", "attention_b", "attention_ab"):
        assert f"{name}\tok" in steps, steps
    for name in ("bench_gpu.json", "head_sampling_simple.json", "head_sampling_complex.json", "precision.json",
                 "fid_features.json", "attention_ab.json", "train_metrics.csv"):
        assert (tmp_path / "out" / name).is_file(), name
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
