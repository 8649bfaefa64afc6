"""evaluate.py and the calibrate command on pretrained networks of other projects (issue 8), end to end on the
improved-diffusion fixture (tests/fixtures/pretrained, made with that project's own code)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from analytic_dpm.errors import UserError
from analytic_dpm.evaluation.run import evaluate
from analytic_dpm.training import calibrate as calibrate_cli

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "pretrained" / "improved_diffusion" / "tiny_learn_sigma.pt"
FLAGS = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "num_heads": 4, "num_heads_upsample": 2,
         "attention_resolutions": "16,8", "dropout": 0.1, "learn_sigma": True, "diffusion_steps": 200,
         "noise_schedule": "cosine"}  # (the fixture was made with 2000 steps; 200 keeps Gamma's N*M calls cheap)


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("ADPM_ROOT", str(ROOT))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Random 32x32 RGB PNGs: 8 for training, 4 held out."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        (root / split / "c").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / "c" / f"{i}.png")
    return root


def cfg(out_dir: Path, images: Path, *overrides: str):
    opts = [f"pretrained.options.{k}={v}" for k, v in FLAGS.items() if k != "attention_resolutions"]
    opts.append("pretrained.options.attention_resolutions='16,8'")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=[
            f"paths.output_dir={out_dir}", f"paths.log_dir={out_dir.parent}/logs", f"paths.root_dir={ROOT}",
            "pretrained=improved_diffusion", f"pretrained.source={FIXTURE}", *opts,
            "data=image_folder", f"data.train_dir={images}/train", f"data.test_dir={images}/test", "data.image_size=32",
            f"data.cache_dir={out_dir.parent}/cache", "eval.K=[4]", "eval.trajectory=[even]",
            "eval.method=[ddpm_beta,analytic_ddpm]", "eval.nll.num_images=4", "eval.calibration.num_samples=1",
            "eval.calibration.batch_size=1000", f"eval.gamma_cache={out_dir.parent}/gamma_cache", "wandb.mode=disabled",
            *overrides,
        ])


def test_evaluate_pretrained_nll_fid_and_gamma_cache(tmp_path, image_folder, random_inception_weights, monkeypatch):
    out = tmp_path / "run"
    fid = ["eval.metrics=[nll,fid]", "eval.fid.num_samples=4", "eval.fid.batch_size=4", "eval.fid.reference_images=8",
           "eval.fid.feature_batch_size=8", f"eval.fid.weights_path={random_inception_weights}",
           f"eval.fid.reference_cache={tmp_path}/fid_ref", "eval.fid.save_grid=false", "eval.fid.K=[4]"]
    with pytest.warns(Warning):  # random Inception weights: not the expected hash
        rows = evaluate(cfg(out, image_folder, *fid))
    by = {r["method"]: r for r in rows}
    assert set(by) == {"ddpm_beta", "analytic_ddpm"}
    for r in rows:
        assert math.isfinite(r["nll_bpd"]) and math.isfinite(r["fid"]) and r["N"] == 200 and r["gamma_M"] == 1
        assert r["num_nll_images"] == 4 and r["num_fid_samples"] == 4 and r["schedule"]
    assert by["analytic_ddpm"]["nll_bpd"] != by["ddpm_beta"]["nll_bpd"]
    cached = list((tmp_path / "gamma_cache").glob("gamma-*.pt"))
    assert len(cached) == 1
    # FID against statistics the user already has (pytorch-fid's npz: mu, sigma), here those of the same images
    (ref_cache,) = (tmp_path / "fid_ref").glob("*.npz")
    with np.load(ref_cache) as z:
        np.savez(tmp_path / "fid_stats.npz", mu=z["mu"], sigma=z["sigma"])
    with pytest.warns(Warning):
        theirs = evaluate(cfg(tmp_path / "run_npz", image_folder, *fid,
                              f"eval.fid.reference_stats={tmp_path}/fid_stats.npz"))
    for r in theirs:
        assert r["fid"] == pytest.approx(by[r["method"]]["fid"], rel=1e-6) and r["fid_id"] != by[r["method"]]["fid_id"]
    # FID sampled at its own precision (eval.fid.precision): NLL and nll_id unchanged, FID gets its own fid_id, and
    # every row says at which precision each metric was computed
    with pytest.warns(Warning):
        bf16 = {r["method"]: r for r in evaluate(cfg(tmp_path / "run_fid_bf16", image_folder, *fid,
                                                     "eval.fid.precision=bf16"))}
    for m, r in bf16.items():
        assert (r["precision"], r["fid_precision"], by[m]["fid_precision"]) == ("fp32", "bf16", "fp32")
        assert r["nll_id"] == by[m]["nll_id"] and r["nll_bpd"] == by[m]["nll_bpd"]
        assert r["fid_id"] != by[m]["fid_id"] and math.isfinite(r["fid"])
    import json

    idents = json.loads((tmp_path / "run_fid_bf16" / "identities.json").read_text())
    assert {v.get("sample_precision") for v in idents.values() if v.get("metric") == "fid"} == {"bf16"}
    default_idents = json.loads((out / "identities.json").read_text())
    assert not any("sample_precision" in v for v in default_idents.values())  # default: fid_ids as before
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(UserError, match="needs arrays 'mu' and 'sigma'"):
        evaluate(cfg(tmp_path / "run_bad", image_folder, *fid, f"eval.fid.reference_stats={tmp_path}/bad.npz"))
    # Gamma is reused from the cache in a new run directory: no calibration this time
    import analytic_dpm.calibration as calibration

    monkeypatch.setattr(calibration, "estimate_gamma", lambda *a, **k: pytest.fail("Gamma was recalibrated"))
    again = evaluate(cfg(tmp_path / "run2", image_folder, "eval.metrics=[nll]"))
    assert {r["gamma_hash"] for r in again} == {r["gamma_hash"] for r in rows}
    assert {r["model_id"] for r in again} == {r["model_id"] for r in rows}
    assert {r["method"]: r["nll_bpd"] for r in again} == {m: r["nll_bpd"] for m, r in by.items()}


def test_calibrate_cli_writes_a_gamma_file_that_evaluate_reads(tmp_path, image_folder, capsys):
    out = tmp_path / "gamma.pt"
    argv = ["--pretrained", "improved_diffusion", "--source", str(FIXTURE), "--dataset", "image_folder",
            "--data", f"train_dir={image_folder}/train", "--data", f"test_dir={image_folder}/test",
            "--data", "image_size=32", "--data", f"cache_dir={tmp_path}/cache", "--out", str(out), "-M", "1",
            "--batch-size", "1000", "--no-progress"]
    argv += [a for k, v in FLAGS.items() for a in ("--option", f"{k}={v}")]
    assert calibrate_cli.main(argv) == 0, capsys.readouterr().err
    saved = torch.load(out, weights_only=True)
    assert saved["gamma"].shape == (201,) and saved["M"] == 1 and saved["model"]["kind"]
    rows = evaluate(cfg(tmp_path / "run", image_folder, "eval.metrics=[nll]", f"eval.gamma_path={out}"))
    # the rows keep the M the file records (the Gamma file knows it)
    assert all(math.isfinite(r["nll_bpd"]) for r in rows) and all(r["gamma_M"] == 1 for r in rows)
    assert not (tmp_path / "gamma_cache").exists()  # the given file was used, nothing calibrated


def test_pretrained_errors(tmp_path, image_folder, capsys):
    with pytest.raises(UserError, match="needs data="):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            c = compose("evaluate", overrides=[f"paths.output_dir={tmp_path}/a", f"paths.log_dir={tmp_path}",
                                               f"paths.root_dir={ROOT}", "pretrained=diffusers",
                                               f"pretrained.source={tmp_path}", "wandb.mode=disabled", "eval.K=[4]"])
        evaluate(c)
    with pytest.raises(UserError, match="improved_diffusion"):
        evaluate(cfg(tmp_path / "b", image_folder, "pretrained.options.num_res_blocks=2"))
    with pytest.raises(UserError, match="takes 3x32x32 images but the data gives 3x16x16"):
        evaluate(cfg(tmp_path / "c", image_folder, "data.image_size=16"))
    with pytest.raises(UserError, match="not several"):
        evaluate(cfg(tmp_path / "d", image_folder, "ckpt_path=x.ckpt"))
    assert calibrate_cli.main(["--pretrained", "nonsense", "--source", "x", "--dataset", "cifar10",
                               "--out", str(tmp_path / "g.pt")]) == 2
    assert "unknown pretrained kind" in capsys.readouterr().err


def test_calibrate_cli_infers_the_image_size_from_the_model(tmp_path, image_folder, capsys):
    """No --data image_size=...: the model knows its size (the dataset would otherwise say which key to add)."""
    out = tmp_path / "gamma.pt"
    argv = ["--pretrained", "improved_diffusion", "--source", str(FIXTURE), "--dataset", "image_folder",
            "--data", f"train_dir={image_folder}/train", "--data", f"test_dir={image_folder}/test",
            "--data", f"cache_dir={tmp_path}/cache", "--out", str(out), "-M", "1", "--batch-size", "1000",
            "--no-progress"]
    argv += [a for k, v in FLAGS.items() for a in ("--option", f"{k}={v}")]
    assert calibrate_cli.main(argv) == 0, capsys.readouterr().err
    assert torch.load(out, weights_only=True)["gamma"].shape == (201,)
    i = argv.index(f"test_dir={image_folder}/test")
    assert calibrate_cli.main(argv[: i - 1] + argv[i + 1 :]) == 2  # a key the dataset needs: named, how to pass it
    assert "needs test_dir; add test_dir=... (on this command line: --data KEY=VALUE)" in capsys.readouterr().err


def test_run_json_says_which_conventions_were_applied(tmp_path, image_folder):
    evaluate(cfg(tmp_path / "run", image_folder, "eval.metrics=[nll]"))
    doc = json.loads((tmp_path / "run" / "run.json").read_text())
    src = doc["source"]
    assert src["source"] == "pretrained" and src["kind"] == "improved_diffusion"
    assert src["timestep_convention"] and src["weights"] and src["weights_sha256"].startswith("sha256:")
    assert src["options"]["diffusion_steps"] == 200 and doc["N"] == 200


def test_the_quick_grid_calibrates_with_a_small_m(tmp_path):
    """eval=quick: M = 10 (the paper: M = 10 gives the NLL/FID of M = 50000): N x M = 10,000 network calls at
    N = 1000 on the first evaluation of a pretrained model, instead of 100,000."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        quick = compose("evaluate", overrides=["eval=quick", f"paths.output_dir={tmp_path}"])
        full = compose("evaluate", overrides=[f"paths.output_dir={tmp_path}"])
    assert quick.eval.calibration.num_samples == 10 and full.eval.calibration.num_samples == 100
