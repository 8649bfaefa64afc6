"""Covariance-head methods as rows of the evaluation grid (spec section 11): the exact heads of the anisotropic
Gaussian oracle through evaluate.py, the head's methods joining the grid, its optimal trajectory's cached pair costs,
the identity of the rows, and the report's variance maps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from analytic_dpm.errors import UserError
from analytic_dpm.evaluation import load_rows
from analytic_dpm.evaluation.run import evaluate

ROOT = Path(__file__).resolve().parents[1]
GRID = ["model=oracle_gaussian_aniso", "model.num_heldout=1024", "eval.K=[10]", "eval.trajectory=[even,optimal]",
        "eval.method=[ddpm_beta,analytic_ddpm]", "eval.metrics=[nll]", "eval.nll.batch_size=1024",
        "eval.nll.network_batch=8192", "eval.head.cost_images=16", "eval.head.cost_batch_size=4000"]


def _cfg(out_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=[f"paths.output_dir={out_dir}", f"paths.log_dir={out_dir.parent}/logs",
                                              f"paths.root_dir={ROOT}", "wandb.mode=disabled", *overrides])


@pytest.fixture(scope="module")
def aniso(tmp_path_factory):
    out = tmp_path_factory.mktemp("aniso") / "run"
    rows = evaluate(_cfg(out, *GRID))
    return out, {(r["method"], r["trajectory"]): r for r in rows}


def test_exact_heads_reach_the_data_likelihood_where_the_scalar_variance_cannot(aniso):
    """The NPR head of the oracle is exact: its NELBO is -log q(x_0) (-0.772 bits/dim for these 16 per-pixel stds,
    continuous decoder with the method's own variance); analytic_ddpm's one variance per step is far worse at K=10."""
    out, rows = aniso
    exact = -0.772
    for traj in ("even", "optimal"):
        npr = rows[("npr_ddpm", traj)]["nll_bpd"]
        assert npr == pytest.approx(exact, abs=0.03)
        assert rows[("analytic_ddpm", traj)]["nll_bpd"] > npr + 0.2
    assert math.isnan(rows[("npr_ddim", "even")]["nll_bpd"]) and "DDIM" in rows[("npr_ddim", "even")]["note"]
    assert {r["head"] for r in rows.values()} == {"npr:exact"}
    assert (out / "variance_maps.png").is_file()


def test_head_methods_join_the_grid_and_their_optimal_trajectory_has_its_own_id(aniso):
    out, rows = aniso
    assert {m for m, _ in rows} == {"ddpm_beta", "analytic_ddpm", "npr_ddpm", "npr_ddim"}
    ids = {(m, t): r["nll_id"] for (m, t), r in rows.items() if r["nll_bpd"] == r["nll_bpd"]}
    assert ids[("npr_ddpm", "optimal")] != ids[("npr_ddpm", "even")] != ids[("analytic_ddpm", "even")]
    assert ids[("analytic_ddpm", "even")] == ids[("ddpm_beta", "optimal")]  # isotropic ids: as before heads
    assert len(list((out.parent / "logs" / "gamma_cache").glob("pair-costs-*.pt"))) == 1


def test_a_rerun_reuses_every_cell_and_the_cached_pair_costs(aniso, monkeypatch):
    import analytic_dpm.pair_costs as pc

    out, rows = aniso
    monkeypatch.setattr(pc, "estimate_pair_costs", lambda *a, **k: pytest.fail("pair costs recomputed"))
    again = evaluate(_cfg(out, *GRID))
    for row in again:
        before = rows[(row["method"], row["trajectory"])]
        assert row["nll_id"] == before["nll_id"] and (row["nll_bpd"] == before["nll_bpd"] or math.isnan(row["nll_bpd"]))
    # a new directory still finds the table in the cache
    evaluate(_cfg(out.with_name("fresh"), *GRID))


def test_head_methods_need_a_head(tmp_path):
    with pytest.raises(UserError, match="need a model with a covariance head"):
        evaluate(_cfg(tmp_path / "run", "model=oracle_gaussian", "eval.K=[2]", "eval.method=[sn_ddpm]"))
    rows = evaluate(_cfg(tmp_path / "sn", *GRID[:-2], "model.head=sn", "eval.method=[npr_ddpm]",
                         "eval.trajectory=[even]"))
    note = {r["method"]: r["note"] for r in load_rows(tmp_path / "sn")}["npr_ddpm"]
    assert "needs an NPR head, the model has an SN head" in note
    assert {r["method"] for r in rows} == {"npr_ddpm", "sn_ddpm", "sn_ddim"}


def test_a_released_npr_model_is_evaluated_with_its_head_methods(tmp_path):
    """The authors' released-format NPR model (a fixture made with their code) through evaluate.py pretrained=...:
    its head methods join the grid, one backbone pass per step, and run.json names the head. (N = 100 instead of
    the fixture's 1000 keeps Gamma's N x M network calls cheap; the values are not compared here.)"""
    import json

    import numpy as np
    from PIL import Image

    fixture = ROOT / "tests" / "fixtures" / "pretrained" / "extended_analytic_dpm" / "iddpm_simple.pt"
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        (images / split / "c").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / split / "c" / f"{i}.png")
    flags = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "dropout": 0.3, "diffusion_steps": 100,
             "noise_schedule": "linear", "timestep_shift": False, "method": "pred_eps_epsc_pretrained"}
    out = tmp_path / "run"
    rows = evaluate(_cfg(out, "pretrained=improved_diffusion", f"pretrained.source={fixture}",
                         *[f"pretrained.options.{k}={v}" for k, v in flags.items()], "data=image_folder",
                         f"data.train_dir={images}/train", f"data.test_dir={images}/test", "data.image_size=32",
                         f"data.cache_dir={tmp_path}/cache", "eval.K=[4]", "eval.trajectory=[even]",
                         "eval.method=[analytic_ddpm]", "eval.metrics=[nll]", "eval.nll.num_images=4",
                         "eval.calibration.num_samples=1"))
    by = {(r["method"], r["trajectory"]): r for r in rows}
    assert {m for m, _ in by} == {"analytic_ddpm", "npr_ddpm", "npr_ddim"}
    assert math.isfinite(by[("npr_ddpm", "even")]["nll_bpd"])  # (the optimal trajectory: the oracle tests above)
    assert {r["head"] for r in rows} == {"npr:simple"}
    assert json.loads((out / "run.json").read_text())["source"]["head"] == "npr:simple"
