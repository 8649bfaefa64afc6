"""bench/bench_precision.py (issue 9): NLL / FID drift of bf16 and tf32 against fp32, on the tiny checkpoint, CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.filterwarnings("ignore:Inception weights .* have sha256"),  # random test weights, on purpose
    pytest.mark.filterwarnings("ignore:.*Metric `FrechetInceptionDistance` will save all extracted features"),
]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_precision", ROOT / "bench" / "bench_precision.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_precision"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _strict_json(path: Path) -> dict:
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _write_pngs(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def image_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint (1x8x8 UNet, N = 50, Gamma) pointed at a folder of 8x8 grey PNGs: image data, so the
    discrete decoder and FID apply (the weights were trained on Gaussian data; the mechanics do not care)."""
    root = tmp_path_factory.mktemp("images")
    _write_pngs(root / "train", 16, 0)
    _write_pngs(root / "test", 16, 1)
    ck = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ck["hyper_parameters"]["data"] = {
        "_target_": "analytic_dpm.data.ImageFolderDataModule", "train_dir": str(root / "train"),
        "test_dir": str(root / "test"), "image_size": 8, "channels": 1, "batch_size": 8, "flip": False,
        "cache_dir": str(root / "cache"),
    }
    path = root / "image.ckpt"
    torch.save(ck, path)
    return path


def _args(ckpt, out: Path, weights, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", "--fid-weights", str(weights),
            "--reference-cache", str(out.parent / "ref"), *extra]


TINY = ["--precisions", "fp32,bf16", "--K", "2,4", "--nll-images", "16", "--nll-batch", "8", "--network-batch", "32",
        "--fid-samples", "16", "--fid-batch", "8", "--feature-batch", "16", "--fid-K", "4", "--fid-seeds", "2",
        "--inception-rate", "5", "--budget-s", "600"]


def test_tiny_run_measures_drift_and_follows_the_rules(image_ckpt, random_inception_weights, tmp_path, capsys):
    out = tmp_path / "precision.json"
    with torch.random.fork_rng():
        assert bench.main(_args(image_ckpt, out, random_inception_weights, *TINY)) == 0
    res = _strict_json(out)
    printed = capsys.readouterr().out
    assert {"meta", "parts", "nll", "fid", "recommendation", "timings_s", "errors"} <= set(res)
    assert not res["errors"], res["errors"]
    assert [(p["name"], p["status"]) for p in res["parts"]] == [
        ("nll fp32", "done"), ("nll bf16", "done"), ("fid reference", "done"), ("fid fp32 seed 0", "done"),
        ("fid bf16 seed 0", "done"), ("fid fp32 seed 1", "done")]
    meta = res["meta"]
    assert meta["checkpoint"]["step"] == 4 and meta["gamma"]["source"] == "checkpoint"
    assert meta["data"]["is_image"] and meta["nll_options"]["decoder"] == "discrete"

    # NLL: fp32 against itself is exactly 0; bf16 moved every row (autocast reached the network)
    rows = {(r["method"], r["K"], r["precision"]): r for r in res["nll"]["rows"]}
    assert len(rows) == 3 * 2 * 2
    for m in bench.DDPM_METHODS:
        for K in (2, 4):
            fp32, bf16 = rows[(m, K, "fp32")], rows[(m, K, "bf16")]
            assert fp32["n_images"] == bf16["n_images"] == 16
            assert fp32["mean_diff"] == fp32["max_abs_diff"] == fp32["mean_abs_diff"] == 0.0
            assert bf16["max_abs_diff"] > 0 and bf16["mean_abs_diff"] > 0 and fp32["sem"] > 0
            assert math.isclose(bf16["mean_bpd"] - fp32["mean_bpd"], bf16["mean_diff"], rel_tol=1e-6, abs_tol=1e-12)
    worst = res["nll"]["max_abs_mean_diff"]
    assert worst["fp32"] == 0.0 and worst["bf16"] > 0 and worst["tf32"] is None
    assert abs(res["nll"]["worst_row"]["bf16"]["mean_diff"]) == worst["bf16"]

    # FID: same seeds at both precisions; fp32 seed 1 gives the spread
    fid = res["fid"]
    by = {r["precision"]: r for r in fid["rows"]}
    assert by["fp32"]["abs_diff_vs_fp32"] == 0.0 and by["fp32"]["pixels_first_batch"]["rms"] == 0.0
    assert by["bf16"]["pixels_first_batch"]["max"] > 0 and by["bf16"]["pixels_first_batch"]["values"] == 8 * 64
    assert set(fid["fp32_by_seed"]) == {"0", "1"} and fid["fp32_by_seed"]["0"] != fid["fp32_by_seed"]["1"]
    assert fid["fp32_seed_std"] > 0 and all(math.isfinite(r["fid"]) for r in fid["rows"])

    # the recommendation is the rule applied to the reported numbers
    rec = res["recommendation"]
    assert rec["nll"]["precision"] == bench.recommend_nll(worst, 0.005)["precision"]
    assert rec["nll"]["precision"] == ("bf16" if worst["bf16"] <= 0.005 else "fp32")
    assert set(rec["nll"]["per_method"]) == set(bench.DDPM_METHODS)
    assert (rec["nll"]["precision"] == "bf16") == all(v == "bf16" for v in rec["nll"]["per_method"].values())
    expected_fid = "bf16" if by["bf16"]["abs_diff_vs_fp32"] < fid["fp32_seed_std"] else "fp32"
    assert rec["fid_sampling"]["precision"] == expected_fid
    assert set(res["timings_s"]) == {p["name"] for p in res["parts"]}
    md = out.with_suffix(".md").read_text()
    assert "## Recommendation" in md and "| analytic_ddpm | 4 | bf16 |" in md and "## Recommendation" in printed

    # fp32 NLL is evaluate.py's number (same held-out images, blocks and seeds)
    from analytic_dpm.evaluation.run import evaluate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"paths.output_dir={tmp_path / 'eval'}", f"paths.log_dir={tmp_path / 'eval'}/logs",
            f"paths.work_dir={tmp_path}", f"paths.root_dir={ROOT}", f"ckpt_path={image_ckpt}", "eval.K=[4]",
            "eval.trajectory=[even]", "eval.method=[analytic_ddpm]", "eval.metrics=[nll]", "eval.nll.num_images=16",
            "eval.nll.batch_size=8", "eval.nll.network_batch=32", "eval.device=cpu", "eval.compile=false",
            "wandb.mode=disabled"])
    (row,) = evaluate(cfg)
    assert row["nll_bpd"] == pytest.approx(rows[("analytic_ddpm", 4, "fp32")]["mean_bpd"], rel=1e-12)


