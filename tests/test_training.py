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

from analytic_dpm.accel import CompileFallbackWarning
from analytic_dpm.calibration import GammaCalibrationError, calibrate_gamma, check_calibrated_gamma
from analytic_dpm.training import (
    GammaCalibration,
    LoadedCheckpoint,
    calibrate_checkpoint,
    load_checkpoint,
    train,
)
from analytic_dpm.training import calibrate as calibrate_cli
from analytic_dpm.training.data import StreamBatchSampler
from analytic_dpm.training.module import TrainingDivergedError
from analytic_dpm.training.run import run_cli

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
    gamma, seconds = calibrate_gamma(net, NoiseSchedule.linear(30), dm.train_pool(None), 2, 16, seed=1,
                                     progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert net.training  # mode restored
    gamma2, _ = calibrate_gamma(net, NoiseSchedule.linear(30), dm.train_pool(None), 2, 16, seed=1, progress=False)
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
    # wandb's service may still be writing its transaction log after finish() returns (seen on a loaded machine)
    import time

    deadline = time.monotonic() + 60
    while True:
        blob = next(runs[0].glob("*.wandb")).read_bytes()
        if (b"calib/gamma" in blob and b"calib/nll_K5/analytic_ddpm" in blob) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
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
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)  # really compiled (inductor), no fallback
        summary = run(tmp_path / "compiled", "module.compile=true", "trainer.max_steps=2")
    assert summary["module"]._compiled_forward is not None and summary["module"].compile_seconds > 0
    loaded = load_checkpoint(summary["last_checkpoint"])  # state-dict keys unchanged by compile
    assert loaded.gamma is not None


# ------------------------------------------------------------------------------------------- divergence (issue 7.3)
def _no_ckpt(run_dir: Path) -> bool:
    return not list(run_dir.rglob("*.ckpt"))


@pytest.mark.parametrize("log_every", [1, 50])  # caught at a logging step / at the epoch end
def test_diverging_run_stops_with_a_clear_error(tmp_path, log_every):
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as err:
        run(run_dir, "module.lr=1e6", f"trainer.log_every_n_steps={log_every}")
    msg = str(err.value)
    assert "\n" not in msg and "diverged at step 2" in msg and "exceeds module.max_loss=10000" in msg
    assert "lower learning rate (module.lr=1e+06)" in msg and "gradient_clip_val" in msg
    assert "no checkpoint or Gamma was written" in msg
    assert _no_ckpt(run_dir) and not list(run_dir.rglob("gamma_epoch*.json"))


def test_nan_loss_stops_at_its_step_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    from analytic_dpm.training.module import DiffusionModule

    original = DiffusionModule.diffusion_loss

    def nan_at_step_3(self, x0, forward=None):
        loss = original(self, x0, forward)
        return loss * float("nan") if self.batches_trained == 2 else loss

    monkeypatch.setattr(DiffusionModule, "diffusion_loss", nan_at_step_3)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match="diverged at step 3: the loss was nan, which is not finite"):
        run(run_dir, "trainer.log_every_n_steps=50")
    kept = sorted(p.name for p in run_dir.rglob("*.ckpt"))
    assert kept == ["last.ckpt", "step0000002.ckpt"]  # written after epoch 1 (steps 1-2), before the NaN
    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt").gamma_meta["step"] == 2


def test_bf16_divergence_message_suggests_fp32(tmp_path):
    with pytest.raises(TrainingDivergedError, match=r"fp32 instead of bf16-mixed \(trainer.precision=32-true\)"):
        run(tmp_path / "run", "module.lr=1e6", "trainer.precision=bf16-mixed", "trainer.max_steps=2")


def test_gamma_calibration_refuses_a_non_finite_gamma(tmp_path, monkeypatch):
    from analytic_dpm import calibration

    def broken_gamma(*args, **kwargs):
        g = torch.full((51,), 0.5, dtype=torch.float64)
        g[0], g[7] = 0.0, float("inf")
        return g

    monkeypatch.setattr(calibration, "estimate_gamma", broken_gamma)
    run_dir = tmp_path / "run"
    with pytest.raises(GammaCalibrationError, match=r"Gamma calibration at epoch 0, step 2: Gamma is not finite "
                                                    r"\(NaN or inf\) at 1 of 50 timesteps \(first n=7\)"):
        run(run_dir)
    assert _no_ckpt(run_dir)


def test_calibrate_gamma_names_where_a_network_overflows():
    from analytic_dpm.data import GaussianDataModule
    from analytic_dpm.schedule import NoiseSchedule

    class Exploding(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t):
            return x * 0 + self.value * self.w

    dm = GaussianDataModule(dim_shape=(1, 4, 4), num_train=16, num_test=4, batch_size=4)
    for value in (float("inf"), 1e30):  # a non-finite output; a finite output whose square overflows
        with pytest.raises(GammaCalibrationError, match="at epoch 3, step 40.*diverged"):
            calibrate_gamma(Exploding(value), NoiseSchedule.linear(50), dm.train_pool(None), 1, 16, progress=False,
                            seed=0, where="at epoch 3, step 40")


