"""``analytic_dpm.diffusers.AnalyticDPMScheduler`` in diffusers' DDPMPipeline == ``analytic_dpm.sample``.

Same noise: the pipeline draws x_T and then one N(0, I) per step but the last from its generator, as ``sample``
does from ``generator``; so with equal seeds both runs see the same noise and must agree step for step.
"""

import importlib
import sys

import pytest
import torch

from analytic_dpm import NoiseSchedule, make_trajectory, sample
from analytic_dpm.pretrained import EpsAdapter

pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from analytic_dpm.diffusers import AnalyticDPMScheduler  # noqa: E402

N, K = 100, 10
SCHED_KW = dict(num_train_timesteps=N, beta_start=1e-3, beta_end=0.05)
SCHEDULE = NoiseSchedule.from_betas(torch.linspace(1e-3, 0.05, N, dtype=torch.float64))
SHAPE = (3, 3, 8, 8)


def gaussian_gamma(schedule, s2=0.25):
    """gamma_t of data N(m, s2 I) (spec section 9): bbar_t / (abar_t s2 + bbar_t); gamma_0 = 0."""
    abar, bbar = schedule.alphas_cumprod, schedule.bbar
    g = bbar / (abar * s2 + bbar)
    g[0] = 0.0
    return g


GAMMA = gaussian_gamma(SCHEDULE)


@pytest.fixture(autouse=True)
def _one_thread():
    """These nets are tiny: one thread is faster, and far faster on a busy machine, than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unet(seed=0, out_channels=3) -> UNet2DModel:
    """8x8, channels (32, 64), one attention level; default init plus N(0, 0.02^2) on every weight."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return unet.eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def eps_model_of(unet):
    """Our convention around the diffusers net (what pretrained.load("diffusers", ...) returns)."""
    return EpsAdapter(unet, t_offset=-1, eps_channels=3, output=lambda out: out.sample)


def run_pipeline(unet, scheduler, steps=K, seed=0, batch=SHAPE[0]):
    """DDPMPipeline(unet, scheduler) with output_type="pt"; also returns every step's prev_sample."""
    record = []
    step = scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        record.append(out.prev_sample.clone())
        return out

    scheduler.step = recording_step
    try:
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=batch, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                      output_type="pt").images
    finally:
        del scheduler.step
    return images, record


def run_ours(unet, taus, method, seed=0, gamma=GAMMA, **kw):
    """analytic_dpm.sample with the same seed; returns the final images (as the pipeline) and every step's x."""
    xs = []
    x = sample(eps_model_of(unet), SCHEDULE, taus, method, SHAPE, gamma=gamma,
               generator=torch.Generator().manual_seed(seed), callback=lambda k, t, x, x0: xs.append(x.clone()), **kw)
    return (x / 2 + 0.5).clamp(0, 1), xs


def assert_same_run(pipe_run, our_run):
    (images, steps), (ours, our_steps) = pipe_run, our_run
    assert len(steps) == len(our_steps)
    for k, (a, b) in enumerate(zip(steps, our_steps)):
        assert torch.equal(a, b), f"step {k}: max diff {(a - b).abs().max().item()}"
    assert torch.equal(images, ours)


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("method", ["analytic_ddpm", "analytic_ddim"])
def test_pipeline_reproduces_sample_step_for_step_even(unet, method):
    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, method=method, trajectory="even")
    run = run_pipeline(unet, scheduler)
    taus = make_trajectory("even", N, K)
    assert scheduler.trajectory == taus
    assert scheduler.timesteps.tolist() == [t - 1 for t in reversed(taus)]  # diffusers' convention
    assert_same_run(run, run_ours(unet, taus, method))
    assert run[0].std().item() > 0.05


def test_optimal_trajectory_with_gamma(unet):
    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, method="analytic_ddpm", trajectory="optimal")
    run = run_pipeline(unet, scheduler)
    taus = make_trajectory("optimal", N, K, GAMMA, schedule=SCHEDULE)
    assert taus != make_trajectory("even", N, K)  # the DP really chose another trajectory
    assert scheduler.trajectory == taus
    assert_same_run(run, run_ours(unet, taus, "analytic_ddpm"))


@pytest.mark.parametrize("method, trajectory, steps", [
    ("ddpm_beta", "even", K), ("ddpm_beta_tilde", "quadratic", 8), ("ddim", "quadratic", 8),
    ("analytic_ddim", [1, 5, 20, 60, 100], 5),
])  # quadratic at N = 100 has duplicates from K = 10 on
def test_baselines_quadratic_and_explicit_trajectories(unet, method, trajectory, steps):
    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, method=method, trajectory=trajectory)
    run = run_pipeline(unet, scheduler, steps=steps)
    taus = make_trajectory(trajectory, N, steps)
    assert_same_run(run, run_ours(unet, taus, method))


def test_eta_and_clip_sigma_y_are_passed_through(unet):
    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, method="analytic_ddim", eta=0.5, clip_sigma_y=1.0)
    run = run_pipeline(unet, scheduler)
    assert_same_run(run, run_ours(unet, make_trajectory("even", N, K), "analytic_ddim", eta=0.5, clip_sigma_y=1.0))
    plain = run_pipeline(unet, AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, method="analytic_ddim"))
    assert not torch.equal(run[0], plain[0])


def test_learned_variance_output_uses_the_first_C_channels():
    net = tiny_unet(out_channels=6)
    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA)
    run = run_pipeline(net, scheduler)
    assert_same_run(run, run_ours(net, make_trajectory("even", N, K), "analytic_ddpm"))


