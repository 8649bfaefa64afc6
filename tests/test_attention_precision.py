"""The UNet's self-attention in float32 (default) or in the autocast dtype (issue 9: bf16 attention through SDPA)."""

import pytest
import torch
import torch.nn.functional as F

from analytic_dpm.errors import ConfigError
from analytic_dpm.nets import UNet, attention_in_float32, set_attention_float32
from analytic_dpm.nets.unet import AttentionBlock
from analytic_dpm.training.resume import resolve_resume


def _net(**kw):
    torch.manual_seed(0)
    net = UNet(in_channels=3, image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(8,), dropout=0.0, **kw).eval()
    for m in net.modules():  # zero-initialised output convs would hide the attention from the output
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.05)
    return net


@pytest.fixture
def sdpa_dtypes(monkeypatch):
    """The dtypes of q that reach ``F.scaled_dot_product_attention`` (recorded, then the real call)."""
    seen = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append(q.dtype)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return seen


def test_attention_dtype_under_autocast_follows_the_option(sdpa_dtypes):
    net = _net()
    x, t = torch.randn(4, 3, 16, 16), torch.randint(1, 1001, (4,))
    blocks = sum(isinstance(m, AttentionBlock) for m in net.modules())
    assert attention_in_float32(net) is True and blocks >= 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out32 = net(x, t)
        assert sdpa_dtypes == [torch.float32] * blocks
        sdpa_dtypes.clear()
        assert set_attention_float32(net, False) == blocks and attention_in_float32(net) is False
        out16 = net(x, t)
        assert sdpa_dtypes == [torch.bfloat16] * blocks
    assert out32.dtype == out16.dtype == torch.float32
    # both are bf16 networks: they agree to bf16 rounding (measured on this CPU: identical, since its SDPA kernel
    # accumulates bf16 inputs in float32; a GPU's flash kernel rounds the probabilities to bf16 as well)
    rel = float((out32 - out16).norm() / out32.norm())
    assert rel < 2e-2, rel


def test_without_autocast_both_settings_are_the_same_float32_network():
    a, b = _net(), _net(attention_float32=False)
    assert attention_in_float32(b) is False
    b.load_state_dict(a.state_dict())  # same weights, same keys: a run-time choice, not an architecture
    x, t = torch.randn(4, 3, 16, 16), torch.randint(1, 1001, (4,))
    with torch.no_grad():
        torch.testing.assert_close(a(x, t), b(x, t), rtol=0, atol=0)


def test_networks_without_attention_blocks():
    net = torch.nn.Conv2d(3, 3, 1)
    assert set_attention_float32(net, False) == 0 and attention_in_float32(net) is None


def test_training_module_applies_the_option_to_both_networks():
    from analytic_dpm.training import DiffusionModule

    cfg = {"_target_": "analytic_dpm.nets.UNet", "in_channels": 3, "image_size": 16, "base_channels": 32,
           "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8], "dropout": 0.0}
    module = DiffusionModule(cfg, N=100, attention_float32=False)
    assert attention_in_float32(module.eps_model) is False and attention_in_float32(module.ema_model) is False
    assert module.hparams["module"]["attention_float32"] is False
    assert "attention_float32" not in module.hparams["model"]  # the checkpoint's network is the same either way
    assert attention_in_float32(DiffusionModule(cfg, N=100).eps_model) is True


def _fake_run(run_dir, module_section):
    """A run directory whose last.ckpt records ``module_section`` (what resolve_resume reads)."""
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    hp = {"model": {"base_channels": 32}, "diffusion": {"schedule": "linear", "N": 100}, "data": {"name": "x"},
          "module": module_section, "seed": 0}
    torch.save({"state_dict": {}, "hyper_parameters": hp}, ckpt_dir / "last.ckpt")
    return hp


def test_speed_options_never_refuse_a_resume(tmp_path):
    """A checkpoint written before the speed options existed, or with other values, resumes; lr still refuses."""
    stored = _fake_run(tmp_path / "run", {"lr": 1e-4})
    now = {**stored, "module": {"lr": 1e-4, "compile": "auto", "compile_mode": "reduce-overhead",
                                "channels_last": True, "attention_float32": False, "fused_optimizer": True}}
    path, _ = resolve_resume(now, tmp_path / "run", overwrite=False, seed_given=False)
    assert path == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match=r"module\.lr: 0\.0001 -> 0\.0002"):
        resolve_resume({**now, "module": {**now["module"], "lr": 2e-4}}, tmp_path / "run", overwrite=False,
                       seed_given=False)
    with pytest.raises(ConfigError, match=r"model\.base_channels"):
        resolve_resume({**now, "model": {"base_channels": 64}}, tmp_path / "run", overwrite=False, seed_given=False)


# ------------------------------------------------------------------------------ evaluation: eval.attention_float32
def test_eval_attention_setting_is_recorded_and_changes_the_identity(tmp_path, tiny_ckpt):
    """bf16 with bf16 attention is recorded as precision ``bf16-attn`` (its own ids: never mixed with ``bf16``);
    without autocast the option changes nothing and is not recorded."""
    from test_evaluate import _cfg

    from analytic_dpm.evaluation.run import evaluate
    from analytic_dpm.evaluation.settings import EvalSettings, SettingsError

    grid = [f"ckpt_path={tiny_ckpt}", "eval.K=[5]", "eval.trajectory=[even]", "eval.method=[analytic_ddpm]",
            "eval.metrics=[nll]", "eval.nll.num_images=4", "wandb.mode=disabled"]
    rows = {}
    for label, extra in {"fp32": [], "fp32, attention bf16": ["eval.attention_float32=false"],
                         "bf16": ["eval.precision=bf16"],
                         "bf16, attention float32": ["eval.precision=bf16", "eval.attention_float32=true"],
                         "bf16, attention bf16": ["eval.precision=bf16", "eval.attention_float32=false"]}.items():
        (row,) = evaluate(_cfg(tmp_path / label.replace(", ", "_").replace(" ", "-"), *grid, *extra))
        rows[label] = row
    assert rows["fp32"]["precision"] == rows["fp32, attention bf16"]["precision"] == "fp32"
    assert rows["fp32"]["nll_id"] == rows["fp32, attention bf16"]["nll_id"]
    assert rows["fp32"]["nll_bpd"] == rows["fp32, attention bf16"]["nll_bpd"]
    assert rows["bf16"]["precision"] == rows["bf16, attention float32"]["precision"] == "bf16"
    assert rows["bf16"]["nll_id"] == rows["bf16, attention float32"]["nll_id"]
    assert rows["bf16, attention bf16"]["precision"] == "bf16-attn"
    assert rows["bf16, attention bf16"]["nll_id"] != rows["bf16"]["nll_id"]
    assert abs(rows["bf16, attention bf16"]["nll_bpd"] - rows["fp32"]["nll_bpd"]) < 0.01
    with pytest.raises(SettingsError, match="eval.attention_float32 must be true or false"):
        EvalSettings.from_config({"K": [5], "trajectory": ["even"], "method": ["ddim"],
                                  "attention_float32": "maybe"})


def test_calibration_runs_at_the_requested_precision(tmp_path, tiny_ckpt, capsys):
    """The calibrate API and CLI take precision (and --autocast bf16 as its older spelling); the checkpoint records
    it; bf16 moves Gamma only slightly."""
    from analytic_dpm.training import calibrate as calibrate_cli
    from analytic_dpm.training import calibrate_checkpoint

    out = {}
    for precision in ("fp32", "bf16"):
        res = calibrate_checkpoint(tiny_ckpt, out_path=tmp_path / f"{precision}.ckpt", num_samples=2, batch_size=50,
                                   device="cpu", precision=precision, progress=False)
        state = torch.load(res.path, map_location="cpu", weights_only=True)["analytic_dpm"]
        assert state["gamma_precision"] == precision
        out[precision] = res.gamma
    assert not torch.equal(out["fp32"], out["bf16"])  # autocast reached the network
    torch.testing.assert_close(out["bf16"][1:], out["fp32"][1:], rtol=0.1, atol=1e-3)
    with pytest.raises(ValueError, match="disagree"):
        calibrate_checkpoint(tiny_ckpt, out_path=tmp_path / "x.ckpt", num_samples=1, device="cpu", autocast="bf16",
                             precision="tf32", progress=False)
    args = ["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "cli.ckpt"), "-M", "2", "--batch-size", "50",
            "--device", "cpu", "--no-progress"]
    assert calibrate_cli.main([*args, "--autocast", "bf16"]) == 0
    state = torch.load(tmp_path / "cli.ckpt", map_location="cpu", weights_only=True)["analytic_dpm"]
    assert state["gamma_precision"] == "bf16"
    torch.testing.assert_close(state["gamma"], out["bf16"], rtol=0, atol=0)  # same seed, same precision
    with pytest.raises(SystemExit):
        calibrate_cli.main([*args, "--autocast", "bf16", "--precision", "fp32"])
    assert "disagree" in capsys.readouterr().err
