"""evaluate.py end to end: oracle ground truth, resume, multirun merge, FID cells, W&B offline, bad input."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from analytic_dpm import NoiseSchedule
from analytic_dpm.errors import UserError
from analytic_dpm.evaluation import EvalContext, FidContext, GridRunner, ResultStore, load_rows, plan_cells
from analytic_dpm.evaluation.run import evaluate
from analytic_dpm.evaluation.settings import EvalSettings, SettingsError
from analytic_dpm.oracles import GaussianOracle

ROOT = Path(__file__).resolve().parents[1]
EXACT = 0.5 * math.log2(2 * math.pi * math.e * 0.25)


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("ADPM_ROOT", str(ROOT))


def _cfg(out_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"paths.output_dir={out_dir}", f"paths.log_dir={out_dir}/logs",
                                             f"paths.work_dir={out_dir}", f"paths.root_dir={ROOT}",
                                             *overrides])
    return cfg


ORACLE_GRID = ["model=oracle_gaussian", "eval.K=[2,10]", "eval.trajectory=[even,optimal]", "model.num_heldout=2048",
               "eval.nll.batch_size=1024", "eval.nll.network_batch=8192"]


def test_oracle_gaussian_grid_matches_closed_form_and_resumes(tmp_path, monkeypatch):
    rows = evaluate(_cfg(tmp_path, *ORACLE_GRID))
    table = {(r["method"], r["trajectory"], r["K"]): r for r in load_rows(tmp_path)}
    assert len(table) == 2 * 2 * 5 == len(rows)
    for traj in ("even", "optimal"):
        for K in (2, 10):
            analytic = table[("analytic_ddpm", traj, K)]["nll_bpd"]
            # 2048 x 64 values: Monte-Carlo std ~0.005 bits/dim
            assert analytic == pytest.approx(EXACT, abs=0.02)
            for base in ("ddpm_beta", "ddpm_beta_tilde"):
                assert table[(base, traj, K)]["nll_bpd"] > analytic
            for ddim in ("ddim", "analytic_ddim"):
                row = table[(ddim, traj, K)]
                assert math.isnan(row["nll_bpd"]) and "not defined" in row["note"]
    # per-term breakdown and report files
    terms = json.loads((tmp_path / "cells" / "analytic_ddpm-even-K10" / "nll_terms.json").read_text())
    assert len(terms["terms_bpd"]) == 11 and terms["trajectory"][-1] == 1000
    for name in ("results.csv", "results.json", "tables.md", "speedup.md", "nll_vs_K.png", "gamma.png",
                 "variance_bounds.png"):
        assert (tmp_path / name).exists(), name
    # the offline W&B run holds the results table
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/results_*.table.json"))
    assert tables and "analytic_ddpm" in tables[0].read_text()

    # resume: a rerun into the same directory computes nothing
    import analytic_dpm.evaluation.modules as modules

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(modules, "nll_bpd", boom)
    evaluate(_cfg(tmp_path, *ORACLE_GRID, "wandb.mode=disabled"))
    # ... while a new K is computed (and only it)
    monkeypatch.undo()
    _offline = dict(os.environ)  # noqa: F841
    rows = evaluate(_cfg(tmp_path, *ORACLE_GRID, "eval.K=[2,10,25]", "eval.trajectory=[even]",
                         "wandb.mode=disabled"))
    assert {r["K"] for r in rows} == {2, 10, 25} and {r["trajectory"] for r in rows if r["K"] == 25} == {"even"}
    assert table[("analytic_ddpm", "even", 2)]["nll_bpd"] == next(
        r["nll_bpd"] for r in rows if (r["method"], r["trajectory"], r["K"]) == ("analytic_ddpm", "even", 2))


def test_multirun_jobs_merge_into_one_grid(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "-m", "model=oracle_gaussian", "eval.K=2,10",
           "eval.method=analytic_ddpm", "eval.trajectory=even", "model.num_heldout=256", "wandb.mode=disabled",
           f"hydra.sweep.dir={sweep}", f"paths.log_dir={tmp_path}/logs"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (sweep / "0" / "results.csv").exists() and (sweep / "1" / "results.csv").exists()
    from analytic_dpm.evaluation.merge import main as merge_main

    assert merge_main([str(sweep), "--out", str(tmp_path / "merged"), "--no-plots"]) == 0
    merged = load_rows(tmp_path / "merged")
    assert sorted((r["method"], r["K"]) for r in merged) == [("analytic_ddpm", 2), ("analytic_ddpm", 10)]


def test_fid_cells_stream_samples_and_save_a_grid(tmp_path, random_inception_weights):
    from analytic_dpm.fid import InceptionFID, InceptionWeightsWarning

    sched = NoiseSchedule.linear(1000)
    oracle = GaussianOracle(sched, 0.0, 0.5, (3, 16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InceptionWeightsWarning)
        metric = InceptionFID(random_inception_weights, batch_size=8)
    ref_images = ((oracle.sample_data(8, torch.Generator().manual_seed(0)).clamp(-1, 1) + 1) * 127.5).round()
    metric.reference(ref_images.to(torch.uint8), progress=False)
    ctx = EvalContext(eps_model=oracle, schedule=sched, gamma=oracle.gamma(), gamma_M=None, dataset="toy",
                      data_range=(-1.0, 1.0), heldout=lambda n: oracle.sample_data(n or 8), num_heldout=8,
                      sample_shape=(3, 16, 16), device=torch.device("cpu"), fid=FidContext(metric))
    store = ResultStore(tmp_path)
    cfg = EvalSettings.from_config({"K": [2], "trajectory": ["even", "optimal"], "method": ["ddim", "analytic_ddim"],
                                    "metrics": ["fid"], "seed": 0, "fid": {"num_samples": 8, "batch_size": 5}})
    # each FID costs Inception passes and a 2048-d matrix square root on the CPU: one defined cell, one not
    GridRunner(ctx, store, cfg).run(plan_cells(["analytic_ddim"], ["even"], [2], 1000)
                                    + plan_cells(["ddim"], ["optimal"], [2], 1000))
    rows = {(r["method"], r["trajectory"]): r for r in store.rows}
    row = rows[("analytic_ddim", "even")]
    assert math.isfinite(row["fid"]) and row["fid"] > 0 and row["num_fid_samples"] == 8
    assert (tmp_path / "cells" / "analytic_ddim-even-K2" / "samples.png").exists()
    assert math.isnan(rows[("ddim", "optimal")]["fid"]) and "DDIM" in rows[("ddim", "optimal")]["note"]


def test_fid_sampling_has_its_own_precision(tmp_path):
    """eval.fid.precision: the sampling network for FID runs at it, the NLL network at eval.precision; null = the
    same; a bad value is refused with the choices."""
    sched = NoiseSchedule.linear(1000)
    oracle = GaussianOracle(sched, 0.0, 0.5, (3, 8, 8))
    ctx = EvalContext(eps_model=oracle, schedule=sched, gamma=oracle.gamma(), gamma_M=None, dataset="toy",
                      data_range=(-1.0, 1.0), heldout=lambda n: oracle.sample_data(n or 8), num_heldout=8,
                      sample_shape=(3, 8, 8), device=torch.device("cpu"), identity={"precision": "fp32"})
    base = {"K": [2], "trajectory": ["even"], "method": ["ddim"], "metrics": ["nll", "fid"]}
    split = EvalSettings.from_config({**base, "fid": {"precision": "bf16"}})
    assert (split.precision, split.fid_precision) == ("fp32", "bf16")
    runner = GridRunner(ctx, ResultStore(tmp_path), split)
    assert runner.network("fid", 4).settings.precision == "bf16"
    assert runner.network("nll", 4).settings.precision == "fp32"
    ctx.fid_precision = "bf16"
    assert runner.provenance.fid_identity("ddim")["sample_precision"] == "bf16"
    same = EvalSettings.from_config({**base, "precision": "bf16"})
    assert same.fid_precision == "bf16"
    ctx.identity = {"precision": "bf16"}
    assert "sample_precision" not in GridRunner(ctx, ResultStore(tmp_path), same).provenance.fid_identity("ddim")
    with pytest.raises(SettingsError, match=r"eval\.fid\.precision.*fp32, tf32, bf16"):
        EvalSettings.from_config({**base, "fid": {"precision": "fp16"}})


def test_cell_seconds_leave_out_compile_time(tmp_path, caplog):
    """A cell's ``seconds`` is its steady-state work: the torch.compile time of the first call (logged by accel)
    is left out."""
    import logging
    import time

    from torch._dynamo.testing import CompileCounterWithBackend

    from analytic_dpm.accel import prepare_eps_model

    counter = CompileCounterWithBackend("eager")

    def slow_backend(gm, example_inputs):
        time.sleep(1.0)  # stands in for inductor's minutes on a GPU
        return counter(gm, example_inputs)

    sched = NoiseSchedule.linear(1000)
    oracle = GaussianOracle(sched, 0.0, 0.5, (3, 8, 8))
    ctx = EvalContext(eps_model=oracle, schedule=sched, gamma=oracle.gamma(), gamma_M=None, dataset="toy",
                      data_range=None, heldout=lambda n: oracle.sample_data(n or 8), num_heldout=8,
                      sample_shape=(3, 8, 8), device=torch.device("cpu"), is_image=False)
    settings = EvalSettings.from_config({"K": [2], "trajectory": ["even"], "method": ["ddpm_beta"],
                                         "metrics": ["nll"], "nll": {"num_images": 8}})
    runner = GridRunner(ctx, ResultStore(tmp_path), settings)
    def eps_model(x, t):  # a trivial predictor: Dynamo traces it at once
        return 0.5 * x

    prepared = runner._nets[("nll", 1000)] = prepare_eps_model(eps_model, compile=True, backend=slow_backend,
                                                                device="cpu")
    with caplog.at_level(logging.INFO, logger="analytic_dpm.accel"):
        runner.run(plan_cells(["ddpm_beta"], ["even"], [2], 1000))
    assert prepared.compiled and counter.frame_count >= 1 and prepared.compile_seconds >= 1.0
    (row,) = runner.store.rows
    assert math.isfinite(row["nll_bpd"]) and row["seconds"] < 1.0  # the 1 s of "compilation" is left out
    assert "torch.compile: the first call at batch" in caplog.text


def test_every_eval_config_composes(tmp_path):
    for eval_name in ("default", "quick"):
        cfg = _cfg(tmp_path, f"eval={eval_name}", "model=oracle_gmm")
        OmegaConf.to_container(cfg, resolve=True)
        assert cfg.eval.K and cfg.eval.method


def test_bad_input_gives_clear_errors(tmp_path):
    from analytic_dpm.evaluation.gammas import load_gamma_file

    with pytest.raises(UserError, match="ckpt_path"):
        evaluate(_cfg(tmp_path, "wandb.mode=disabled"))
    with pytest.raises(UserError, match="checkpoint not found"):
        evaluate(_cfg(tmp_path, "ckpt_path=/nonexistent/last.ckpt", "wandb.mode=disabled"))
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint: not a file written by torch.save"):
        evaluate(_cfg(tmp_path, f"ckpt_path={bad}", "wandb.mode=disabled"))
    with pytest.raises(UserError, match="unknown value"):
        evaluate(_cfg(tmp_path, *ORACLE_GRID, "eval.method=[ddpm_large]", "wandb.mode=disabled"))
    with pytest.raises(UserError, match="outside 1..N"):
        evaluate(_cfg(tmp_path, *ORACLE_GRID, "eval.K=[2000]", "wandb.mode=disabled"))
    g = tmp_path / "gamma.json"
    g.write_text(json.dumps([0.5] * 10))
    with pytest.raises(UserError, match="length N\\+1"):
        load_gamma_file(g, 1000)
    # the CLI prints the message and exits 2, without a traceback
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "ckpt_path=/nonexistent.ckpt",
                           "wandb.mode=disabled", f"hydra.run.dir={tmp_path}/cli"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
                          timeout=300)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ a real (tiny) checkpoint
# (the session fixture tiny_ckpt lives in conftest.py)


def test_checkpoint_grid_and_gamma_sources(tmp_path, tiny_ckpt):
    from analytic_dpm.training import load_checkpoint

    loaded = load_checkpoint(tiny_ckpt)
    grid = [f"ckpt_path={tiny_ckpt}", "eval.K=[5,50]", "eval.trajectory=[even,optimal]", "eval.metrics=[nll]",
            "eval.nll.num_images=8", "wandb.mode=disabled"]
    rows = evaluate(_cfg(tmp_path / "a", *grid))
    by = {(r["method"], r["trajectory"], r["K"]): r for r in rows}
    assert len(by) == 2 * 2 * 5
    for key, row in by.items():
        if row["forward"] == "ddpm":
            assert math.isfinite(row["nll_bpd"]) and row["num_nll_images"] == 8, key
            assert row["gamma_M"] == loaded.gamma_meta["M"]
    # Gamma from a file overrides the checkpoint's; recalibration uses eval.calibration.num_samples
    gpath = tmp_path / "gamma.pt"
    torch.save(loaded.gamma * 0.5, gpath)
    rows = evaluate(_cfg(tmp_path / "b", *grid, f"eval.gamma_path={gpath}", "eval.method=[analytic_ddpm]"))
    assert all(r["gamma_M"] is None for r in rows)
    assert {r["nll_bpd"] for r in rows} != {by[(r["method"], r["trajectory"], r["K"])]["nll_bpd"] for r in rows}
    rows = evaluate(_cfg(tmp_path / "c", *grid, "eval.recalibrate=true", "eval.calibration.num_samples=3",
                         "eval.method=[analytic_ddpm]"))
    assert all(r["gamma_M"] == 3 for r in rows)


def test_checkpoint_without_gamma_says_how_to_calibrate(tmp_path, tiny_ckpt):
    from analytic_dpm.errors import UserError

    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ckpt["analytic_dpm"].pop("gamma")
    bare = tmp_path / "no_gamma.ckpt"
    torch.save(ckpt, bare)
    with pytest.raises(UserError, match="calibrate"):
        evaluate(_cfg(tmp_path, f"ckpt_path={bare}", "eval.metrics=[nll]", "eval.K=[5]", "wandb.mode=disabled"))


def test_missing_fid_weights_is_a_clear_error(tmp_path):
    from analytic_dpm.evaluation.reference import fid_context

    def settings(*overrides):
        return EvalSettings.from_config(_cfg(tmp_path, *overrides).eval)

    with pytest.raises(UserError, match="make fid-weights"):
        fid_context(settings("eval.fid.weights_path=/nowhere/inception.pth"), None, torch.device("cpu"))
    s = settings("eval.fid.weights_path=/nowhere/inception.pth", "eval.fid.skip_if_missing_weights=true")
    assert fid_context(s, None, torch.device("cpu")) is None
