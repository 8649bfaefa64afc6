"""Trustworthy numbers (issue 7): no code run from a checkpoint, no stale or mixed results, broken networks
detected, no overwritten training runs, no rows lost to concurrent writers, clear errors for bad input."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning import Callback

from analytic_dpm import NoiseSchedule, estimate_gamma, nll_bpd, sample
from analytic_dpm.errors import ConfigError, UserError
from analytic_dpm.evaluation import EvalContext, FidContext, GridRunner, ResultStore, load_rows, plan_cells
from analytic_dpm.evaluation.run import CellsFailed, evaluate
from analytic_dpm.evaluation.run import run_cli as eval_cli
from analytic_dpm.evaluation.settings import EvalSettings
from analytic_dpm.oracles import GaussianOracle
from analytic_dpm.training import calibrate as calibrate_cli
from analytic_dpm.training import calibrate_checkpoint, load_checkpoint, train
from analytic_dpm.training.run import run_cli as train_cli
from analytic_dpm.validation import NonFiniteOutputError

pytestmark = [
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
]

ROOT = Path(__file__).resolve().parents[1]
ORACLE = ["model=oracle_gaussian", "model.num_heldout=64", "eval.trajectory=[even]", "eval.metrics=[nll]",
          "eval.nll.batch_size=64", "eval.nll.network_batch=4096", "wandb.mode=disabled"]


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("ADPM_ROOT", str(ROOT))


def eval_cfg(out_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=[f"paths.output_dir={out_dir}", f"paths.log_dir={out_dir}/logs",
                                              f"paths.work_dir={out_dir}", f"paths.root_dir={ROOT}", *overrides])


def nothing_written(out_dir: Path) -> bool:
    return not any((out_dir / name).exists() for name in ("results.csv", "results.json", "identities.json", "cells"))


# ============================================================================ 1. a checkpoint never runs code
class _MakesMarker:
    """Unpickling this creates a file: the side effect a crafted checkpoint must never get."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted(tmp_path: Path, tiny_ckpt: Path, case: str) -> tuple[Path, Path, Path]:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    marker = tmp_path / "marker"
    evil_pickle = tmp_path / "evil.pkl"
    evil_pickle.write_bytes(pickle.dumps(_MakesMarker(str(marker))))
    ck = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    hp = ck["hyper_parameters"]
    if case == "model_target":
        hp["model"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    elif case == "nested_target":
        hp["model"] = {**hp["model"], "channel_mult": {"_target_": "builtins.open", "file": str(victim), "mode": "w"}}
    elif case == "data_torch_load":
        hp["data"] = {"_target_": "torch.load", "f": str(evil_pickle), "weights_only": False}
    elif case == "prefixed_target":  # a path inside this package that reaches torch.load
        hp["model"] = {"_target_": "analytic_dpm.training.checkpoint.torch.load", "f": str(evil_pickle),
                       "weights_only": False}
    elif case == "nested_data_target":
        hp["data"] = {**hp["data"], "num_train": {"_target_": "torch.load", "f": str(evil_pickle),
                                                  "weights_only": False}}
    path = tmp_path / f"crafted_{case}.ckpt"
    torch.save(ck, path)
    return path, victim, marker


CRAFTED = ["model_target", "nested_target", "data_torch_load", "prefixed_target", "nested_data_target"]


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_checkpoint_is_refused_without_side_effects(tmp_path, tiny_ckpt, case):
    path, victim, marker = _crafted(tmp_path, tiny_ckpt, case)
    out = tmp_path / "eval"
    with pytest.raises(UserError, match="refusing|not accepted"):
        evaluate(eval_cfg(out, f"ckpt_path={path}", "eval.metrics=[nll]", "eval.K=[5]", "wandb.mode=disabled"))
    with pytest.raises(ValueError, match="refusing|not accepted"):
        calibrate_checkpoint(path, out_path=tmp_path / "out.ckpt", num_samples=1, progress=False)
    assert calibrate_cli.main(["--ckpt", str(path), "--out", str(tmp_path / "out.ckpt"), "-M", "1",
                               "--no-progress"]) == 2
    assert victim.read_text() == "precious" and not marker.exists() and not (tmp_path / "out.ckpt").exists()
    assert nothing_written(out)


def test_pickled_code_in_a_checkpoint_is_not_unpickled(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": _MakesMarker(str(marker))}, path)
    with pytest.raises(ValueError, match="refusing to unpickle") as err:
        load_checkpoint(path)
    assert "weights_only=False" not in str(err.value) and not marker.exists()


# ============================================================================ 2. reruns never show old numbers
def _perturbed(tiny_ckpt: Path, out: Path) -> Path:
    ck = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    key = next(k for k in ck["state_dict"] if k.startswith("ema_model.") and k.endswith("weight"))
    ck["state_dict"][key] = ck["state_dict"][key] + 0.01
    torch.save(ck, out)
    return out


def test_rerun_with_another_checkpoint_or_seed_is_refused_or_redirected(tmp_path, tiny_ckpt):
    out = tmp_path / "eval"
    base = ["eval.metrics=[nll]", "eval.K=[5]", "eval.trajectory=[even]", "eval.method=[analytic_ddpm]",
            "eval.nll.num_images=8", "wandb.mode=disabled"]
    first = evaluate(eval_cfg(out, f"ckpt_path={tiny_ckpt}", *base))
    before = (out / "results.csv").read_text()
    assert first[0]["model_id"] and first[0]["gamma_hash"] and first[0]["version"] and first[0]["nll_id"]
    other = _perturbed(tiny_ckpt, tmp_path / "other.ckpt")
    with pytest.raises(UserError, match="model_id"):
        evaluate(eval_cfg(out, f"ckpt_path={other}", *base))
    with pytest.raises(UserError, match="seed"):
        evaluate(eval_cfg(out, f"ckpt_path={tiny_ckpt}", *base, "eval.seed=1"))
    with pytest.raises(UserError, match="NLL settings"):
        evaluate(eval_cfg(out, f"ckpt_path={tiny_ckpt}", *base, "eval.nll.num_images=4"))
    assert (out / "results.csv").read_text() == before  # nothing touched
    # the same run resumes; another model with on_mismatch=new_dir goes to a directory of its own
    assert evaluate(eval_cfg(out, f"ckpt_path={tiny_ckpt}", *base))[0]["nll_bpd"] == first[0]["nll_bpd"]
    rows = evaluate(eval_cfg(out, f"ckpt_path={other}", *base, "eval.on_mismatch=new_dir"))
    new_dirs = [p for p in tmp_path.iterdir() if p.name.startswith("eval-")]
    assert len(new_dirs) == 1 and load_rows(new_dirs[0])[0]["model_id"] == rows[0]["model_id"] != first[0]["model_id"]
    assert (out / "results.csv").read_text() == before
    identities = json.loads((out / "identities.json").read_text())
    assert identities[first[0]["nll_id"]]["num_images"] == 8


def test_fid_not_computed_is_computed_once_weights_exist(tmp_path, random_inception_weights):
    from analytic_dpm.fid import InceptionFID, InceptionWeightsWarning

    sched = NoiseSchedule.linear(1000)
    oracle = GaussianOracle(sched, 0.0, 0.5, (3, 8, 8))
    ident = dict(model_id="toy", model_step=None, gamma_hash="g", precision="fp32", version="test")

    def ctx(fid):
        return EvalContext(eps_model=oracle, schedule=sched, gamma=oracle.gamma(), gamma_M=None, dataset="toy",
                           data_range=(-1.0, 1.0), heldout=lambda n: oracle.sample_data(n or 8), num_heldout=8,
                           sample_shape=(3, 8, 8), device=torch.device("cpu"), fid=fid, identity=ident)

    settings = EvalSettings.from_config({"K": [2], "trajectory": ["even"], "method": ["ddim"], "metrics": ["fid"],
                                         "fid": {"num_samples": 4, "batch_size": 4}})
    cells = plan_cells(["ddim"], ["even"], [2], 1000)
    store = ResultStore(tmp_path)
    GridRunner(ctx(None), store, settings).run(cells)
    row = store.rows[0]
    assert row["fid"] is None and "FID: not computed" in row["note"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InceptionWeightsWarning)
        metric = InceptionFID(random_inception_weights, batch_size=8)
    ref_images = ((oracle.sample_data(4, torch.Generator().manual_seed(0)).clamp(-1, 1) + 1) * 127.5).round()
    metric.reference(ref_images.to(torch.uint8), progress=False)
    GridRunner(ctx(FidContext(metric, identity={"w": 1})), ResultStore(tmp_path), settings).run(cells)
    row = ResultStore(tmp_path).rows[0]
    assert math.isfinite(row["fid"]) and row["fid_id"] and "not computed" not in row["note"]


# ============================================================================ 3. broken networks are detected
def _nan_above(t0: int):
    def eps_model(x, t):
        out = torch.zeros_like(x)
        return torch.where((t >= t0).view(-1, *[1] * (x.ndim - 1)), torch.full_like(x, math.nan), out)
    return eps_model


def test_core_functions_detect_non_finite_network_output():
    sched = NoiseSchedule.linear(50)
    model = _nan_above(30)
    with pytest.raises(NonFiniteOutputError, match="timestep t=50") as err:
        sample(model, sched, [1, 10, 30, 50], "ddpm_beta", (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert err.value.step == 1 and err.value.where == "sample"
    x0 = torch.zeros(3, 1, 4, 4)
    with pytest.raises(NonFiniteOutputError, match="timestep t=30") as err:
        nll_bpd(model, sched, [1, 10, 30, 50], x0, ["ddpm_beta"], decoder="continuous", data_range=None,
                clip_x0=False)
    assert err.value.timestep == 30
    with pytest.raises(NonFiniteOutputError, match="timestep t=30"):
        estimate_gamma(model, sched, torch.zeros(4, 1, 4, 4), num_samples=2, batch_size=16, progress=False)
    inf_model = lambda x, t: torch.full_like(x, math.inf)  # noqa: E731 - would give all -1 images silently
    with pytest.raises(NonFiniteOutputError):
        sample(inf_model, sched, [1, 50], "ddim", (2, 1, 4, 4))


def test_nan_checkpoint_is_a_clear_error(tmp_path, tiny_ckpt):
    ck = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    for k in ck["state_dict"]:
        if k.startswith("ema_model.") and ck["state_dict"][k].is_floating_point():
            ck["state_dict"][k] = torch.full_like(ck["state_dict"][k], math.nan)
    bad = tmp_path / "nan.ckpt"
    torch.save(ck, bad)
    out = tmp_path / "eval"
    with pytest.raises(UserError, match="NaN or inf"):
        evaluate(eval_cfg(out, f"ckpt_path={bad}", "eval.metrics=[nll]", "eval.K=[5]", "wandb.mode=disabled"))
    assert nothing_written(out)


def test_overflowing_network_cells_fail_and_never_enter_tables(tmp_path, tiny_ckpt, capsys):
    ck = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    out_w = [k for k in ck["state_dict"] if k.startswith("ema_model.out.") and k.endswith("weight")][-1]
    ck["state_dict"][out_w] = torch.full_like(ck["state_dict"][out_w], 3e38)  # finite weights, inf outputs
    bad = tmp_path / "overflow.ckpt"
    torch.save(ck, bad)
    out = tmp_path / "eval"
    cfg = eval_cfg(out, f"ckpt_path={bad}", "eval.metrics=[nll]", "eval.K=[5]", "eval.trajectory=[even]",
                   "eval.nll.num_images=4", "eval.recalibrate=false", "wandb.mode=disabled")
    with pytest.raises(CellsFailed, match="not finite"):
        evaluate(cfg)
    rows = load_rows(out)
    ddpm = [r for r in rows if r["forward"] == "ddpm"]
    assert ddpm and all(r["nll_bpd"] is None and "NLL: failed" in r["note"] for r in ddpm)
    table = (out / "tables.md").read_text()
    assert "**" not in table  # no value, hence no "best"
    with pytest.raises(SystemExit) as exit_:
        eval_cli(cfg)
    assert exit_.value.code == 1 and "failed" in capsys.readouterr().err


# ============================================================================ 4. training never overwrites a run
def train_cfg(run_dir: Path, *overrides: str, data: bool = True):
    """The tiny training config of tests/test_training.py (``data=False``: without its data overrides)."""
    from test_training import TINY, TINY_DATA, make_cfg

    return make_cfg(run_dir, *overrides, base=TINY if data else TINY[len(TINY_DATA):])


def test_train_into_existing_directory(tmp_path):
    run_dir = tmp_path / "run"
    train(train_cfg(run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    stamp = last.stat().st_mtime_ns, last.read_bytes()
    # same config: the finished run is recognised and nothing changes
    summary = train(train_cfg(run_dir))
    assert summary["already_finished"] and summary["global_step"] == 4
    assert (last.stat().st_mtime_ns, last.read_bytes()) == stamp
    # another config: refused, with the difference and the ways out
    with pytest.raises(ConfigError, match=r"(?s)module\.lr.*ckpt_path=.*overwrite=true"):
        train(train_cfg(run_dir, "module.lr=5e-4"))
    assert last.read_bytes() == stamp[1]
    # a longer run continues the same one
    assert train(train_cfg(run_dir, "trainer.max_steps=6"))["global_step"] == 6
    # a last.ckpt damaged by a kill while writing (preemption): the newest readable checkpoint is resumed
    last.write_bytes(b"")
    assert train(train_cfg(run_dir, "trainer.max_steps=8"))["global_step"] == 8
    # overwrite: the old checkpoints are kept aside, a new run starts
    summary = train(train_cfg(run_dir, "module.lr=5e-4", "overwrite=true"))
    assert summary["global_step"] == 4 and list(tmp_path.glob("run/checkpoints.replaced-*/last.ckpt"))


class CrashAt(Callback):
    """Kills training (like a preemption) after ``step`` optimizer steps."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_step >= self.step:
            raise RuntimeError("simulated preemption")


def _kept(run_dir: Path) -> dict[str, int | None]:
    out = {}
    for p in sorted((run_dir / "checkpoints").glob("step*.ckpt")):
        out[p.name] = torch.load(p, map_location="cpu", weights_only=True)["analytic_dpm"]["gamma_step"]
    return out


def test_interrupted_run_resumes_to_the_same_checkpoints_gamma_and_weights(tmp_path):
    steps = ["trainer.max_steps=6", "trainer.limit_train_batches=2"]
    whole = tmp_path / "whole"
    train(train_cfg(whole, *steps))
    cut = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(train_cfg(cut, *steps, "+callbacks.crash._target_=test_trust.CrashAt", "+callbacks.crash.step=3"))
    assert (cut / "checkpoints" / "last.ckpt").is_file()  # written at step 2 (end of the first epoch)
    summary = train(train_cfg(cut, *steps))  # a restart with the original arguments resumes by itself
    assert summary["global_step"] == 6
    assert _kept(cut) == _kept(whole) and len(_kept(whole)) == 3
    a = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for k, v in a["state_dict"].items():
        if k.startswith("ema_model."):
            assert torch.equal(v, b["state_dict"][k]), k
    assert torch.equal(a["analytic_dpm"]["gamma"], b["analytic_dpm"]["gamma"])


# ============================================================================ 5. concurrent writers lose nothing
def _writer(run_dir: str, method: str, n: int) -> None:
    store = ResultStore(run_dir)
    for K in range(1, n + 1):
        store.add({"dataset": "d", "schedule": "linear", "N": 100, "method": method, "trajectory": "even", "K": K,
                   "nll_bpd": float(K)})


def test_two_processes_on_one_store_keep_every_row(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), m, 25)) for m in ("ddpm_beta", "analytic_ddpm")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = load_rows(tmp_path)
    assert len(rows) == 50 and {r["method"] for r in rows} == {"ddpm_beta", "analytic_ddpm"}


def test_two_evaluate_processes_on_one_directory(tmp_path):
    out = tmp_path / "shared"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmds = [[sys.executable, str(ROOT / "evaluate.py"), *ORACLE, f"eval.K=[{k}]", f"hydra.run.dir={out}",
             f"paths.log_dir={tmp_path}/logs"] for k in (2, 3)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    rows = load_rows(out)
    assert sorted({r["K"] for r in rows}) == [2, 3] and len(rows) == 10


# ============================================================================ error matrix
def _ckpt_file(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.ckpt"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "garbage":
        p.write_bytes(os.urandom(256))
    elif kind == "pickle":
        torch.save({"x": _MakesMarker(str(tmp_path / "marker"))}, p)
    return p


EVAL_ERRORS = [
    (["eval.method=[foo]"], "eval.method: unknown value"),
    (["eval.trajectory=[spiral]"], "eval.trajectory: unknown value"),
    (["eval.metrics=[inception_score]"], "eval.metrics: unknown value"),
    (["eval.K=abc"], "eval.K must hold positive integers"),
    (["eval.K=[]"], "eval.K must name at least one value"),
    (["eval.K=10.7"], "eval.K must hold positive integers"),
    (["eval.K=[0]"], "eval.K must hold positive integers"),
    (["eval.K=[2000]"], "outside 1..N"),
    (["eval.nll.num_images=0"], "eval.nll.num_images must be >= 1"),
    (["eval.nll.num_images=-1"], "eval.nll.num_images must be >= 1"),
    (["eval.fid.num_samples=1"], "eval.fid.num_samples must be >= 2"),
    (["eval.calibration.num_samples=0"], "eval.calibration.num_samples must be >= 1"),
    (["eval.nll.decoder=gaussian"], "eval.nll.decoder: unknown value"),
    (["eval.seed=1.5"], "eval.seed must be an integer"),
    (["eval.clip_x0=maybe"], "eval.clip_x0 must be true or false"),
    (["ckpt_path=/nowhere.ckpt"], "not several: ckpt_path and model"),
]
CKPT_ERRORS = [("missing", "checkpoint not found"), ("empty", "is empty"),
               ("garbage", "not a file written by torch.save"), ("pickle", "refusing to unpickle")]


def _expect_exit(capsys, fn, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        fn(*args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("overrides,fragment", EVAL_ERRORS)
def test_evaluate_bad_settings(tmp_path, capsys, overrides, fragment):
    out = tmp_path / "eval"
    err = _expect_exit(capsys, eval_cli, eval_cfg(out, *ORACLE, "eval.K=[2]", *overrides))
    assert f"error: {fragment}" in err or fragment in err, err
    assert nothing_written(out)


@pytest.mark.parametrize("kind,fragment", CKPT_ERRORS)
def test_evaluate_bad_checkpoint_files(tmp_path, capsys, kind, fragment):
    path = _ckpt_file(tmp_path, kind)
    out = tmp_path / "eval"
    err = _expect_exit(capsys, eval_cli, eval_cfg(out, f"ckpt_path={path}", "wandb.mode=disabled"))
    assert fragment in err and "weights_only=False" not in err, err
    assert nothing_written(out) and not (tmp_path / "marker").exists()


def test_evaluate_bad_gamma_data_and_device(tmp_path, capsys, tiny_ckpt):
    out = tmp_path / "eval"
    base = [f"ckpt_path={tiny_ckpt}", "eval.metrics=[nll]", "eval.K=[5]", "wandb.mode=disabled"]
    err = _expect_exit(capsys, eval_cli, eval_cfg(out, *base, "eval.gamma_path=/nowhere.json"))
    assert "no such file" in err
    short = tmp_path / "g.json"
    short.write_text("[0.5, 0.5]")
    assert "length N+1" in _expect_exit(capsys, eval_cli, eval_cfg(out, *base, f"eval.gamma_path={short}"))
    err = _expect_exit(capsys, eval_cli, eval_cfg(out, *base, "data=image_folder", "data.test_dir=/x"))
    assert "data.train_dir is required" in err
    junk = tmp_path / "junk"
    for split in ("train", "test"):
        (junk / split).mkdir(parents=True)
        (junk / split / "a.png").write_bytes(b"this is not a png")
    err = _expect_exit(capsys, eval_cli, eval_cfg(out, *base, "data=image_folder", f"data.train_dir={junk}/train",
                                                  f"data.test_dir={junk}/test", "data.image_size=8",
                                                  "data.channels=1"))
    assert "could not decode image" in err
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _expect_exit(capsys, eval_cli, eval_cfg(out, *base, "eval.device=cuda"))
    assert nothing_written(out)


@pytest.mark.parametrize("kind,fragment", [("empty", "is empty"), ("garbage", "not a file written by torch.save"),
                                           ("pickle", "refusing to unpickle")])
def test_train_resume_from_bad_checkpoint(tmp_path, capsys, kind, fragment):
    path = _ckpt_file(tmp_path, kind)
    run_dir = tmp_path / "run"
    err = _expect_exit(capsys, train_cli, train_cfg(run_dir, f"ckpt_path={path}"))
    assert fragment in err and "weights_only=False" not in err
    assert not (run_dir / "checkpoints").exists()


def test_train_bad_data(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = train_cfg(run_dir, "data=image_folder", "data.test_dir=/x", data=False)
    assert "data.train_dir is required" in _expect_exit(capsys, train_cli, cfg)
    junk = tmp_path / "junk"
    (junk / "train").mkdir(parents=True)
    (junk / "test").mkdir(parents=True)
    for i in range(8):
        (junk / "train" / f"{i}.png").write_bytes(b"not a png")
    (junk / "test" / "0.png").write_bytes(b"not a png")
    cfg = train_cfg(run_dir, "data=image_folder", f"data.train_dir={junk}/train", f"data.test_dir={junk}/test",
                    "data.image_size=8", "data.channels=1", "data.batch_size=4", data=False)
    assert "could not decode image" in _expect_exit(capsys, train_cli, cfg)


def test_calibrate_and_merge_errors(tmp_path, capsys):
    assert calibrate_cli.main(["--ckpt", str(tmp_path / "none.ckpt")]) == 2
    assert "not found" in capsys.readouterr().err
    from analytic_dpm.evaluation.merge import main as merge_main

    (tmp_path / "empty").mkdir()
    assert merge_main([str(tmp_path / "empty")]) == 2
    assert "error: no results" in capsys.readouterr().err


def test_results_files_are_readable_by_others(tmp_path):
    ResultStore(tmp_path).add({"method": "ddim", "trajectory": "even", "K": 2})
    mask = os.umask(0)
    os.umask(mask)
    for name in ("results.csv", "results.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask
