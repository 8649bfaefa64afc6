"""Every Hydra config of the training half composes, with the values the experiments promise (issue 3)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ["data", "model", "diffusion", "trainer", "callbacks", "logger", "experiment", "debug", "launcher"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def cfg_of(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def test_every_group_has_options():
    for g in GROUPS:
        assert options(g), g
    assert {"quickstart", "cifar10_ls", "cifar10_cs", "celeba64", "imagenet64"} <= set(options("experiment"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for opt in options(group):
        cfg = cfg_of(f"{group}={opt}")
        assert cfg.data._target_.startswith("analytic_dpm.data.")
        assert cfg.model.get("_target_") == "analytic_dpm.nets.UNet" or "oracle" in cfg.model  # oracles: eval only
        assert cfg.diffusion.schedule in ("linear", "cosine") and cfg.diffusion.N >= 1
        assert cfg.module._target_ == "analytic_dpm.training.DiffusionModule"


def test_default_is_the_offline_quickstart():
    cfg = cfg_of()
    assert cfg.task_name == "train" and cfg.seed is not None and cfg.ckpt_path is None
    assert cfg.data._target_.endswith("FashionMNISTDataModule") and cfg.data.image_size == 28
    assert cfg.model.base_channels == 32 and list(cfg.model.channel_mult) == [1, 2, 2]  # unet_small
    assert (cfg.diffusion.schedule, cfg.diffusion.N) == ("linear", 1000)
    assert 64 <= cfg.data.batch_size <= 128 and 100 <= cfg.trainer.max_steps <= 1000
    assert cfg.trainer.limit_train_batches == cfg.trainer.max_steps  # one epoch: calibration at the end
    assert 10 <= cfg.callbacks.gamma_calibration.num_samples <= 20
    assert cfg.logger.wandb.offline is True
    assert OmegaConf.to_container(cfg.logger.wandb)["save_dir"] == "${paths.output_dir}"
    assert cfg == cfg_of("experiment=quickstart")


def test_paper_experiments():
    ls = cfg_of("experiment=cifar10_ls")
    assert ls.model.num_res_blocks == 3 and ls.model.dropout == 0.3 and list(ls.model.attention_resolutions) == [16, 8]
    assert (ls.diffusion.schedule, ls.diffusion.N) == ("linear", 1000)
    assert ls.data._target_.endswith("CIFAR10DataModule") and ls.data.batch_size == 128
    assert (ls.module.lr, ls.module.ema_decay, ls.trainer.max_steps) == (1e-4, 0.9999, 500_000)
    assert ls.trainer.precision == "bf16-mixed"
    with torch.device("meta"):
        net = instantiate(ls.model)
    assert sum(p.numel() for p in net.parameters()) == 52_542_979
    cs = cfg_of("experiment=cifar10_cs")
    assert (cs.diffusion.schedule, cs.diffusion.N) == ("cosine", 1000) and cs.model == ls.model
    assert cs.module == ls.module and cs.trainer.max_steps == ls.trainer.max_steps
    im = cfg_of("experiment=imagenet64")
    assert (im.diffusion.schedule, im.diffusion.N) == ("cosine", 4000)
    assert im.model.channel_mult == [1, 2, 3, 4] and im.data.image_size == 64
    ce = cfg_of("experiment=celeba64")
    assert ce.data._target_.endswith("CelebA64DataModule") and ce.model.channel_mult == [1, 2, 2, 2, 4]
    # experiment values stay overridable from the command line
    cpu = cfg_of("experiment=cifar10_ls", "trainer=cpu", "trainer.max_steps=5")
    assert cpu.trainer.accelerator == "cpu" and cpu.trainer.max_steps == 5 and cpu.model == ls.model


def test_experiment_files_are_global_deltas():
    for name in options("experiment"):
        text = (CONF / "experiment" / f"{name}.yaml").read_text()
        assert "# @package _global_" in text, name


def test_paths_and_hydra_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("ADPM_ROOT", str(tmp_path))
    monkeypatch.delenv("ADPM_DATA_DIR", raising=False)
    cfg = cfg_of(hydra=True)
    HydraConfig.instance().set_config(cfg)
    assert cfg.paths.root_dir == str(tmp_path) and cfg.paths.data_dir == f"{tmp_path}/data"
    assert cfg.paths.log_dir == f"{tmp_path}/outputs"
    assert cfg.hydra.run.dir.startswith(f"{tmp_path}/outputs/train/")
    assert cfg.hydra.sweep.dir.startswith(f"{tmp_path}/outputs/train/multirun/")
    assert OmegaConf.to_container(cfg.paths)["output_dir"] == "${hydra:runtime.output_dir}"
    monkeypatch.setenv("ADPM_DATA_DIR", "/datasets")
    assert cfg_of().paths.data_dir == "/datasets"
    assert cfg.callbacks.model_checkpoint.save_last is True
    assert OmegaConf.to_container(cfg.callbacks.model_checkpoint)["dirpath"] == "${paths.output_dir}/checkpoints"


@pytest.mark.parametrize("config_name", ["train", "evaluate"])
@pytest.mark.parametrize("adpm_root", [True, False])
def test_sweep_dir_resolves_before_any_job(monkeypatch, tmp_path, config_name, adpm_root):
    """A multirun resolves hydra.sweep.dir on the launching process, before any job installs HydraConfig (issue 16).

    paths.root_dir is ``${oc.env:ADPM_ROOT,${hydra:runtime.cwd}}``: OmegaConf evaluates the default branch even when
    ADPM_ROOT is set, so without the SweepHydraConfig callback (on_multirun_start) this raises "HydraConfig was not
    set". With it: <root>/outputs/<task>/multirun/<date>_<time>, root = ADPM_ROOT, else the launch directory.
    """
    from analytic_dpm.hydra_callbacks import SweepHydraConfig

    if adpm_root:
        monkeypatch.setenv("ADPM_ROOT", str(tmp_path))
    else:
        monkeypatch.delenv("ADPM_ROOT", raising=False)
        monkeypatch.chdir(tmp_path)  # hydra.runtime.cwd is the directory the config is composed in
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, return_hydra_config=True)
    callbacks = {c._target_ for c in cfg.hydra.callbacks.values()}
    assert callbacks == {"analytic_dpm.hydra_callbacks.SweepHydraConfig"}
    hydra_config = HydraConfig.instance()
    saved, hydra_config.cfg = hydra_config.cfg, None  # as on the launching process of a multirun
    try:
        with pytest.raises(Exception, match="HydraConfig was not set"):
            _ = cfg.hydra.sweep.dir
        callback = SweepHydraConfig()
        callback.on_multirun_start(config=cfg)
        sweep_dir = Path(cfg.hydra.sweep.dir)
        assert sweep_dir.parent == tmp_path / "outputs" / cfg.task_name / "multirun"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}", sweep_dir.name), sweep_dir
        assert cfg.paths.log_dir == f"{tmp_path}/outputs"
        callback.on_multirun_end(config=cfg)
        assert hydra_config.cfg is None  # what it was before the multirun
    finally:
        hydra_config.cfg = saved


def test_trainer_ddp_and_slurm_launcher():
    ddp = cfg_of("trainer=ddp")
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.devices >= 2 and ddp.trainer.num_nodes == 1
    assert ddp.trainer.use_distributed_sampler is False
    cfg = cfg_of("launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == launcher.tasks_per_node == 4
    assert launcher.timeout_min > 0
    HydraConfig.instance().set_config(cfg)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2


def test_loggers_callbacks_trainer_instantiate(tmp_path):
    cfg = cfg_of("logger=many_loggers", "trainer=cpu", "debug=limit")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    assert cfg.trainer.max_steps == 6 and cfg.logger.csv.save_dir == str(tmp_path)
    callbacks = {k: instantiate(v) for k, v in cfg.callbacks.items()}
    assert type(callbacks["gamma_calibration"]).__name__ == "GammaCalibration"
    assert callbacks["model_checkpoint"].dirpath == str(tmp_path / "checkpoints")
    wandb_logger = instantiate(cfg.logger.wandb)  # lazy: no run is started
    assert wandb_logger._offline is True
    trainer = instantiate(cfg.trainer, callbacks=list(callbacks.values()), logger=False)
    assert trainer.max_steps == 6 and trainer.gradient_clip_val == 1.0
    fdr = cfg_of("debug=fdr")
    assert fdr.trainer.fast_dev_run is True and fdr.logger.keys() == {"csv"}


def test_unknown_option_error_lists_choices():
    with pytest.raises(MissingConfigException) as exc:
        cfg_of("data=cifar100")
    msg = str(exc.value)
    assert "data/cifar100" in msg and "cifar10" in msg and "fashion_mnist" in msg
    with pytest.raises(MissingConfigException, match="unet_small"):
        cfg_of("model=unet_huge")
