"""The ``diffusers`` pretrained kind: tiny random-weight UNet2DModels written by diffusers itself at test time.

Ground truth is diffusers: its UNet called with t - 1, its schedulers' betas, and its DDPM / DDIM samplers.
"""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from analytic_dpm import make_trajectory, pretrained, sample
from analytic_dpm.pretrained import PretrainedError, file_sha256
from analytic_dpm.pretrained import diffusers_format as dformat

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

N = 100  # a short chain keeps the end-to-end runs fast; the betas tests also use N = 1000
SCHED_KW = dict(num_train_timesteps=N, beta_start=1e-3, beta_end=0.05)  # abar_N ~ 0.08: real noise at t = N


def tiny_unet(seed=0, out_channels=3, **kw) -> UNet2DModel:
    """8x8, channels (32, 64), one attention level; default init plus N(0, 0.02^2) on every weight (none zero)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, **kw,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return unet.eval()


def write(path, unet, scheduler, layout="pipeline", safe=True):
    """Save as diffusers does: a DDPMPipeline directory (unet/, scheduler/) or one flat directory."""
    if layout == "pipeline":
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=safe)
    else:
        unet.save_pretrained(path, safe_serialization=safe)
        scheduler.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    """These nets are tiny: one thread is faster, and far faster on a busy machine, than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def pipeline_dir(unet, tmp_path_factory):
    return write(tmp_path_factory.mktemp("pipe"), unet, DDPMScheduler(**SCHED_KW))


def _x_t(seed=0, n=3):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("layout", ["pipeline", "flat"])
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_load_layouts_eps_model_is_unet_at_t_minus_1(unet, tmp_path, layout, safe):
    write(tmp_path, unet, DDPMScheduler(**SCHED_KW), layout, safe)
    m = pretrained.load("diffusers", tmp_path)
    x, t = _x_t(), torch.tensor([1, 50, N])
    with torch.no_grad():
        got, want = m.eps_model(x, t), unet(x, t - 1).sample
    assert torch.equal(got, want)
    assert not torch.equal(got, unet(x, t).sample)  # the shift matters: t itself gives another output
    assert (m.image_size, m.channels, m.kind, m.timestep_convention) == (8, 3, "diffusers", "t - 1")
    assert not m.eps_model.training
    weights = "diffusion_pytorch_model." + ("safetensors" if safe else "bin")
    weights = ("unet/" if layout == "pipeline" else "") + weights
    assert m.identity["weights_file"] == weights
    assert m.identity["weights_sha256"] == file_sha256(tmp_path / weights)
    assert m.identity["scheduler"]["beta_schedule"] == "linear"
    assert m.identity["unet_config_sha256"].startswith("sha256:")
    assert m.options["use_safetensors"] is safe
    torch.testing.assert_close(m.schedule.betas[1:], torch.linspace(1e-3, 0.05, N, dtype=torch.float64),
                               rtol=0, atol=1e-15)


def test_scalar_t_broadcasts_and_eval_mode_on_device(pipeline_dir, unet):
    m = pretrained.load("diffusers", str(pipeline_dir), device="cpu")
    x = _x_t()
    with torch.no_grad():
        assert torch.equal(m.eps_model(x, torch.tensor(7)), unet(x, torch.full((3,), 6)).sample)
    assert all(p.device.type == "cpu" for p in m.eps_model.parameters())


def test_identity_changes_with_the_weights(tmp_path, pipeline_dir):
    other = write(tmp_path, tiny_unet(seed=5), DDPMScheduler(**SCHED_KW))
    a, b = pretrained.load("diffusers", pipeline_dir), pretrained.load("diffusers", other)
    assert a.identity["weights_sha256"] != b.identity["weights_sha256"]
    assert a.identity["unet_config_sha256"] == b.identity["unet_config_sha256"]
    assert a.identity["betas_sha256"] == b.identity["betas_sha256"]


def _legacy_state_dict(unet):
    """The old (diffusers <= 0.x) attention layout: query / key / value / proj_attn instead of to_q / ... / to_out.0."""
    rename = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for k, v in unet.state_dict().items():
        for new, old in rename.items():
            k = k.replace(new, old)
        out[k] = v.clone()
    return out


