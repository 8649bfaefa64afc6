"""Lightning DDP for real (issue 10): 2 CPU processes with the gloo backend, through train.py and evaluate.py.

Training: the ranks see disjoint data, their weights stay identical, Gamma is identical on every rank and in the
checkpoint, and resuming a 2-process run is exact. Evaluation: 2 processes give the same NLL and FID as 1
(blocks seeded by their global index), and shard jobs merged give the one-job numbers.

These start several Python processes each (tens of seconds on 2 cores): ``make test-ddp`` (marker ``ddp``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analytic_dpm.evaluation import load_rows
from analytic_dpm.evaluation.merge import merge_runs

pytestmark = pytest.mark.ddp

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests" / "helpers")]),
           WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
DDP2 = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


def run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# ======================================================================================== training
TRAIN = ["data=gaussian", "data.image_size=8", "data.num_train=96", "data.num_test=16", "data.batch_size=8",
         "model=unet_tiny", "diffusion.N=50", "module.lr=1e-3", "module.ema_decay=0.9",
         "trainer.limit_train_batches=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
         "trainer.enable_model_summary=false", "logger=csv", "callbacks.gamma_calibration.num_samples=2",
         "callbacks.gamma_calibration.batch_size=100", "callbacks.gamma_calibration.nll_images=4",
         "callbacks.gamma_calibration.nll_K=[5]", "callbacks.gamma_calibration.bounds_K=[5]",
         "callbacks.gamma_calibration.plots=false", "callbacks.gamma_calibration.progress=false", *DDP2]


def train(run_dir: Path, probe: Path, *extra: str) -> None:
    run("train.py", *TRAIN, f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir.parent}/logs",
        "+callbacks.probe._target_=ddp_probe.RankProbe", f"+callbacks.probe.out_dir={probe}", *extra,
        cwd=run_dir.parent)


def records(probe: Path, step: int) -> list[dict]:
    return [json.loads((probe / f"rank{r}-{step}.json").read_text()) for r in (0, 1)]


def test_ddp_training_disjoint_data_identical_weights_gamma_and_exact_resume(tmp_path):
    whole, probe = tmp_path / "whole", tmp_path / "probe_whole"
    train(whole, probe, "trainer.max_steps=6")
    r0, r1 = records(probe, 6)
    assert r0["world_size"] == r1["world_size"] == 2 and len(r0["rows"]) == len(r1["rows"]) == 6
    for a, b in zip(r0["rows"], r1["rows"]):  # every step: two disjoint halves of one global batch
        assert len(a) == len(b) == 8 and not set(a) & set(b)
    assert r0["weights"] == r1["weights"] and r0["ema"] == r1["ema"]
    assert r0["gamma"] is not None and r0["gamma"] == r1["gamma"]
    ck = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    import hashlib

    assert hashlib.sha256(ck["analytic_dpm"]["gamma"].numpy().tobytes()).hexdigest() == r0["gamma"]
    # interrupted after 4 steps, resumed by rerunning the same command: the same weights as 6 steps straight
    cut, probe_cut = tmp_path / "cut", tmp_path / "probe_cut"
    train(cut, probe_cut, "trainer.max_steps=4")
    train(cut, probe_cut, "trainer.max_steps=6")
    c0, c1 = records(probe_cut, 6)
    assert c0["ema"] == c1["ema"] == r0["ema"] and c0["weights"] == r0["weights"] and c0["gamma"] == r0["gamma"]


# ======================================================================================== evaluation
ORACLE = ["model=oracle_gaussian", "model.num_heldout=300", "eval.K=[2,10]", "eval.trajectory=[even]",
          "eval.metrics=[nll]", "eval.nll.batch_size=64", "wandb.mode=disabled"]


def nll(rows) -> dict:
    return {(r["method"], r["K"]): r["nll_bpd"] for r in rows if r["forward"] == "ddpm"}


def test_ddp_evaluation_nll_and_shards_equal_one_process(tmp_path):
    run("evaluate.py", *ORACLE, f"hydra.run.dir={tmp_path}/one", cwd=tmp_path)
    run("evaluate.py", *ORACLE, *DDP2, f"hydra.run.dir={tmp_path}/two", cwd=tmp_path)
    one, two = nll(load_rows(tmp_path / "one")), nll(load_rows(tmp_path / "two"))
    assert len(one) == 6 and all(math.isfinite(v) for v in one.values())
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-12, abs=0), k
    for i in (0, 1):
        run("evaluate.py", *ORACLE, f"eval.shard={i}", "eval.num_shards=2", f"hydra.run.dir={tmp_path}/sh/{i}",
            cwd=tmp_path)
    assert all(r["nll_bpd"] is None for r in load_rows(tmp_path / "sh" / "0") if r["forward"] == "ddpm")  # no value yet
    merged = nll(merge_runs([tmp_path / "sh"], out_dir=tmp_path / "merged", plots=False))
    for k in one:
        assert merged[k] == pytest.approx(one[k], rel=1e-12, abs=0), k


FIXTURE = ROOT / "tests" / "fixtures" / "pretrained" / "improved_diffusion" / "tiny_learn_sigma.pt"
FLAGS = ["pretrained.options.image_size=32", "pretrained.options.num_channels=32",
         "pretrained.options.num_res_blocks=1", "pretrained.options.num_heads=4",
         "pretrained.options.num_heads_upsample=2", "pretrained.options.attention_resolutions='16,8'",
         "pretrained.options.dropout=0.1", "pretrained.options.learn_sigma=true",
         "pretrained.options.diffusion_steps=2000", "pretrained.options.noise_schedule=cosine"]


@pytest.fixture(scope="module")
def fid_setup(tmp_path_factory, random_inception_weights):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        (root / split / "c").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / "c" / f"{i}.png")
    gamma = torch.full((2001,), 0.5, dtype=torch.float64)
    gamma[0] = 0
    torch.save({"gamma": gamma}, root / "gamma.pt")
    args = ["pretrained=improved_diffusion", f"pretrained.source={FIXTURE}", *FLAGS, "data=image_folder",
            f"data.train_dir={root}/train", f"data.test_dir={root}/test", "data.image_size=32",
            f"data.cache_dir={root}/cache", f"eval.gamma_path={root}/gamma.pt", "eval.K=[3]",
            "eval.trajectory=[even]", "eval.method=[ddpm_beta,analytic_ddpm]", "eval.metrics=[fid]",
            "eval.fid.num_samples=6", "eval.fid.batch_size=2", "eval.fid.reference_images=8",
            "eval.fid.feature_batch_size=8", f"eval.fid.weights_path={random_inception_weights}",
            f"eval.fid.reference_cache={root}/fid_ref", "wandb.mode=disabled"]
    return root, args


def fids(rows) -> dict:
    return {r["method"]: r["fid"] for r in rows}


def test_ddp_fid_equals_one_process_and_shards_merge_exactly(tmp_path, fid_setup):
    _, args = fid_setup
    run("evaluate.py", *args, f"hydra.run.dir={tmp_path}/one", cwd=tmp_path)
    run("evaluate.py", *args, *DDP2, f"hydra.run.dir={tmp_path}/two", cwd=tmp_path)
    one, two = fids(load_rows(tmp_path / "one")), fids(load_rows(tmp_path / "two"))
    assert set(one) == {"ddpm_beta", "analytic_ddpm"} and all(math.isfinite(v) for v in one.values())
    for m in one:
        assert two[m] == pytest.approx(one[m], rel=1e-6), m
    for i in (0, 1):
        run("evaluate.py", *args, f"eval.shard={i}", "eval.num_shards=2", f"hydra.run.dir={tmp_path}/sh/{i}",
            cwd=tmp_path)
    merged = fids(merge_runs([tmp_path / "sh"], out_dir=tmp_path / "merged", plots=False))
    for m in one:
        assert merged[m] == pytest.approx(one[m], rel=1e-9), m