def test_budget_too_small_skips_everything_and_still_writes_json(image_ckpt, random_inception_weights, tmp_path):
    """Also: a checkpoint without Gamma is calibrated here (M from --calibration-M), and says so."""
    ck = torch.load(image_ckpt, map_location="cpu", weights_only=True)
    ck["analytic_dpm"].pop("gamma")
    bare = tmp_path / "no_gamma.ckpt"
    torch.save(ck, bare)
    out = tmp_path / "small.json"
    args = [a if a != "600" else "0" for a in TINY] + ["--calibration-M", "2", "--calibration-batch", "64"]
    assert bench.main(_args(bare, out, random_inception_weights, *args)) == 0
    res = _strict_json(out)
    assert res["parts"] and {p["status"] for p in res["parts"]} == {"skipped"}
    assert all("time budget" in p["note"] or "needs the FID reference" in p["note"] for p in res["parts"])
    assert res["meta"]["gamma"]["source"].startswith("calibrated") and res["meta"]["gamma"]["M"] == 2
    assert res["recommendation"]["nll"]["precision"] == "inconclusive"
    assert res["recommendation"]["fid_sampling"]["precision"] == "inconclusive"
    assert res["nll"]["rows"] == [] and res["fid"]["rows"] == [] and res["timings_s"] == {}
    assert out.with_suffix(".md").is_file()


def test_non_image_data_measures_nll_only(tiny_ckpt, random_inception_weights, tmp_path):
    out = tmp_path / "gauss.json"
    args = ["--precisions", "fp32", "--K", "2", "--nll-images", "8", "--fid-seeds", "2", "--budget-s", "600"]
    assert bench.main(_args(tiny_ckpt, out, random_inception_weights, *args)) == 0
    res = _strict_json(out)
    status = {p["name"]: p["status"] for p in res["parts"]}
    assert status == {"nll fp32": "done", "fid reference": "not_applicable", "fid fp32 seed 0": "not_applicable",
                      "fid fp32 seed 1": "not_applicable"}
    assert res["meta"]["nll_options"]["decoder"] == "continuous"
    assert res["recommendation"]["nll"]["precision"] == "fp32"
    assert res["recommendation"]["fid_sampling"]["precision"] == "inconclusive"


