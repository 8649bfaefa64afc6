"""Evaluation as a user meets it when files in between are damaged or tampered with, or an input is wrong (issue
"the user's way"): cached Gamma, shards and merge, results files, and the core functions' error messages."""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from analytic_dpm import NoiseSchedule, make_trajectory, nll_bpd, sample
from analytic_dpm.data import GaussianDataModule
from analytic_dpm.errors import UserError
from analytic_dpm.evaluation.gammas import cached_gamma, load_gamma_file
from analytic_dpm.evaluation.merge import main as merge_main
from analytic_dpm.evaluation.run import evaluate
from analytic_dpm.evaluation.settings import EvalSettings, SettingsError
from analytic_dpm.gamma import read_gamma_file
from analytic_dpm.oracles import GaussianOracle
from analytic_dpm.validation import GammaWarning

ROOT = Path(__file__).resolve().parents[1]
SCHED = NoiseSchedule.linear(50)


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


def _cfg(out_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=[f"paths.output_dir={out_dir}", f"paths.log_dir={out_dir}/logs",
                                              f"paths.root_dir={ROOT}", "wandb.mode=disabled", *overrides])


# ------------------------------------------------------------------------------------------------ Gamma cache
class Half(torch.nn.Module):
    def __init__(self, scale=0.5):
        super().__init__()
        self.scale = scale

    def forward(self, x, t):
        return self.scale * x


def _gamma_setup(tmp_path):
    dm = GaussianDataModule(dim_shape=(1, 4, 4), num_train=64, num_test=8, seed=0)
    dm.setup("fit")
    s = EvalSettings.from_config({"K": [5], "trajectory": ["even"], "method": ["analytic_ddpm"],
                                  "gamma_cache": str(tmp_path / "cache"),
                                  "calibration": {"num_samples": 2, "batch_size": 20}})
    return dm, s


def test_a_cached_gamma_is_used_only_for_its_key_and_checksum(tmp_path):
    dm, s = _gamma_setup(tmp_path)
    mine, _ = cached_gamma(Half(0.5), SCHED, dm, s, "cpu", {"model": "half"})
    other, _ = cached_gamma(Half(0.9), SCHED, dm, s, "cpu", {"model": "other"})
    (mine_file,) = [p for p in (tmp_path / "cache").glob("gamma-*.pt")
                    if read_gamma_file(p)[1]["key"]["model"] == {"model": "half"}]
    other_file = next(p for p in (tmp_path / "cache").glob("gamma-*.pt") if p != mine_file)
    assert not torch.equal(mine, other)

    # another model's Gamma copied over the cache file: recomputed (with a warning naming the file), never used
    mine_file.write_bytes(other_file.read_bytes())
    with pytest.warns(UserWarning, match=rf"the cached Gamma {mine_file} is not used: it was computed for another"):
        again, _ = cached_gamma(Half(0.5), SCHED, dm, s, "cpu", {"model": "half"})
    assert torch.equal(again, mine)

    # the same Gamma times 3 (the checksum no longer matches): recomputed, never used
    obj = torch.load(mine_file, weights_only=True)
    obj["gamma"] = obj["gamma"] * 3
    torch.save(obj, mine_file)
    with pytest.warns(UserWarning, match="does not match the checksum"):
        again, _ = cached_gamma(Half(0.5), SCHED, dm, s, "cpu", {"model": "half"})
    assert torch.equal(again, mine)
    assert torch.equal(read_gamma_file(mine_file)[0], mine)  # the cache holds the right Gamma again