def test_legacy_hub_layout_old_attention_keys_and_root_scheduler_config(unet, tmp_path):
    # an old Hub commit: unet/ with the pre-rename attention keys in a .bin, scheduler config only at the root
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**SCHED_KW)).save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "scheduler")
    DDPMScheduler(**SCHED_KW).save_pretrained(tmp_path)  # -> tmp_path/scheduler_config.json
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    legacy = _legacy_state_dict(unet)
    assert any(".query." in k for k in legacy) and not any(".to_q." in k for k in legacy)
    torch.save(legacy, tmp_path / "unet" / "diffusion_pytorch_model.bin")
    m = pretrained.load("diffusers", tmp_path)
    x, t = _x_t(1), torch.tensor([3, 30, 99])
    with torch.no_grad():
        assert torch.equal(m.eps_model(x, t), unet(x, t - 1).sample)
    assert m.identity["scheduler_config_file"] == "scheduler_config.json"


def test_scheduler_subfolder_preferred_over_legacy_root_config(pipeline_dir, tmp_path):
    shutil.copytree(pipeline_dir, tmp_path, dirs_exist_ok=True)
    DDPMScheduler(num_train_timesteps=N, beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path)  # root
    m = pretrained.load("diffusers", tmp_path)
    assert m.identity["scheduler_config_file"] == "scheduler/scheduler_config.json"
    assert m.identity["scheduler"]["beta_schedule"] == "linear"


def test_learned_variance_net_keeps_the_first_C_channels(tmp_path):
    net = tiny_unet(out_channels=6)
    write(tmp_path, net, DDPMScheduler(variance_type="learned_range", **SCHED_KW))
    m = pretrained.load("diffusers", tmp_path)
    x, t = _x_t(), torch.tensor([2, 20, 90])
    with torch.no_grad():
        out = net(x, t - 1).sample
        assert out.shape[1] == 6
        assert torch.equal(m.eps_model(x, t), out[:, :3])