def test_bf16_attention_variant(tiny_ckpt, random_inception_weights, tmp_path):
    """bf16-attn runs a copy of the network with bf16 attention (the loaded network keeps float32 attention)."""
    out = tmp_path / "attn.json"
    args = ["--precisions", "fp32,bf16-attn", "--K", "2", "--nll-images", "8", "--fid-seeds", "0", "--budget-s", "600"]
    assert bench.main(_args(tiny_ckpt, out, random_inception_weights, *args)) == 0
    res = _strict_json(out)
    assert {p["name"]: p["status"] for p in res["parts"]} == {"nll fp32": "done", "nll bf16-attn": "done"}
    rows = {(r["method"], r["precision"]) for r in res["nll"]["rows"]}
    assert ("analytic_ddpm", "bf16-attn") in rows and ("analytic_ddpm", "fp32") in rows
    assert res["nll"]["max_abs_mean_diff"]["bf16-attn"] > 0  # autocast reached the network
    assert res["recommendation"]["nll"]["precision"] in ("bf16-attn", "fp32")


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    out = tmp_path / "x.json"
    assert bench.main(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(out), "--device", "cpu"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert "checkpoint not found" in _strict_json(out)["errors"][0]


# ------------------------------------------------------------------------------------------- the rules alone
def test_nll_rule():
    tol = 0.005
    assert bench.recommend_nll({"fp32": 0.0, "tf32": 0.0001, "bf16": 0.004}, tol)["precision"] == "bf16"
    rec = bench.recommend_nll({"fp32": 0.0, "tf32": 0.0002, "bf16": 0.012}, tol)
    assert rec["precision"] == "tf32" and "bf16: max |mean difference| 0.01200 > 0.005" in rec["reason"]
    assert bench.recommend_nll({"fp32": 0.0, "tf32": 0.006, "bf16": 0.012}, tol)["precision"] == "fp32"
    assert bench.recommend_nll({"fp32": 0.0, "tf32": None, "bf16": 0.005}, tol)["precision"] == "bf16"  # <= tol
    assert bench.recommend_nll({"fp32": 0.0, "tf32": None, "bf16": None}, tol)["precision"] == "fp32"
    assert bench.recommend_nll({"fp32": None, "bf16": 0.0}, tol)["precision"] == "inconclusive"


def test_fid_rule():
    fp32_seeds = [10.0, 10.4, 9.8]  # std 0.306
    assert bench.recommend_fid({"fp32": 10.0, "bf16": 10.2, "tf32": 10.01}, fp32_seeds)["precision"] == "bf16"
    rec = bench.recommend_fid({"fp32": 10.0, "bf16": 10.5, "tf32": 10.01}, fp32_seeds)
    assert rec["precision"] == "tf32" and rec["spread"] == pytest.approx(0.30551, abs=1e-5)
    assert bench.recommend_fid({"fp32": 10.0, "bf16": 10.5, "tf32": 9.6}, fp32_seeds)["precision"] == "fp32"
    one = bench.recommend_fid({"fp32": 10.0, "bf16": 10.0}, [10.0])
    assert one["precision"] == "inconclusive" and "at least 2" in one["reason"]
    assert bench.recommend_fid({"bf16": 10.0}, [])["precision"] == "inconclusive"


def test_plan_order_and_pairing_statistics():
    names = [p.name for p in bench.plan_parts(["fp32", "tf32", "bf16"], 4)]
    assert names == ["nll fp32", "nll bf16", "fid reference", "fid fp32 seed 0", "fid bf16 seed 0", "fid fp32 seed 1",
                     "nll tf32", "fid tf32 seed 0", "fid fp32 seed 2", "fid fp32 seed 3"]
    assert [p.name for p in bench.plan_parts(["fp32", "bf16"], 0)] == ["nll fp32", "nll bf16"]
    assert [p.name for p in bench.plan_parts(["fp32", "bf16-attn"], 1)] == [
        "nll fp32", "fid reference", "fid fp32 seed 0", "nll bf16-attn", "fid bf16-attn seed 0"]
    assert bench.parse_args(["--ckpt", "x", "--no-fid", "--fid-seeds", "3"]).fid_seeds == 0
    base = torch.tensor([3.0, 3.2, 2.9, 3.1], dtype=torch.float64)
    rows = bench.nll_rows({"fp32": {("analytic_ddpm", 10): base},
                           "bf16": {("analytic_ddpm", 10): base + torch.tensor([0.01, -0.01, 0.02, 0.0])}})
    (fp32, bf16) = rows
    assert fp32["mean_diff"] == 0.0 and fp32["sem"] == pytest.approx(float(base.std() / 2))
    assert bf16["mean_diff"] == pytest.approx(0.005) and bf16["mean_abs_diff"] == pytest.approx(0.01)
    assert bf16["max_abs_diff"] == pytest.approx(0.02)
    assert bench.max_abs_mean_diff(rows, {("analytic_ddpm", 10)}) == {
        "fp32": 0.0, "tf32": None, "bf16": pytest.approx(0.005), "bf16-attn": None}
