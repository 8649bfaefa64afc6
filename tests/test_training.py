"""Training half (issue 3): tiny CPU runs through the real config + train(), checkpoints, resume, Gamma, W&B."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from analytic_dpm.training import (
    GammaCalibration,
    LoadedCheckpoint,
    StreamBatchSampler,
    calibrate_checkpoint,
    calibrate_gamma,
    load_checkpoint,
    run_cli,
    train,
)
from analytic_dpm.training import calibrate as calibrate_cli

pytestmark = [
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),  # each resumed run writes to its own dir
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),  # Lightning vs torch 2.14, not ours
]

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# ~650k-parameter UNet on 1x8x8 Gaussian data, N=50: a step takes a few ms on a CPU.
TINY_DATA = [
    "data=gaussian",
    "data.image_size=8",
    "data.num_train=96",
    "data.num_test=16",
    "data.batch_size=8",
]
TINY = TINY_DATA + [
    "model=unet_tiny",
    "diffusion.N=50",
    "module.lr=1e-3",
    "module.ema_decay=0.9",
    "trainer.accelerator=cpu",
    "trainer.max_steps=4",
    "trainer.limit_train_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.gamma_calibration.num_samples=2",
    "callbacks.gamma_calibration.batch_size=100",
    "callbacks.gamma_calibration.nll_images=4",
    "callbacks.gamma_calibration.nll_K=[5]",
    "callbacks.gamma_calibration.bounds_K=[5]",
    "callbacks.gamma_calibration.plots=false",
    "callbacks.gamma_calibration.progress=false",
]  # the progress-bar callback stays configured: train() drops it when trainer.enable_progress_bar=false


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))


def make_cfg(run_dir: Path, *overrides: str, base: list[str] = TINY):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*base, *overrides])
    with open_dict(cfg):
        cfg.paths.root_dir = str(run_dir.parent)
        cfg.paths.data_dir = str(run_dir.parent / "data")
        cfg.paths.log_dir = str(run_dir.parent / "outputs")
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.work_dir = str(run_dir.parent)
    return cfg


def run(run_dir: Path, *overrides: str) -> dict:
    return train(make_cfg(run_dir, *overrides))


def ema_and_weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def csv_losses(run_dir: Path) -> list[float]:
    files = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    assert files, f"no metrics.csv under {run_dir}"
    out = []
    for f in files:
        with open(f) as fh:
            out += [float(r["train/loss"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    return out


# ------------------------------------------------------------------------------------------- a training run
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 4-step run (2 epochs of 2 batches, Gamma after each) shared by several tests."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    summary = train(make_cfg(run_dir))
    return run_dir, summary


def test_run_writes_checkpoint_with_gamma(trained):
    run_dir, summary = trained
    assert summary["global_step"] == 4
    last = run_dir / "checkpoints" / "last.ckpt"
    assert Path(summary["last_checkpoint"]) == last and last.is_file()
    ckpt = torch.load(last, weights_only=True)  # plain containers + tensors only
    state = ckpt["analytic_dpm"]
    assert state["gamma"].dtype == torch.float64 and state["gamma"].shape == (51,)
    assert state["gamma"][0] == 0 and torch.isfinite(state["gamma"]).all()
    assert (state["gamma_M"], state["gamma_epoch"], state["gamma_step"]) == (2, 1, 4)
    assert (state["schedule"], state["N"]) == ("linear", 50)
    assert state["calibration_seconds"] > 0
    hp = ckpt["hyper_parameters"]
    assert hp["data"]["_target_"].endswith("GaussianDataModule") and hp["model"]["_target_"].endswith("UNet")
    assert hp["model"]["in_channels"] == 1 and hp["diffusion"] == {"schedule": "linear", "N": 50}
    assert (run_dir / "checkpoints" / "step0000002.ckpt").is_file()  # kept every epoch here
    # Gamma JSON per calibration in the run dir
    files = sorted((run_dir / "gamma").glob("gamma_epoch*.json"))
    assert [f.name for f in files] == ["gamma_epoch000.json", "gamma_epoch001.json"]
    rec = json.loads(files[-1].read_text())
    assert rec["step"] == 4 and len(rec["gamma"]) == 51 and "nll_K5/analytic_ddpm" in rec["nll_bpd"]
    # scalars reached the logger
    metrics = (next(run_dir.glob("csv/version_*/metrics.csv"))).read_text()
    for key in ("calib/seconds", "calib/nll_K5/analytic_ddpm", "calib/nll_K5/ddpm_beta", "train/images_per_second"):
        assert key in metrics


def test_load_checkpoint_gives_ema_model(trained):
    run_dir, summary = trained
    loaded = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(loaded, LoadedCheckpoint)
    module = summary["module"]
    assert not loaded.model.training
    ema = module.ema_model.state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert not all(torch.equal(v, module.eps_model.state_dict()[k]) for k, v in ema.items())  # EMA != raw
    assert torch.equal(loaded.gamma, module.gamma)
    assert loaded.gamma_meta["M"] == 2 and loaded.gamma_meta["step"] == 4 and loaded.gamma_meta["weights"] == "ema"
    assert (loaded.gamma_meta["epoch"], loaded.gamma_meta["checkpoint_step"]) == (1, 4)
    assert loaded.schedule.N == 50 and loaded.schedule.name == "linear"
    assert loaded.hparams["data"]["num_train"] == 96
    x = torch.randn(3, 1, 8, 8)
    assert loaded.model(x, torch.tensor([1, 25, 50])).shape == x.shape


def test_load_checkpoint_errors(tmp_path, trained):
    run_dir, _ = trained
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint(tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="missing hyper_parameters"):
        load_checkpoint(other)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["analytic_dpm"]["gamma"] = None
    no_gamma = tmp_path / "no_gamma.ckpt"
    torch.save(ckpt, no_gamma)
    loaded = load_checkpoint(no_gamma)
    assert loaded.gamma is None and "calibrate" in loaded.calibrate_command
    ckpt["analytic_dpm"]["gamma"] = torch.zeros(7, dtype=torch.float64)
    torch.save(ckpt, other)
    with pytest.raises(ValueError, match="gamma has shape"):
        load_checkpoint(other)


def test_calibrate_checkpoint_api_and_cli(tmp_path, trained, capsys):
    run_dir, _ = trained
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["analytic_dpm"]["gamma"] = None
    src = tmp_path / "no_gamma.ckpt"
    torch.save(ckpt, src)
    out = tmp_path / "calibrated.ckpt"
    rc = calibrate_cli.main(["--ckpt", str(src), "--out", str(out), "--num-samples", "3", "--batch-size", "64",
                             "--device", "cpu", "--no-progress"])
    assert rc == 0 and "M=3" in capsys.readouterr().out
    loaded = load_checkpoint(out)
    assert loaded.gamma is not None and loaded.gamma.shape == (51,) and loaded.gamma_meta["M"] == 3
    assert load_checkpoint(src).gamma is None  # the source is untouched with --out
    # Hydra-style arguments, in place
    assert calibrate_cli.main([f"ckpt_path={src}", "num_samples=2", "device=cpu", "--no-progress"]) == 0
    assert load_checkpoint(src).gamma_meta["M"] == 2
    # API with an explicit datamodule
    from analytic_dpm.data import GaussianDataModule

    dm = GaussianDataModule(dim_shape=None, num_train=32, num_test=8, channels=1, image_size=8, batch_size=8)
    res = calibrate_checkpoint(src, out_path=tmp_path / "api.ckpt", num_samples=1, batch_size=50, datamodule=dm,
                               device="cpu", progress=False)
    assert res.gamma.shape == (51,) and res.path == tmp_path / "api.ckpt"
    assert calibrate_cli.main(["--ckpt", str(tmp_path / "missing.ckpt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- exactness
def test_resume_is_exact_at_epoch_boundary(tmp_path, trained):
    _, full = trained  # 4 steps in one go
    first = run(tmp_path / "a", "trainer.max_steps=2")
    assert first["global_step"] == 2
    resumed = run(tmp_path / "b", "trainer.max_steps=4", f"ckpt_path={first['last_checkpoint']}")
    assert resumed["global_step"] == 4
    a, b = ema_and_weights(full["module"]), ema_and_weights(resumed["module"])
    assert a.keys() == b.keys() and any(k.startswith("ema_model.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["module"].ema_updates == resumed["module"].ema_updates == 4
    # the final calibration (same step, same EMA, own seeded generator) is identical too
    assert torch.equal(full["module"].gamma, resumed["module"].gamma)
    # and so are the losses of steps 3 and 4
    assert csv_losses(tmp_path / "b")[-2:] == pytest.approx(csv_losses(full_dir(trained))[-2:], abs=0)


def full_dir(trained) -> Path:
    return trained[0]


def test_resume_is_exact_mid_epoch(tmp_path):
    full = run(tmp_path / "full", "trainer.limit_train_batches=4", "callbacks.gamma_calibration.every_n_epochs=0")
    first = run(tmp_path / "a", "trainer.limit_train_batches=4", "trainer.max_steps=2",
                "callbacks.gamma_calibration.every_n_epochs=0", "logger=none")  # no logger works too
    resumed = run(tmp_path / "b", "trainer.limit_train_batches=4", f"ckpt_path={first['last_checkpoint']}",
                  "callbacks.gamma_calibration.every_n_epochs=0")
    assert resumed["global_step"] == full["global_step"] == 4
    a, b = ema_and_weights(full["module"]), ema_and_weights(resumed["module"])
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_calibration_does_not_touch_training(tmp_path, trained):
    _, with_cb = trained
    without = run(tmp_path / "nocb", "~callbacks.gamma_calibration")
    a, b = ema_and_weights(with_cb["module"]), ema_and_weights(without["module"])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert csv_losses(tmp_path / "nocb") == csv_losses(full_dir(trained))
    assert without["module"].gamma is None


def test_calibrate_gamma_leaves_global_rng_alone():
    from analytic_dpm.data import GaussianDataModule
    from analytic_dpm.nets import UNet
    from analytic_dpm.schedule import NoiseSchedule

    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, base_channels=32, channel_mult=(1,), num_res_blocks=1,
               attention_resolutions=(), dropout=0.1)
    net.train()
    dm = GaussianDataModule(dim_shape=(1, 8, 8), num_train=16, num_test=4, batch_size=4)
    state = torch.random.get_rng_state()
    gamma, seconds = calibrate_gamma(net, NoiseSchedule.linear(30), dm, 2, 16,
                                     generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert net.training  # mode restored
    gamma2, _ = calibrate_gamma(net, NoiseSchedule.linear(30), dm, 2, 16,
                                generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.equal(gamma, gamma2) and gamma.dtype == torch.float64 and seconds >= 0


def test_stream_sampler_order():
    s = StreamBatchSampler(10, 3, seed=7, flip=True)
    assert len(s) == 3
    e0 = torch.cat([s.batch(g)[0] for g in range(3)])
    assert len(set(e0.tolist())) == 9  # a pass without repeats, last partial batch dropped
    assert not torch.equal(torch.cat([s.batch(g)[0] for g in range(3, 6)]), e0)  # next pass reshuffles
    s2 = StreamBatchSampler(10, 3, seed=7, flip=True, start_fn=lambda: 4)
    first = next(iter(s2))
    assert torch.equal(first[0], s.batch(4)[0]) and torch.equal(first[1], s.batch(4)[1])
    r0 = StreamBatchSampler(10, 2, seed=7, rank=0, world_size=2)
    r1 = StreamBatchSampler(10, 2, seed=7, rank=1, world_size=2)
    assert set(r0.batch(0)[0].tolist()).isdisjoint(r1.batch(0)[0].tolist())
    with pytest.raises(ValueError, match="exceeds"):
        StreamBatchSampler(4, 5, seed=0)


# ------------------------------------------------------------------------------------------- W&B
def test_wandb_offline_run_holds_gamma(tmp_path):
    run_dir = tmp_path / "wb"
    summary = run(run_dir, "logger=wandb", "trainer.max_steps=2", "callbacks.gamma_calibration.plots=true")
    import wandb

    assert wandb.run is None  # finished cleanly
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = runs[0] / "files"
    tables = list(files.glob("media/table/calib/gamma_table*.table.json"))
    assert tables, sorted(str(p.relative_to(files)) for p in files.rglob("*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["n", "gamma"] and len(table["data"]) == 50
    assert list(files.glob("media/images/calib/gamma_plot*.png"))
    assert list(files.glob("media/images/calib/variance_bounds*.png"))
    blob = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"calib/gamma" in blob and b"calib/nll_K5/analytic_ddpm" in blob
    assert (run_dir / "gamma" / "gamma_epoch000.png").is_file()
    assert summary["global_step"] == 2


# ------------------------------------------------------------------------------------------- CLI and errors
def test_train_py_subprocess(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "ADPM_DATA_DIR": str(tmp_path / "data")}
    out = tmp_path / "cli"
    args = [*TINY, "trainer.max_steps=2", f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert loaded.gamma is not None and loaded.gamma_meta["step"] == 2
    assert (out / ".hydra" / "config.yaml").is_file()


def test_unknown_dataset_lists_choices(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "data=cifar100"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'data/cifar100'" in proc.stderr and "cifar10" in proc.stderr
    assert "fashion_mnist" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_data_dir_is_a_short_error(tmp_path, capsys):
    base = [o for o in TINY if o not in TINY_DATA]
    cfg = make_cfg(tmp_path / "run", "data=image_folder", f"data.train_dir={tmp_path}/nowhere/train",
                   f"data.test_dir={tmp_path}/nowhere/test", "data.image_size=8", "data.channels=1", base=base)
    with pytest.raises(SystemExit) as exc:
        run_cli(cfg)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "nowhere/train does not exist" in err and "data.train_dir" in err


def test_bad_resume_path_is_a_short_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(make_cfg(tmp_path / "run", f"ckpt_path={tmp_path}/missing.ckpt"))
    assert "missing.ckpt" in capsys.readouterr().err


def test_gamma_callback_validates_arguments():
    with pytest.raises(ValueError):
        GammaCalibration(num_samples=0)


def test_bf16_mixed_and_channels_last(tmp_path):
    summary = run(tmp_path / "bf16", "trainer.precision=bf16-mixed", "module.channels_last=true",
                  "trainer.max_steps=2")
    module = summary["module"]
    assert summary["global_step"] == 2 and torch.isfinite(module.gamma).all()
    assert summary["trainer"].precision == "bf16-mixed"
    for p in module.ema_model.parameters():
        assert p.dtype == torch.float32  # autocast keeps the weights (and the EMA) in float32
    loaded = load_checkpoint(summary["last_checkpoint"])
    assert loaded.gamma is not None and torch.equal(loaded.gamma, module.gamma)


@pytest.mark.slow
def test_torch_compile_run(tmp_path):
    summary = run(tmp_path / "compiled", "module.compile=true", "trainer.max_steps=2")
    loaded = load_checkpoint(summary["last_checkpoint"])  # state-dict keys unchanged by compile
    assert loaded.gamma is not None