# ------------------------------------------------------------------------------------------------ betas
def _reference_betas(kind, n, start, end):
    """The formulas in float64 NumPy (diffusers' definitions, written independently of the module under test)."""
    i = np.arange(n + 1) / n
    if kind == "linear":
        return np.linspace(start, end, n)
    if kind == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n) ** 2
    if kind == "squaredcos_cap_v2":
        f = np.cos((i + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.minimum(1 - f[1:] / f[:-1], 0.999)
    if kind == "sigmoid":
        return 1 / (1 + np.exp(-np.linspace(-6, 6, n))) * (end - start) + start
    if kind == "laplace":
        lmb = -0.5 * np.sign(0.5 - i) * np.log(1 - 2 * np.abs(0.5 - i) + 1e-6)
        lmb[i == 0.5] = -0.5 * np.log(1 + 1e-6)  # copysign(1, +0.0) = +1 where np.sign gives 0
        snr = np.exp(lmb)
        f = np.sqrt(snr / (1 + snr))
        return np.minimum(1 - f[1:] / f[:-1], 0.999)
    raise AssertionError(kind)


@pytest.mark.parametrize("n", [1000, 100])
@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"])
def test_betas_float64_formula_and_diffusers_float32(kind, n):
    start, end = (0.00085, 0.012) if kind == "scaled_linear" else (1e-4, 0.02)
    cfg = {"num_train_timesteps": n, "beta_schedule": kind, "beta_start": start, "beta_end": end}
    ours = dformat.schedule_from_config(cfg).betas[1:]
    assert ours.dtype == torch.float64 and ours.numel() == n
    np.testing.assert_allclose(ours.numpy(), _reference_betas(kind, n, start, end), rtol=0, atol=1e-10)
    theirs = DDPMScheduler(**cfg).betas  # float32
    assert theirs.dtype == torch.float32
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=0)
    if kind == "linear":  # diffusers' linear is NOT scaled by 1000/N (our NoiseSchedule.linear is)
        assert ours[-1].item() == pytest.approx(0.02, abs=1e-15)


def test_trained_betas_are_used_exactly_and_override_the_schedule():
    betas = np.linspace(1e-4, 0.05, 40) ** 1.5
    cfg = {"num_train_timesteps": 40, "beta_schedule": "squaredcos_cap_v2", "trained_betas": betas.tolist()}
    ours = dformat.schedule_from_config(cfg).betas[1:]
    assert torch.equal(ours, torch.tensor(betas, dtype=torch.float64))
    torch.testing.assert_close(ours.float(), DDPMScheduler(**cfg).betas, rtol=1e-6, atol=0)


def test_missing_scheduler_keys_take_diffusers_defaults():
    ours = dformat.betas_from_config({"beta_schedule": "linear"})
    torch.testing.assert_close(ours.float(), DDPMScheduler().betas, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------ end to end
def _final_images(x):
    return (x / 2 + 0.5).clamp(0, 1)  # the pipelines' output_type="pt" conversion


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_beta_tilde_reproduces_diffusers_ddpm_fixed_small(pipeline_dir, unet, spacing):
    """diffusers' DDPMScheduler (fixed_small, clip_sample) == our sample(ddpm_beta_tilde) on their timesteps.

    Same noise: both draw x_T and then one N(0, I) per step but the last from one CPU generator with the same seed.
    Tolerance 2e-5 (measured 7e-7 .. 3e-6 here): diffusers keeps betas and abar in float32 (abar's relative error
    grows to ~1e-6 over 100 products and 1/sqrt(abar_t) amplifies it in x0hat), we use float64 coefficients; both
    run the network and the updates in float32 on O(1) images.
    """
    K = 10
    sched = DDPMScheduler(variance_type="fixed_small", clip_sample=True, timestep_spacing=spacing, **SCHED_KW)
    sched.set_timesteps(K)
    taus = make_trajectory(sorted(int(t) + 1 for t in sched.timesteps), N)  # their timesteps, our convention
    theirs = DDPMPipeline(unet=unet, scheduler=sched)(
        batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=K, output_type="pt").images
    m = pretrained.load("diffusers", pipeline_dir)
    ours = sample(m.eps_model, m.schedule, taus, "ddpm_beta_tilde", (4, 3, 8, 8),
                  generator=torch.Generator().manual_seed(0))
    ours = _final_images(ours)
    diff = (ours - theirs).abs().max().item()
    assert diff < 2e-5, diff
    assert 0.05 < theirs.std().item()  # not a trivially constant image


@pytest.mark.parametrize("steps_offset", [0, 1])
def test_ddim_reproduces_diffusers_ddim_eta0(pipeline_dir, unet, steps_offset):
    """diffusers' DDIMScheduler (eta 0, clip_sample, set_alpha_to_one) == our sample(ddim) from the same x_T."""
    K = 10
    sched = DDIMScheduler(clip_sample=True, set_alpha_to_one=True, steps_offset=steps_offset, **SCHED_KW)
    sched.set_timesteps(K)
    taus = make_trajectory(sorted(int(t) + 1 for t in sched.timesteps), N)
    assert taus[0] == 1 + steps_offset and len(taus) == K
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    m = pretrained.load("diffusers", pipeline_dir)
    ours = sample(m.eps_model, m.schedule, taus, "ddim", (4, 3, 8, 8), x_T=x_T)
    diff = (ours - x).abs().max().item()
    assert diff < 2e-5, diff  # float32 alphas_cumprod in diffusers (see the DDPM test)
    # and their pipeline agrees too (it draws x_T from the generator, as we do without x_T)
    pipe = DDIMPipeline(unet=unet, scheduler=sched)(batch_size=2, generator=torch.Generator().manual_seed(1),
                                                    num_inference_steps=K, eta=0.0, output_type="pt").images
    ours = sample(m.eps_model, m.schedule, taus, "ddim", (2, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    assert (_final_images(ours) - pipe).abs().max().item() < 2e-5


def test_wrong_convention_would_be_caught(pipeline_dir, unet):
    """Feeding t instead of t - 1 changes the samples far beyond the tolerance used above (the tests can fail)."""
    K = 10
    sched = DDIMScheduler(clip_sample=True, **SCHED_KW)
    sched.set_timesteps(K)
    taus = make_trajectory(sorted(int(t) + 1 for t in sched.timesteps), N)
    m = pretrained.load("diffusers", pipeline_dir)
    x_T = _x_t(4, 2)
    good = sample(m.eps_model, m.schedule, taus, "ddim", (2, 3, 8, 8), x_T=x_T)
    m.eps_model.t_offset = 0
    bad = sample(m.eps_model, m.schedule, taus, "ddim", (2, 3, 8, 8), x_T=x_T)
    assert (good - bad).abs().max().item() > 1e-3


# ------------------------------------------------------------------------------------------------ refusals
def _edit_json(path, **changes):
    import json

    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _copy(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


@pytest.mark.parametrize("prediction, fragment", [("sample", "x0-predicting"), ("v_prediction", "v-predicting")])
def test_refuses_non_epsilon_prediction(pipeline_dir, tmp_path, prediction, fragment):
    d = _copy(pipeline_dir, tmp_path)
    _edit_json(d / "scheduler" / "scheduler_config.json", prediction_type=prediction)
    with pytest.raises(PretrainedError, match=fragment):
        pretrained.load("diffusers", d)


@pytest.mark.parametrize("change", [{"num_class_embeds": 10}, {"class_embed_type": "timestep"}])
def test_refuses_class_conditional(pipeline_dir, tmp_path, change):
    d = _copy(pipeline_dir, tmp_path)
    _edit_json(d / "unet" / "config.json", **change)
    with pytest.raises(PretrainedError, match="class-conditional"):
        pretrained.load("diffusers", d)


def test_refuses_conditional_unet(pipeline_dir, tmp_path):
    d = _copy(pipeline_dir, tmp_path)
    _edit_json(d / "unet" / "config.json", _class_name="UNet2DConditionModel", cross_attention_dim=32)
    with pytest.raises(PretrainedError, match="conditional UNet"):
        pretrained.load("diffusers", d)


def test_refuses_other_model_classes(pipeline_dir, tmp_path):
    d = _copy(pipeline_dir, tmp_path)
    _edit_json(d / "unet" / "config.json", _class_name="UNet1DModel")
    with pytest.raises(PretrainedError, match="only diffusers UNet2DModel"):
        pretrained.load("diffusers", d)


def test_refuses_continuous_time_score_sde(pipeline_dir, tmp_path):
    d = _copy(pipeline_dir, tmp_path)
    shutil.rmtree(d / "scheduler")
    diffusers.ScoreSdeVeScheduler(num_train_timesteps=N).save_pretrained(d / "scheduler")
    with pytest.raises(PretrainedError, match="continuous-time"):
        pretrained.load("diffusers", d)
    d2 = _copy(pipeline_dir, tmp_path / "fourier")
    _edit_json(d2 / "unet" / "config.json", time_embedding_type="fourier")
    with pytest.raises(PretrainedError, match="Fourier"):
        pretrained.load("diffusers", d2)


def test_refuses_scheduler_without_betas(pipeline_dir, tmp_path):
    d = _copy(pipeline_dir, tmp_path)
    no_betas = '{"_class_name": "OtherScheduler", "num_train_timesteps": 9}'
    (d / "scheduler" / "scheduler_config.json").write_text(no_betas)
    with pytest.raises(PretrainedError, match="no beta schedule"):
        pretrained.load("diffusers", d)


def test_refuses_unknown_beta_schedule_and_zero_snr(pipeline_dir, tmp_path):
    d = _copy(pipeline_dir, tmp_path)
    _edit_json(d / "scheduler" / "scheduler_config.json", beta_schedule="exotic")
    with pytest.raises(PretrainedError, match="unknown beta_schedule 'exotic'"):
        pretrained.load("diffusers", d)
    _edit_json(d / "scheduler" / "scheduler_config.json", beta_schedule="linear", rescale_betas_zero_snr=True)
    with pytest.raises(PretrainedError, match="zero terminal SNR"):
        pretrained.load("diffusers", d)
    with pytest.raises(PretrainedError, match="trained_betas has 3 values"):
        dformat.betas_from_config({"num_train_timesteps": 4, "trained_betas": [0.1, 0.2, 0.3]})


def test_refuses_latent_pipelines(pipeline_dir, tmp_path):
    d = _copy(pipeline_dir, tmp_path)
    _edit_json(d / "model_index.json", vqvae=["diffusers", "VQModel"])
    with pytest.raises(PretrainedError, match="latent diffusion"):
        pretrained.load("diffusers", d)


def test_refuses_2C_outputs_without_a_learned_variance_and_non_square(pipeline_dir, tmp_path):
    d = _copy(pipeline_dir, tmp_path)
    _edit_json(d / "unet" / "config.json", out_channels=6)
    with pytest.raises(PretrainedError, match="variance_type learned"):
        pretrained.load("diffusers", d)
    _edit_json(d / "unet" / "config.json", out_channels=3, sample_size=[8, 16])
    with pytest.raises(PretrainedError, match="square"):
        pretrained.load("diffusers", d)


def test_missing_files_say_what_is_expected(pipeline_dir, tmp_path):
    with pytest.raises(PretrainedError, match="no such directory"):
        pretrained.load("diffusers", tmp_path / "nowhere" / "deeper" / "still")
    d = _copy(pipeline_dir, tmp_path / "a")
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(PretrainedError, match="no UNet weights"):
        pretrained.load("diffusers", d)
    d = _copy(pipeline_dir, tmp_path / "b")
    shutil.rmtree(d / "scheduler")
    with pytest.raises(PretrainedError, match="no scheduler config"):
        pretrained.load("diffusers", d)
    d = _copy(pipeline_dir, tmp_path / "c")
    (d / "unet" / "config.json").unlink()
    with pytest.raises(PretrainedError, match="holds no UNet config"):
        pretrained.load("diffusers", d)
    with pytest.raises(PretrainedError, match="is a file"):
        pretrained.load("diffusers", pipeline_dir / "model_index.json")
    d = _copy(pipeline_dir, tmp_path / "e")
    with pytest.raises(PretrainedError, match="no UNet weights.*diffusion_pytorch_model.bin"):
        pretrained.load("diffusers", d, use_safetensors=False)
    (d / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    with pytest.raises(PretrainedError, match="sharded"):
        pretrained.load("diffusers", d)


def test_weights_that_do_not_match_the_config_name_the_keys(unet, pipeline_dir, tmp_path):
    d = _copy(pipeline_dir, tmp_path)
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    sd = dict(unet.state_dict())
    sd.pop("conv_out.bias")
    torch.save(sd, d / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(PretrainedError, match="missing_keys.*conv_out.bias"):
        pretrained.load("diffusers", d)
    sd["conv_out.bias"] = torch.zeros(5)
    torch.save(sd, d / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(PretrainedError, match="conv_out.bias"):
        pretrained.load("diffusers", d)


_RAN = []


def _payload():  # what a malicious pickle would run; weights_only must refuse to call it
    _RAN.append(True)
    return {}


class _Evil:
    def __reduce__(self):
        return (_payload, ())


def test_bin_with_pickled_code_is_refused_without_running_it(pipeline_dir, tmp_path):
    d = _copy(pipeline_dir, tmp_path)
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_out.bias": _Evil()}, d / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(PretrainedError, match="refusing to load.*weights_only"):
        pretrained.load("diffusers", d)
    assert _RAN == []


def test_unknown_option_and_unknown_kind(pipeline_dir):
    with pytest.raises(PretrainedError, match="unknown option.*'image_size'.*accepted: revision"):
        pretrained.load("diffusers", pipeline_dir, image_size=32)
    with pytest.raises(PretrainedError, match="unknown pretrained kind"):
        pretrained.load("diffuser", pipeline_dir)


def test_hub_id_offline_says_download_first(tmp_path):
    with pytest.raises(PretrainedError, match=r"could not fetch 'someone/no-such-model'.*hf download.*--local-dir"):
        pretrained.load("diffusers", "someone/no-such-model", local_files_only=True, cache_dir=str(tmp_path))


def test_hub_id_downloads_then_loads_as_a_directory(pipeline_dir, monkeypatch):
    """The hub path, with snapshot_download replaced by the local copy (no network in tests)."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns, kw))
        return str(pipeline_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    m = pretrained.load("diffusers", "google/ddpm-cifar10-32", revision="abc")
    assert m.identity["hub_id"] == "google/ddpm-cifar10-32" and m.identity["revision"] == "abc"
    assert calls[0][1][0] == "model_index.json" and calls[1][1] == ["unet/diffusion_pytorch_model.safetensors"]
    assert all(c[2] == {"revision": "abc"} for c in calls)


# ------------------------------------------------------------------------------------------------ optional extra
def test_missing_diffusers_gives_the_install_command(pipeline_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "analytic-dpm\[diffusers\]"'):
        pretrained.load("diffusers", pipeline_dir)


def test_importing_the_package_does_not_import_diffusers():
    code = ("import sys, analytic_dpm, analytic_dpm.pretrained; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr

