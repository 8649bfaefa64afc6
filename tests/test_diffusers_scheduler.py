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


def run_pipeline(unet, scheduler, steps=K, seed=0, batch=SHAPE[0], pipeline=DDPMPipeline, **call_kw):
    """``pipeline`` (DDPMPipeline) with ``scheduler``, output_type="pt"; also returns every step's prev_sample."""
    record = []
    step = scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        record.append(out.prev_sample.clone())
        return out

    scheduler.step = recording_step
    try:
        pipe = pipeline(unet=unet, scheduler=scheduler)
        pipe.scheduler = scheduler  # DDIMPipeline turns the scheduler it is given into a DDIMScheduler
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=batch, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                      output_type="pt", **call_kw).images
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
    scheduler = AnalyticDPMScheduler.from_config(DDPMScheduler(**SCHED_KW).config, gamma=GAMMA.tolist(),
                                                 trajectory="even")  # (the default follows timestep_spacing)
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


# ---------------------------------------------------------------------------------------- diffusers' conventions
SPACINGS = [("leading", 0), ("leading", 1), ("linspace", 0), ("trailing", 0)]


def diffusers_timesteps(cls, K, n_train, spacing, offset):
    sched = cls(num_train_timesteps=n_train, timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(K)
    return sched.timesteps.tolist()


@pytest.mark.parametrize("n_train", [100, 1000, 37])
def test_spaced_trajectory_is_what_diffusers_set_timesteps_picks(n_train):
    """Every K: our trajectory (t in 1..N) is diffusers' DDPMScheduler and DDIMScheduler timesteps + 1."""
    from diffusers import DDIMScheduler

    from analytic_dpm.pretrained.diffusers_format import spaced_trajectory

    artefacts = 0
    for spacing, offset in SPACINGS:
        for K in range(1, n_train + 1):
            if spacing == "leading" and (K - 1) * (n_train // K) + offset > n_train - 1:
                with pytest.raises(ValueError, match="past num_train_timesteps - 1"):
                    spaced_trajectory(spacing, n_train, K, offset)
                continue
            ours = [t - 1 for t in reversed(spaced_trajectory(spacing, n_train, K, offset))]
            theirs = diffusers_timesteps(DDPMScheduler, K, n_train, spacing, offset)
            assert theirs == diffusers_timesteps(DDIMScheduler, K, n_train, spacing, offset)
            if len(theirs) == K + 1:  # numpy's arange of a float step yields one more, -1 (module docstring)
                assert spacing == "trailing" and theirs[-1] == -1
                artefacts += 1
                theirs = theirs[:K]
            assert ours == theirs, (spacing, offset, K)
    assert artefacts > 0 or n_train == 37  # the documented trailing artefact occurs at N = 100 and 1000


def test_default_trajectory_follows_timestep_spacing_and_the_paper_s_ones_are_explicit():
    kw = dict(SCHED_KW, gamma=GAMMA.tolist())
    leading = AnalyticDPMScheduler.from_config(DDPMScheduler(**SCHED_KW).config, gamma=GAMMA.tolist())
    direct = AnalyticDPMScheduler(**kw)
    paper = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA)
    explicit = AnalyticDPMScheduler.from_config(DDPMScheduler(**SCHED_KW).config, gamma=GAMMA.tolist(),
                                                trajectory="even")
    trailing = AnalyticDPMScheduler.from_config(DDPMScheduler(**SCHED_KW, timestep_spacing="trailing").config,
                                                gamma=GAMMA.tolist())
    for sched in (leading, direct, paper, explicit, trailing):
        sched.set_timesteps(K)
    assert leading.timesteps.tolist() == direct.timesteps.tolist() == list(range(90, -1, -10))  # diffusers' leading
    assert leading.config.trajectory is None and leading.config.timestep_spacing == "leading"
    even = [t - 1 for t in reversed(make_trajectory("even", N, K))]
    assert paper.timesteps.tolist() == explicit.timesteps.tolist() == even != leading.timesteps.tolist()
    assert trailing.timesteps.tolist() == list(range(99, 0, -10))


@pytest.mark.parametrize("spacing, offset, steps", [(s, o, K) for s, o in SPACINGS] + [("trailing", 0, 7)])
def test_ddpm_beta_tilde_reproduces_ddpm_scheduler_step_for_step(unet, spacing, offset, steps):
    """DDPMPipeline with diffusers' DDPMScheduler (fixed_small) vs ours from its config, the same generator: every
    step agrees to float32 rounding (diffusers keeps float32 alphas_cumprod, we float64)."""
    theirs = DDPMScheduler(**SCHED_KW, timestep_spacing=spacing, steps_offset=offset, variance_type="fixed_small")
    ours = AnalyticDPMScheduler.from_config(theirs.config, method="ddpm_beta_tilde")
    assert ours.config.variance_type == "fixed_small"  # kept in the config, unused: method decides
    a, b = run_pipeline(unet, theirs, steps=steps), run_pipeline(unet, ours, steps=steps)
    assert theirs.timesteps.tolist() == ours.timesteps.tolist()
    assert_close_run(a, b)
    assert [int(theirs.previous_timestep(t)) for t in theirs.timesteps] == [
        int(ours.previous_timestep(t)) for t in ours.timesteps]


def assert_close_run(a, b, atol=5e-5):
    (images_a, steps_a), (images_b, steps_b) = a, b
    assert len(steps_a) == len(steps_b)
    for k, (x, y) in enumerate(zip(steps_a, steps_b)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=atol, msg=lambda m: f"step {k}: {m}")  # noqa: B023
    torch.testing.assert_close(images_a, images_b, rtol=1e-5, atol=atol)


def test_ddpm_beta_is_fixed_large_except_diffusers_noise_at_a_last_timestep_above_0(unet):
    """The documented difference: DDPMScheduler adds noise at the last step whenever its timestep is > 0."""
    for spacing, same_last_step in [("leading", True), ("trailing", False)]:  # last timestep 0 / 9
        theirs = DDPMScheduler(**SCHED_KW, timestep_spacing=spacing, variance_type="fixed_large")
        ours = AnalyticDPMScheduler.from_config(theirs.config, method="ddpm_beta")
        a, b = run_pipeline(unet, theirs)[1], run_pipeline(unet, ours)[1]
        for x, y in zip(a[:-1], b[:-1]):  # every step but the last
            torch.testing.assert_close(x, y, rtol=1e-5, atol=5e-5)
        last_gap = (a[-1] - b[-1]).abs().max().item()
        assert (last_gap < 5e-5) == same_last_step, (spacing, last_gap)


DDIM_CASES = [("leading", 0, K, 0.0), ("leading", 0, K, 0.5), ("leading", 1, K, 0.5), ("trailing", 0, K, 0.5),
              ("linspace", 0, 25, 0.5)]  # linspace: DDIMScheduler's jumps are its timesteps only at K = N


@pytest.mark.parametrize("spacing, offset, steps, eta", DDIM_CASES)
def test_ddim_reproduces_ddim_scheduler_step_for_step(unet, spacing, offset, steps, eta):
    """DDIMPipeline (it passes eta, use_clipped_model_output=None and the generator to step) with DDIMScheduler vs
    ours (method ddim, eta configured) from its config: every step agrees to float32 rounding."""
    from diffusers import DDIMPipeline, DDIMScheduler

    kw = dict(num_train_timesteps=25, beta_start=1e-3, beta_end=0.2) if steps == 25 else SCHED_KW
    theirs = DDIMScheduler(**kw, timestep_spacing=spacing, steps_offset=offset)
    ours = AnalyticDPMScheduler.from_config(theirs.config, method="ddim", eta=eta)
    a = run_pipeline(unet, theirs, steps=steps, pipeline=DDIMPipeline, eta=eta)
    b = run_pipeline(unet, ours, steps=steps, pipeline=DDIMPipeline, eta=eta)
    assert theirs.timesteps.tolist() == ours.timesteps.tolist()
    assert_close_run(a, b)


def test_ddim_scheduler_linspace_jumps_by_N_over_K_ours_to_the_next_timestep(unet):
    """The documented difference (diffusers issues #11347, #12633): at linspace K < N, DDIMScheduler evaluates the
    same timesteps but steps from t to t - N // K; ours steps to the next timestep, as DDPMScheduler does."""
    from diffusers import DDIMScheduler

    theirs = DDIMScheduler(**SCHED_KW, timestep_spacing="linspace")
    ours = AnalyticDPMScheduler.from_config(theirs.config, method="ddim")
    jump = AnalyticDPMScheduler.from_config(theirs.config, method="ddim")
    theirs.set_timesteps(K)
    ours.set_timesteps(K)
    t0, t1 = theirs.timesteps[:2].tolist()
    assert theirs.timesteps.tolist() == ours.timesteps.tolist() and ours.previous_timestep(t0) == t1 != t0 - N // K
    jump.set_timesteps(timesteps=[t0, t0 - N // K])  # DDIMScheduler's own pair
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = unet(x, t0).sample
    theirs_x = theirs.step(eps, t0, x).prev_sample
    torch.testing.assert_close(theirs_x, jump.step(eps, t0, x).prev_sample, rtol=1e-5, atol=1e-5)
    assert (theirs_x - ours.step(eps, t0, x).prev_sample).abs().max() > 1e-2


def test_variance_noise_is_the_step_s_draw_as_in_ddim_scheduler(unet):
    from diffusers import DDIMScheduler

    theirs = DDIMScheduler(**SCHED_KW)
    ours = AnalyticDPMScheduler.from_config(theirs.config, method="ddim", eta=0.5)
    theirs.set_timesteps(K)
    ours.set_timesteps(K)
    g = torch.Generator().manual_seed(3)
    x_a = x_b = torch.randn(SHAPE, generator=g)
    for t in theirs.timesteps:
        z = torch.randn(SHAPE, generator=g)
        with torch.no_grad():
            eps_a, eps_b = unet(x_a, t).sample, unet(x_b, t).sample
        x_a = theirs.step(eps_a, t, x_a, eta=0.5, variance_noise=z).prev_sample
        x_b = ours.step(eps_b, t, x_b, eta=0.5, variance_noise=z).prev_sample
        torch.testing.assert_close(x_a, x_b, rtol=1e-5, atol=5e-5)
    # variance_noise = the draw the generator would make: the same step, bit for bit
    t = ours.timesteps[0]
    drawn = ours.step(eps_b, t, x_b, generator=torch.Generator().manual_seed(5)).prev_sample
    given = ours.step(eps_b, t, x_b, variance_noise=torch.randn(SHAPE, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(drawn, given.prev_sample)


def test_ddim_pipeline_defaults_are_accepted_by_ddpm_methods(unet):
    """DDIMPipeline passes eta=0.0 and use_clipped_model_output=None: with method analytic_ddpm (eta configured 0)
    that is the same run as DDPMPipeline's."""
    from diffusers import DDIMPipeline

    scheduler = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA)
    assert_same_run(run_pipeline(unet, scheduler, pipeline=DDIMPipeline), run_pipeline(unet, scheduler))
    clipped = run_pipeline(unet, scheduler, pipeline=DDIMPipeline, use_clipped_model_output=True)
    assert_same_run(clipped, run_pipeline(unet, scheduler))  # the DDPM mean depends on x0hat only


def test_step_keywords_that_contradict_the_configuration_are_refused(unet):
    from diffusers import DDIMPipeline

    ddim = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA, method="analytic_ddim", eta=0.0)
    with pytest.raises(ValueError, match=r"samples 'analytic_ddim' with eta=0.0 .* build it with eta=0.5"):
        run_pipeline(unet, ddim, pipeline=DDIMPipeline, eta=0.5)
    with pytest.raises(ValueError, match="use_clipped_model_output=True: the DDIM mean"):
        run_pipeline(unet, ddim, pipeline=DDIMPipeline, use_clipped_model_output=True)
    unclipped = AnalyticDPMScheduler.from_schedule(SCHEDULE, None, method="ddim", clip_sample=False)
    run_pipeline(unet, unclipped, pipeline=DDIMPipeline, use_clipped_model_output=True)  # no effect, as in diffusers
    ddpm = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA)
    with pytest.raises(ValueError, match="samples the DDPM forward process"):
        run_pipeline(unet, ddpm, pipeline=DDIMPipeline, eta=1.0)
    ddpm.set_timesteps(K)
    x, t = torch.zeros(SHAPE), ddpm.timesteps[0]
    with pytest.raises(TypeError, match="pass eta, use_clipped_model_output and variance_noise as keywords"):
        ddpm.step(x, t, x, 0.0)  # DDIMScheduler's positional order
    with pytest.raises(ValueError, match="not both"):
        ddpm.step(x, t, x, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match=r"variance_noise must be a tensor of the sample's shape \(3, 3, 8, 8\)"):
        ddpm.step(x, t, x, variance_noise=x[:1])
    with pytest.raises(ValueError, match="timestep 5 is not on the trajectory"):
        ddpm.previous_timestep(5)
    assert AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA).previous_timestep(5) == 4  # before set_timesteps


def test_compatibles_both_ways_and_from_config_back():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    assert AnalyticDPMScheduler in DDPMScheduler(**SCHED_KW).compatibles
    assert AnalyticDPMScheduler in DDIMScheduler(**SCHED_KW).compatibles
    ours = AnalyticDPMScheduler.from_schedule(SCHEDULE, GAMMA)
    assert {DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, AnalyticDPMScheduler} <= set(ours.compatibles)
    assert "EDMEulerScheduler" not in {c.__name__ for c in ours.compatibles}  # a continuous-time (sigma) scheduler
    source = DDPMScheduler(**SCHED_KW, timestep_spacing="trailing", variance_type="fixed_large")
    back = DDPMScheduler.from_config(AnalyticDPMScheduler.from_config(source.config, gamma=GAMMA.tolist()).config)
    for key in ("num_train_timesteps", "beta_start", "beta_end", "timestep_spacing", "variance_type"):
        assert back.config[key] == source.config[key], key


def test_options_it_cannot_honour_are_refused():
    from diffusers import DDIMScheduler

    g = GAMMA.tolist()
    thresholding = DDPMScheduler(**SCHED_KW, thresholding=True).config
    with pytest.raises(ValueError, match=r"thresholding=True .* pass thresholding=False"):
        AnalyticDPMScheduler.from_config(thresholding, gamma=g)
    assert not AnalyticDPMScheduler.from_config(thresholding, gamma=g, thresholding=False).config.thresholding
    with pytest.raises(ValueError, match=r"set_alpha_to_one=False .* pass set_alpha_to_one=True"):
        AnalyticDPMScheduler.from_config(DDIMScheduler(**SCHED_KW, set_alpha_to_one=False).config, gamma=g)
    with pytest.raises(ValueError, match="unknown timestep_spacing 'uniform'"):
        AnalyticDPMScheduler(**SCHED_KW, gamma=g, timestep_spacing="uniform")
    with pytest.raises(ValueError, match="for diffusers' spacing pass timestep_spacing='trailing'"):
        AnalyticDPMScheduler(**SCHED_KW, gamma=g, trajectory="trailing")
    with pytest.raises(ValueError, match="steps_offset must be an integer >= 0"):
        AnalyticDPMScheduler(**SCHED_KW, gamma=g, steps_offset=-1)
    offset = AnalyticDPMScheduler.from_config(DDPMScheduler(**SCHED_KW, steps_offset=1).config, gamma=g)
    with pytest.raises(ValueError, match="puts the timestep 100 past num_train_timesteps - 1 = 99 at K = 100"):
        offset.set_timesteps(N)


@pytest.mark.parametrize("trajectory", [None, "optimal"])
def test_pipeline_round_trip_keeps_gamma_and_the_trajectory(unet, tmp_path, trajectory):
    """save_pretrained, then DiffusionPipeline.from_pretrained (no scheduler passed): the same scheduler."""
    from diffusers import DiffusionPipeline

    source = DDPMScheduler(**SCHED_KW, timestep_spacing="trailing")
    scheduler = AnalyticDPMScheduler.from_config(source.config, gamma=GAMMA, trajectory=trajectory)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path)
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    loaded = pipe.scheduler
    assert isinstance(pipe, DDPMPipeline) and isinstance(loaded, AnalyticDPMScheduler)
    assert torch.equal(loaded.gamma, GAMMA) and torch.equal(loaded.schedule.betas, scheduler.schedule.betas)
    assert loaded.config.trajectory == trajectory and loaded.config.timestep_spacing == "trailing"
    run, reloaded_run = run_pipeline(unet, scheduler), run_pipeline(pipe.unet, loaded)
    assert loaded.trajectory == scheduler.trajectory
    assert (scheduler.trajectory == make_trajectory("optimal", N, K, GAMMA, schedule=SCHEDULE)) == bool(trajectory)
    assert_same_run(reloaded_run, run)


def test_gamma_file_goes_into_from_config(tmp_path):
    """The file the calibrate CLI and the evaluate.py Gamma cache write (save_gamma_file), read back."""
    from analytic_dpm.gamma import read_gamma_vector, save_gamma_file

    path = save_gamma_file(tmp_path / "gamma.pt", GAMMA, M=100, seed=0)
    scheduler = AnalyticDPMScheduler.from_config(DDPMScheduler(**SCHED_KW).config, gamma=read_gamma_vector(path))
    assert torch.equal(scheduler.gamma, GAMMA) and scheduler.config.gamma == GAMMA.tolist()
    optimal = AnalyticDPMScheduler.from_config(scheduler.config, trajectory="optimal")  # docs: Gamma stays
    optimal.set_timesteps(K)
    assert torch.equal(optimal.gamma, GAMMA)
    assert optimal.trajectory == make_trajectory("optimal", N, K, GAMMA, schedule=SCHEDULE)


def test_head_methods_are_refused_with_the_way_to_use_them():
    from analytic_dpm import NoiseSchedule

    with pytest.raises(ValueError, match="needs a network with a covariance head"):
        AnalyticDPMScheduler.from_schedule(NoiseSchedule.linear(50), method="npr_ddpm")