def test_from_config_of_a_ddpm_scheduler_uses_the_float64_betas(unet):
    scheduler = AnalyticDPMScheduler.from_config(DDPMScheduler(**SCHED_KW).config, gamma=GAMMA.tolist())
    assert torch.equal(scheduler.schedule.betas, SCHEDULE.betas)
    assert scheduler.config.method == "analytic_ddpm"
    assert_same_run(run_pipeline(unet, scheduler), run_ours(unet, make_trajectory("even", N, K), "analytic_ddpm"))


def test_variances_are_the_core_reverse_variance():
    from analytic_dpm import reverse_variance

    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, method="analytic_ddpm")
    scheduler.set_timesteps(K)
    want = reverse_variance(SCHEDULE, make_trajectory("even", N, K), "analytic_ddpm", GAMMA)
    assert torch.equal(scheduler.variances, want)
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1 and len(scheduler) == N
    x = torch.randn(SHAPE)
    assert scheduler.scale_model_input(x, 5) is x


def test_step_without_return_dict_and_pred_original_sample(unet):
    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA)
    scheduler.set_timesteps(K)
    x, t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)), scheduler.timesteps[0]
    with torch.no_grad():
        eps = unet(x, t).sample
    out = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(1))
    prev, x0 = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(1), return_dict=False)
    assert torch.equal(out.prev_sample, prev) and torch.equal(out.pred_original_sample, x0)
    abar, bbar = SCHEDULE.alphas_cumprod[N].item(), SCHEDULE.bbar[N].item()
    torch.testing.assert_close(x0, ((x - bbar**0.5 * eps) / abar**0.5).clamp(-1, 1))


def test_add_noise_matches_diffusers():
    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA)
    x0, noise = torch.rand(SHAPE) * 2 - 1, torch.randn(SHAPE)
    t = torch.tensor([0, 40, 99])
    torch.testing.assert_close(scheduler.add_noise(x0, noise, t), DDPMScheduler(**SCHED_KW).add_noise(x0, noise, t),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ save / load
def test_save_pretrained_round_trip(unet, tmp_path):
    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, method="analytic_ddpm", trajectory="optimal",
                                                   clip_sigma_y=2.0)
    scheduler.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
    assert torch.equal(loaded.schedule.betas, SCHEDULE.betas)  # float64 survives JSON exactly
    assert torch.equal(loaded.gamma, GAMMA)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    assert_same_run(run_pipeline(unet, loaded), run_pipeline(unet, scheduler))


def test_tensor_arguments_are_stored_as_json_lists(tmp_path):
    scheduler = AnalyticDPMScheduler(num_train_timesteps=N, trained_betas=SCHEDULE.betas[1:], gamma=GAMMA,
                                     trajectory=torch.tensor([1, 50, 100]))
    scheduler.save_pretrained(tmp_path)
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path)
    assert torch.equal(loaded.schedule.betas, SCHEDULE.betas) and torch.equal(loaded.gamma, GAMMA)
    assert loaded.config.trajectory == [1, 50, 100]


def test_pipeline_save_and_reload_with_the_scheduler_passed_explicitly(unet, tmp_path):
    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    loaded = AnalyticDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    pipe = DDPMPipeline.from_pretrained(tmp_path, scheduler=loaded)
    assert isinstance(pipe.scheduler, AnalyticDPMScheduler)
    assert_same_run(run_pipeline(pipe.unet, loaded), run_pipeline(unet, scheduler))


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_says_what_to_do():
    with pytest.raises(ValueError, match="method 'analytic_ddpm' needs gamma"):
        AnalyticDPMScheduler.from_schedule(SCHEDULE, None, method="analytic_ddpm")
    with pytest.raises(ValueError, match="the optimal trajectory needs gamma"):
        AnalyticDPMScheduler.from_schedule(SCHEDULE, None, method="ddpm_beta", trajectory="optimal")
    with pytest.raises(ValueError, match="optimal trajectory is defined for the DDPM forward process only"):
        AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, method="analytic_ddim", trajectory="optimal")
    with pytest.raises(ValueError, match="gamma must be a 1-D vector of length N\\+1 = 101"):
        AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA[:-1])
    with pytest.raises(ValueError, match="unknown method"):
        AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, method="analytic")
    with pytest.raises(ValueError, match="v-predicting"):
        AnalyticDPMScheduler.from_config(DDPMScheduler(prediction_type="v_prediction", **SCHED_KW).config,
                                         gamma=GAMMA.tolist())
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        AnalyticDPMScheduler(num_train_timesteps=N, beta_schedule="exotic", gamma=GAMMA.tolist())
    with pytest.raises(ValueError, match="unknown trajectory 'evn'"):
        AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, trajectory="evn")
    with pytest.raises(ValueError, match="strictly increasing"):
        AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, trajectory=[1, 5, 5])
    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, trajectory=[1, 50, 100])
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="call set_timesteps"):
        scheduler.step(x, 99, x)
    with pytest.raises(ValueError, match="K = 10 but the explicit trajectory has 3"):
        scheduler.set_timesteps(10)
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match="timestep 98 is not on the trajectory"):
        scheduler.step(x, 98, x)
    with pytest.raises(ValueError, match="exceeds N = 100"):
        AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA).set_timesteps(1000)  # DDPMPipeline's default K


def test_set_timesteps_accepts_diffusers_custom_timesteps():
    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA)
    scheduler.set_timesteps(timesteps=[99, 49, 0])
    assert scheduler.trajectory == [1, 50, 100] and scheduler.timesteps.tolist() == [99, 49, 0]


def test_missing_diffusers_gives_the_install_command(monkeypatch):
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.setitem(sys.modules, name, None)  # every `import diffusers...` now raises ImportError
    monkeypatch.delitem(sys.modules, "analytic_dpm.diffusers")
    with pytest.raises(ImportError, match=r'pip install "analytic-dpm\[diffusers\]"'):
        importlib.import_module("analytic_dpm.diffusers")