def test_a_gamma_file_holding_a_pickle_gets_our_error(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    bad = tmp_path / "gamma.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"gamma": torch.zeros(51), "x": Payload()}, fh, protocol=2)
    torch.save({"gamma": torch.zeros(51), "x": Payload()}, bad)
    with pytest.raises(UserError) as err:
        load_gamma_file(bad, 50)
    assert "holds pickled Python objects" in str(err.value) and "weights_only=False" not in str(err.value)


# ------------------------------------------------------------------------------------------------ shards and merge
SHARDED = ["model=oracle_gaussian", "model.num_heldout=64", "diffusion.N=50", "eval.K=[2,5]", "eval.trajectory=[even]",
           "eval.method=[ddpm_beta,analytic_ddpm]", "eval.metrics=[nll]", "eval.nll.batch_size=16",
           "eval.num_shards=2"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """An oracle grid split into 2 shard jobs, and the value one job gives."""
    root = tmp_path_factory.mktemp("sharded")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        for i in range(2):
            evaluate(_cfg(root / "sweep" / str(i), *SHARDED, f"eval.shard={i}"))
        whole = evaluate(_cfg(root / "whole", *SHARDED[:-1]))
    return root, {(r["method"], r["K"]): r["nll_bpd"] for r in whole}


def _merge(root: Path, tmp_path: Path, capsys) -> dict:
    out = tmp_path / "merged"
    assert merge_main([str(root), "--out", str(out), "--no-plots"]) == 0, capsys.readouterr().err
    return {(r["method"], r["K"]): r for r in json.loads((out / "results.json").read_text())["rows"]}


def _copy(sharded, tmp_path) -> Path:
    import shutil

    root = tmp_path / "sweep"
    shutil.copytree(sharded[0] / "sweep", root)
    return root


def test_intact_shards_merge_to_the_one_job_value(sharded, tmp_path, capsys):
    rows = _merge(_copy(sharded, tmp_path), tmp_path, capsys)
    for key, value in sharded[1].items():
        assert rows[key]["nll_bpd"] == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("damage,note", [
    ("count", "its count 320 is not the 32 items of its blocks"),
    ("nan", "non-finite sums"),
    ("garbage", "unreadable"),
])
def test_a_damaged_shard_is_refused_and_named(sharded, tmp_path, capsys, damage, note):
    root = _copy(sharded, tmp_path)
    shard = next((root / "1" / "shards").glob("*-K5/nll-1-of-2.json"))
    doc = json.loads(shard.read_text())
    if damage == "count":
        doc["count"] *= 10
        shard.write_text(json.dumps(doc))
    elif damage == "nan":
        doc["bpd_sums"][0] = float("nan")
        shard.write_text(json.dumps(doc))
    else:
        shard.write_text("{not json")
    rows = _merge(root, tmp_path, capsys)
    for method in ("ddpm_beta", "analytic_ddpm"):
        row = rows[(method, 5)]
        assert row["nll_bpd"] is None and note in row["note"] and str(shard) in row["note"]
        assert rows[(method, 2)]["nll_bpd"] == pytest.approx(sharded[1][(method, 2)], rel=1e-12)


def test_merge_reads_the_csv_when_the_json_is_damaged(sharded, tmp_path, capsys):
    root = _copy(sharded, tmp_path)
    (root / "0" / "results.json").write_text("{damaged")
    with pytest.warns(UserWarning, match="reading .*results.csv"):
        rows = _merge(root, tmp_path, capsys)
    assert len(rows) == 4 and all(r["nll_bpd"] is not None for r in rows.values())


def test_a_damaged_results_json_without_csv_is_an_error_line(tmp_path):
    grid = ["model=oracle_gaussian", "model.num_heldout=16", "diffusion.N=50", "eval.K=[2]", "eval.trajectory=[even]",
            "eval.method=[ddpm_beta]", "eval.metrics=[nll]"]
    evaluate(_cfg(tmp_path / "run", *grid))
    (tmp_path / "run" / "results.csv").unlink()
    (tmp_path / "run" / "results.json").write_text("{damaged")
    with pytest.raises(UserError, match=r"results.json is damaged .* move it away"):
        evaluate(_cfg(tmp_path / "run", *grid))


def test_an_oracle_with_a_negative_std_is_an_error_line(tmp_path):
    with pytest.raises(UserError, match="std must be finite and > 0"):
        evaluate(_cfg(tmp_path, "model=oracle_gaussian", "model.std=-0.5", "eval.K=[2]"))


# ------------------------------------------------------------------------------------------------ the core, directly
ORACLE = GaussianOracle(SCHED, 0.0, 0.5, (1, 4, 4))


def test_core_functions_say_what_is_wrong():
    taus = make_trajectory("even", 50, 5)
    with pytest.raises(ValueError, match="x0 holds no images"):
        nll_bpd(ORACLE, SCHED, taus, torch.zeros(0, 1, 4, 4), ["ddpm_beta"], decoder="continuous")
    with pytest.raises(ValueError, match=r"cannot take inputs of shape \(2, 3, 8, 8\)"):
        sample(ORACLE, SCHED, taus, "ddpm_beta", (2, 3, 8, 8))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="eta must lie in"):
            sample(ORACLE, SCHED, taus, "ddim", (2, 1, 4, 4), eta=bad)
        with pytest.raises(SettingsError, match="eval.eta"):
            EvalSettings.from_config({"K": [5], "trajectory": ["even"], "method": ["ddim"], "eta": bad})
    with pytest.warns(GammaWarning, match="exceeds 1 on"):
        sample(ORACLE, SCHED, taus, "analytic_ddpm", (2, 1, 4, 4), gamma=torch.cat([torch.zeros(1),
                                                                                      torch.full((50,), 1.5)]))


def test_numpy_integers_are_integers():
    assert make_trajectory("even", 50, np.int64(5)) == make_trajectory("even", 50, 5)
    s = EvalSettings.from_config({"K": np.array([5, 10]), "trajectory": ["even"], "method": ["ddim"],
                                  "seed": np.int32(3)})
    assert s.K == (5, 10) and s.seed == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = sample(ORACLE, SCHED, np.array([1, 25, 50]), "ddim", (2, 1, 4, 4), clip_x0=False, data_range=None)
    assert x.shape == (2, 1, 4, 4) and math.isfinite(float(x.sum()))


def test_a_truncated_checkpoint_says_truncated(tmp_path, tiny_ckpt):
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(tiny_ckpt.read_bytes()[: tiny_ckpt.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or damaged"):
        evaluate(_cfg(tmp_path / "run", f"ckpt_path={cut}", "eval.K=[2]"))


def test_heatmap_titles_fit_in_the_figure(tmp_path, monkeypatch):
    from analytic_dpm.evaluation import report
    from analytic_dpm.evaluation.results import normalize_row

    figures = []
    monkeypatch.setattr(report, "save", lambda fig, path: figures.append(fig) or path)
    rows = [normalize_row(dict(dataset="fashion_mnist", schedule="linear", N=1000, method=m, K=k, trajectory="even",
                               nll_bpd=5.0 + k / 100)) for m in ("ddpm_beta", "analytic_ddpm") for k in (10, 100)]
    title = "fashion_mnist (linear, N=1000): NLL (bits/dim), even trajectory"
    report.plot_heatmap(rows, "nll_bpd", tmp_path / "h.png", title=title)
    (fig,) = figures
    fig.canvas.draw()
    box = fig.axes[0].title.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


def test_load_gamma_reads_every_gamma_file(tmp_path, tiny_ckpt):
    """The public reader for a diffusers user: the calibrate CLI's / Gamma cache's file, a training checkpoint."""
    from analytic_dpm.gamma import load_gamma, save_gamma_file

    g = torch.cat([torch.zeros(1), torch.linspace(0.1, 0.9, 50)]).double()
    save_gamma_file(tmp_path / "g.pt", g, M=10)
    assert torch.equal(load_gamma(tmp_path / "g.pt"), g) and load_gamma(tmp_path / "g.pt", N=50).shape == (51,)
    with pytest.raises(ValueError, match="length N\\+1"):
        load_gamma(tmp_path / "g.pt", N=60)
    assert load_gamma(tiny_ckpt).shape == (51,)


def test_oracle_ids_are_unchanged_by_the_head_key():
    """conf/model/oracle_*.yaml gained `head: null`: the oracle's model_id stays what it was (older results valid)."""
    from analytic_dpm.evaluation.provenance import oracle_model_id

    params = {"oracle": "gaussian", "mean": 0.0, "std": 0.5, "shape": [1, 8, 8], "num_heldout": 4096}
    assert oracle_model_id({**params, "head": None}, SCHED) == oracle_model_id(params, SCHED)
    assert oracle_model_id({**params, "head": "npr"}, SCHED) != oracle_model_id(params, SCHED)
