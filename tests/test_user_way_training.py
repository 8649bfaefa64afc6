"""train.py as a user meets it when something goes wrong: a SIGTERM, a checkpoint of another network, a finished
checkpoint, NaN data, no Gamma (issue "the user's way")."""

from __future__ import annotations

import logging

import pytest
import torch
from test_training import ema_and_weights, make_cfg, run

from analytic_dpm.errors import ConfigError
from analytic_dpm.training import train
from analytic_dpm.training.module import TrainingDivergedError
from analytic_dpm.training.run import run_cli

pytestmark = [pytest.mark.filterwarnings("ignore:The dirpath has changed"),
              pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec")]

KILL_AT_3 = ["+callbacks.sigterm_at.step=3", "+callbacks.sigterm_at._target_=signals.SigtermAtStep",
             "trainer.max_steps=6"]


def test_sigterm_stops_promptly_with_a_resumable_checkpoint_and_no_calibration(tmp_path, caplog):
    """SIGTERM after step 3 (mid-epoch: epochs are 2 steps): the run stops after that batch, writes last.ckpt at step
    3, calibrates nothing more, exits 143; the same command then resumes it to exactly the weights and Gamma of a run
    that was never interrupted."""
    cut = tmp_path / "cut"
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as stop:
        run_cli(make_cfg(cut, *KILL_AT_3))
    assert stop.value.code == 143
    last = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3
    assert last["analytic_dpm"]["gamma_step"] == 2  # calibrated at the epoch end of step 2, not after the signal
    assert not list((cut / "gamma").glob("gamma_epoch001*"))
    assert "SIGTERM" in caplog.text and "resume" in caplog.text

    resumed = run(cut, "trainer.max_steps=6")  # the same directory, without the signal: resumes from last.ckpt
    whole = run(tmp_path / "whole", "trainer.max_steps=6")
    assert resumed["global_step"] == whole["global_step"] == 6
    a, b = ema_and_weights(resumed["module"]), ema_and_weights(whole["module"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(resumed["module"].gamma, whole["module"].gamma)


def test_resuming_another_network_or_schedule_is_refused_with_the_differences(tmp_path, tiny_ckpt):
    with pytest.raises(ConfigError, match=r"(?s)another network or noise schedule.*model\.channel_mult"):
        train(make_cfg(tmp_path / "a", f"ckpt_path={tiny_ckpt}", "model=unet_small"))
    with pytest.raises(ConfigError, match=r"diffusion\.N: 50 -> 60"):
        train(make_cfg(tmp_path / "b", f"ckpt_path={tiny_ckpt}", "diffusion.N=60"))
    with pytest.raises(ConfigError, match=r"diffusion\.schedule: 'linear' -> 'cosine'"):
        train(make_cfg(tmp_path / "c", f"ckpt_path={tiny_ckpt}", "diffusion=cosine", "diffusion.N=50"))


def test_a_finished_checkpoint_into_a_new_directory_says_nothing_is_trained(tmp_path, tiny_ckpt, caplog):
    with caplog.at_level(logging.WARNING):
        summary = train(make_cfg(tmp_path / "new", f"ckpt_path={tiny_ckpt}"))
    assert summary.get("already_finished") and summary["global_step"] == 4
    assert f"ckpt_path={tiny_ckpt} is already trained to step 4" in caplog.text
    assert f"nothing is written to {tmp_path / 'new'}" in caplog.text
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_nan_data_is_named_as_the_cause_not_the_weights(tmp_path):
    with pytest.raises(TrainingDivergedError, match=r"training data hold NaN or inf.*not the cause"):
        run(tmp_path / "run", "data._target_=signals.nan_gaussian_data")


def test_a_run_without_gamma_does_not_claim_one(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        summary = run(tmp_path / "run", "~callbacks.gamma_calibration")
    assert summary["module"].gamma is None
    assert "checkpoint with Gamma" not in caplog.text and "no Gamma calibrated" in caplog.text