def test_gamma_above_one_on_most_timesteps_warns(tmp_path, monkeypatch, caplog):
    from analytic_dpm import calibration

    def high_gamma(*args, **kwargs):
        g = torch.full((51,), 1.5, dtype=torch.float64)
        g[0] = 0.0
        return g

    monkeypatch.setattr(calibration, "estimate_gamma", high_gamma)
    with caplog.at_level("WARNING", logger="analytic_dpm.training.calibration"):
        summary = run(tmp_path / "run", "trainer.max_steps=2")
    text = caplog.text
    assert "Gamma calibration at epoch 0, step 2" in text and "exceeds 1 on 100% of the timesteps" in text
    assert "untrained or diverged network" in text and "timestep convention" in text and "[-1, 1]" in text
    assert load_checkpoint(summary["last_checkpoint"]).gamma is not None  # finite: stored, with the warning
    caplog.clear()
    check_calibrated_gamma(torch.cat([torch.zeros(1), torch.full((30,), 0.9), torch.full((20,), 1.01)]))
    assert not caplog.text  # a few large-n values above 1 (Monte-Carlo noise) are normal


# ------------------------------------------------------------------------------------------- speed (issue 9)
class _SyncSpy(torch.overrides.TorchFunctionMode):
    """Records the tensor methods that copy to the host (a device synchronisation on a GPU)."""

    SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
               torch.Tensor.__int__, torch.Tensor.cpu, torch.Tensor.numpy}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


TINY_NET = {"_target_": "analytic_dpm.nets.UNet", "in_channels": 1, "image_size": 8, "base_channels": 32,
            "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [], "dropout": 0.0}


def test_training_step_reads_nothing_back_from_the_device():
    from types import SimpleNamespace

    from analytic_dpm.training import DiffusionModule

    module = DiffusionModule(TINY_NET, N=50, lr=1e-3)
    opt = torch.optim.AdamW(module.eps_model.parameters(), lr=1e-3)
    module._trainer = SimpleNamespace(log_every_n_steps=10, world_size=1, global_rank=0,
                                      _logger_connector=SimpleNamespace(should_update_logs=False))
    batch = torch.randn(4, 1, 8, 8)
    losses = []
    spy = _SyncSpy()  # around the module's own code (torch's AdamW reads its CPU step counters, no device sync)
    for i in range(3):
        with spy:
            loss = module.training_step(batch, i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.eps_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        with spy:
            module.update_ema()
            module.on_train_batch_end(loss, batch, i)  # not a logging step: nothing is read
        losses.append(loss.detach())
    assert spy.calls == [], spy.calls
    mean, count = module._read_window()  # the one read of a window
    assert count == 3 and mean == pytest.approx(float(torch.stack(losses).mean()), rel=1e-6)


def test_loss_is_logged_as_the_window_mean(tmp_path, trained):
    per_step = csv_losses(full_dir(trained))  # logged every step: the step losses
    assert len(per_step) == 4
    run(tmp_path / "w", "trainer.log_every_n_steps=2", "trainer.max_steps=4")
    windowed = csv_losses(tmp_path / "w")
    # logged after steps 2 and 4: the means of steps [1, 2] and [3, 4]
    assert windowed == pytest.approx([(per_step[0] + per_step[1]) / 2, (per_step[2] + per_step[3]) / 2], rel=1e-6)


def test_compile_failure_in_training_falls_back_to_identical_eager(tmp_path, trained, monkeypatch):
    def broken_compile(model, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("inductor: no working C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(CompileFallbackWarning, match="no working C\\+\\+ compiler.*continues eagerly"):
        summary = run(tmp_path / "c", "module.compile=true")
    module = summary["module"]
    assert module._compiled_forward is None and module.compile_seconds is None
    a, b = ema_and_weights(trained[1]["module"]), ema_and_weights(module)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # the failed attempt changed nothing


def test_compiled_training_runs_the_compiled_network(tmp_path, trained, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")  # Dynamo's capture without code generation: fast on a CPU
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counter, dynamic=False))
    summary = run(tmp_path / "c", "module.compile=true", "~callbacks.gamma_calibration")
    module = summary["module"]
    assert counter.frame_count >= 1 and module._compiled_forward is not None and module.compile_seconds > 0
    assert not any(k.startswith("_compiled") for k in module.state_dict())  # keys unchanged
    a, b = ema_and_weights(trained[1]["module"]), ema_and_weights(module)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


def test_compile_option_values():
    from analytic_dpm.training import DiffusionModule

    module = DiffusionModule(TINY_NET, N=50, compile="auto")
    assert module.compile_model == "auto" and not module.compile_enabled()  # auto: off on a CPU
    assert module.hparams["module"]["compile"] == "auto" and module.hparams["module"]["max_loss"] == 1e4
    assert DiffusionModule(TINY_NET, N=50, compile="true").compile_enabled()  # explicit: on anywhere
    with pytest.raises(ValueError, match="module.compile='sometimes'"):
        DiffusionModule(TINY_NET, N=50, compile="sometimes")
    with pytest.raises(ValueError, match="max_loss"):
        DiffusionModule(TINY_NET, N=50, max_loss=0)


# ------------------------------------------------------------------------------------------- fused AdamW (issue 9)
def test_fused_optimizer_option_values():
    from analytic_dpm.training import DiffusionModule

    module = DiffusionModule(TINY_NET, N=50)
    assert module.fused_optimizer == "auto" and not module.fused_optimizer_enabled()  # auto: CUDA only
    assert module.hparams["module"]["fused_optimizer"] == "auto"
    assert DiffusionModule(TINY_NET, N=50, fused_optimizer="true").fused_optimizer_enabled()
    assert not DiffusionModule(TINY_NET, N=50, fused_optimizer=False).fused_optimizer_enabled()
    with pytest.raises(ValueError, match="module.fused_optimizer='often'"):
        DiffusionModule(TINY_NET, N=50, fused_optimizer="often")


def test_fused_optimizer_trains_like_foreach_under_bf16_with_clipping(tmp_path):
    """bf16-mixed with gradient clipping (the GPU experiments' setting): Lightning's mixed-precision plugin refuses
    to clip for a fused optimizer; the module clips itself, and the run matches the multi-tensor AdamW's."""
    common = ("trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0", "trainer.max_steps=2",
              "~callbacks.gamma_calibration")
    fused = run(tmp_path / "fused", "module.fused_optimizer=true", *common)
    foreach = run(tmp_path / "foreach", "module.fused_optimizer=false", *common)
    assert fused["trainer"].optimizers[0].defaults["fused"] is True
    assert not foreach["trainer"].optimizers[0].defaults["fused"]
    a, b = ema_and_weights(fused["module"]), ema_and_weights(foreach["module"])
    assert not all(torch.equal(a[k], b[k]) for k in a)  # two implementations really ran
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fused_optimizer_gradients_are_clipped(algorithm):
    """The module's own clipping of a fused optimizer's gradients equals torch's clip_grad_*_ on the same ones."""
    from analytic_dpm.training import DiffusionModule

    module = DiffusionModule(TINY_NET, N=50, fused_optimizer=True)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    assert opt.defaults["fused"] is True
    gen = torch.Generator().manual_seed(0)
    params = list(module.eps_model.parameters())
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    from lightning.pytorch.utilities import GradClipAlgorithmType

    module.configure_gradient_clipping(opt, 0.05, GradClipAlgorithmType(algorithm))  # what Lightning passes
    reference = [torch.zeros_like(g, requires_grad=True) for g in grads]  # the same gradients, clipped by torch
    for r, g in zip(reference, grads):
        r.grad = g.clone()
    if algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(reference, 0.05)
    else:
        torch.nn.utils.clip_grad_value_(reference, 0.05)
    for p, g, e in zip(params, grads, [r.grad for r in reference]):
        assert not torch.equal(p.grad, g)  # the clipping changed every gradient
        torch.testing.assert_close(p.grad, e, atol=0, rtol=0)


def test_fused_optimizer_refused_with_a_grad_scaler_and_clipping(tmp_path):
    """16-mixed runs a GradScaler: clipping would see scaled gradients, so an explicit fused optimizer is refused
    with what to do (auto simply leaves it off)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from analytic_dpm.training import DiffusionModule

    module = DiffusionModule(TINY_NET, N=50, fused_optimizer=True)
    scaler_plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = type("T", (), {"precision_plugin": scaler_plugin, "gradient_clip_val": 1.0, "precision": "16-mixed"})()
    module._trainer = trainer
    with pytest.raises(ValueError, match="fused_optimizer=true cannot be combined.*16-mixed.*fused_optimizer=auto"):
        module.configure_optimizers()
    auto = DiffusionModule(TINY_NET, N=50, fused_optimizer="auto")
    auto._trainer = trainer
    assert not auto.fused_optimizer_enabled()


def test_resume_may_switch_to_the_fused_optimizer(tmp_path, trained):
    """A checkpoint of the multi-tensor AdamW resumes with the fused one (same optimizer state format): the run
    goes on as the uninterrupted one does, up to float rounding."""
    _, full = trained  # 4 steps, module.fused_optimizer=auto (off on a CPU)
    first = run(tmp_path / "a", "trainer.max_steps=2")
    resumed = run(tmp_path / "b", "trainer.max_steps=4", "module.fused_optimizer=true",
                  f"ckpt_path={first['last_checkpoint']}")
    assert resumed["global_step"] == 4 and resumed["trainer"].optimizers[0].defaults["fused"] is True
    a, b = ema_and_weights(full["module"]), ema_and_weights(resumed["module"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)
