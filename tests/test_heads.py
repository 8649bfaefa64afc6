"""Covariance heads (SN-DPM / NPR-DPM, spec section 11): method names, reverse_moments against hand formulas and the
exact q(x_s | x_t) of an anisotropic Gaussian, sampling, avg_cov, clip_sigma_y, error messages."""

import math

import pytest
import torch

from analytic_dpm import (
    ALL_METHODS,
    HEAD_METHODS,
    METHODS,
    NoiseSchedule,
    head_kind,
    make_trajectory,
    needs_head,
    nll_bpd,
    reverse_moments,
    reverse_variance,
    sample,
)
from analytic_dpm.methods import check_method
from analytic_dpm.moments import trajectory_coefficients
from analytic_dpm.oracles import GaussianMixtureOracle, GaussianOracle
from analytic_dpm.variance import pair_variance, sampling_clip_value

N = 1000
SCHED = NoiseSchedule.linear(N)
SHAPE = (1, 4, 4)
STD = torch.logspace(math.log10(0.05), math.log10(1.0), 16).reshape(SHAPE)  # one standard deviation per pixel
ANISO = GaussianOracle(SCHED, mean=0.1, std=STD, shape=SHAPE)
UNBOUNDED = dict(clip_x0=False, data_range=None)


class FakeHead:
    """A deterministic, nonlinear head model whose head can make Chat negative (SN) or large (both): exercises the
    clip at 0 and at ((b-a)/2)^2 = 1."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        tt = t.double().view(-1, 1, 1, 1) / N
        eps = torch.tanh(x.double()) * (0.5 + tt)
        head = eps**2 + 0.3 * torch.sin(3 * x.double() + tt)
        return eps.float(), head.float()


def _hand(method, x, s, t, eps, head, gamma=None, eta=0.0, clip=True):
    """Spec sections 3, 4 and 11 written out in float64 from the schedule tables alone."""
    abar = SCHED.alphas_cumprod
    a_s, a_t = float(abar[s]), float(abar[t])
    b_s, b_t = 1 - a_s, 1 - a_t
    alpha_ts = a_t / a_s
    beta_ts = 1 - alpha_ts
    btilde = beta_ts * b_s / b_t
    x, eps, head = x.double(), eps.double(), head.double()
    x0 = (x - math.sqrt(b_t) * eps) / math.sqrt(a_t)
    if clip:
        x0 = x0.clamp(-1, 1)
    forward = check_method(method)
    lam2 = btilde if forward == "ddpm" else eta**2 * btilde
    if forward == "ddpm":
        mean = math.sqrt(a_s) * beta_ts / b_t * x0 + math.sqrt(alpha_ts) * b_s / b_t * x
        c = math.sqrt(a_s) * beta_ts / b_t
    else:
        mean = math.sqrt(a_s) * x0 + math.sqrt(max(b_s - lam2, 0.0)) * eps
        c = math.sqrt(a_s) - math.sqrt((b_s - lam2) * a_t / b_t)
    if s == 0:
        mean = x0
    hi = 1.0 if clip else math.inf
    if method == "ddpm_beta":
        var = beta_ts
    elif method in ("ddpm_beta_tilde", "ddim"):
        var = lam2
    elif method in ("analytic_ddpm", "analytic_ddim"):
        U = min(max(b_t / a_t * (1 - float(gamma[t])), 0.0), hi)
        var = lam2 + c**2 * U
    else:
        chat = b_t / a_t * (head - eps**2) if method.startswith("sn") else b_t / a_t * head
        var = lam2 + c**2 * chat.clamp(0.0, hi)
    return mean, var


def test_method_names_and_kinds():
    assert list(METHODS) == ["ddpm_beta", "ddpm_beta_tilde", "analytic_ddpm", "ddim", "analytic_ddim"]
    assert HEAD_METHODS == {"sn_ddpm": "ddpm", "npr_ddpm": "ddpm", "sn_ddim": "ddim", "npr_ddim": "ddim"}
    assert ALL_METHODS == {**METHODS, **HEAD_METHODS}
    assert [head_kind(m) for m in HEAD_METHODS] == ["sn", "npr", "sn", "npr"]
    assert all(head_kind(m) is None and not needs_head(m) for m in METHODS)
    assert all(needs_head(m) for m in HEAD_METHODS)
    assert check_method("npr_ddim") == "ddim"
    with pytest.raises(ValueError, match="unknown method"):
        head_kind("sn")


@pytest.mark.parametrize("method", list(ALL_METHODS))
@pytest.mark.parametrize("s,t", [(0, 1), (0, 700), (1, 2), (40, 300), (500, 1000)])
def test_reverse_moments_equal_hand_formulas(method, s, t):
    gen = torch.Generator().manual_seed(s + t)
    x = 1.5 * torch.randn(3, *SHAPE, generator=gen)
    gamma = torch.rand(N + 1, generator=gen, dtype=torch.float64) * 1.2  # some gamma_t > 1: U clipped at 0
    gamma[0] = 0
    eta = 0.5 if check_method(method) == "ddim" else 0.0
    model = FakeHead()
    mean, var = reverse_moments(model, SCHED, x, s, t, method, gamma=gamma, eta=eta)
    assert model.calls == 1  # one network call
    eps, head = FakeHead()(x, torch.full((3,), t))
    hand_mean, hand_var = _hand(method, x, s, t, eps, head, gamma, eta)
    torch.testing.assert_close(mean.double(), hand_mean, atol=2e-5, rtol=1e-5)
    if head_kind(method) is None:
        assert var.ndim == 0 and var.dtype == torch.float64
        assert float(var) == pytest.approx(hand_var, rel=1e-9, abs=1e-15)
        assert float(var) == pytest.approx(float(pair_variance(SCHED, s, t, method, gamma, eta)), rel=1e-12)
        if s >= 1:  # the value reverse_variance gives for the pair (s, t) of the trajectory [s, t]
            assert float(var) == pytest.approx(float(reverse_variance(SCHED, [s, t], method, gamma, eta)[1]),
                                               rel=1e-12)
    else:
        assert var.shape == x.shape and var.dtype == torch.float32
        torch.testing.assert_close(var.double(), hand_var, atol=1e-7, rtol=2e-5)
    # unbounded data: no clamp of x0hat, no upper clip of Chat / U
    mean, var = reverse_moments(model, SCHED, x, s, t, method, gamma=gamma, eta=eta, **UNBOUNDED)
    hand_mean, hand_var = _hand(method, x, s, t, eps, head, gamma, eta, clip=False)
    torch.testing.assert_close(mean.double(), hand_mean, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(torch.as_tensor(var).double(), torch.as_tensor(hand_var, dtype=torch.float64),
                               atol=1e-7, rtol=2e-5)


def _exact_step(forward, s, t, x_t):
    """q(x_s | x_t) of N(0.1, diag(STD^2)) data from the joint Gaussian of (x_s, x_t), pixel by pixel. DDPM forward:
    x_t = sqrt(alpha_{t|s}) x_s + noise; DDIM forward (eta = 0): x_s and x_t share the same eps."""
    abar = SCHED.alphas_cumprod
    a_s, a_t = abar[s], abar[t]
    var, m = STD.double() ** 2, 0.1
    v_s, v_t = a_s * var + (1 - a_s), a_t * var + (1 - a_t)
    if forward == "ddpm":
        cov = (a_t / a_s).sqrt() * v_s
    else:
        cov = (a_s * a_t).sqrt() * var + ((1 - a_s) * (1 - a_t)).sqrt()
    mean = a_s.sqrt() * m + cov / v_t * (x_t.double() - a_t.sqrt() * m)
    return mean, v_s - cov**2 / v_t


@pytest.mark.parametrize("method", list(HEAD_METHODS))
@pytest.mark.parametrize("s,t", [(1, 10), (20, 200), (100, 300), (250, 1000)])
def test_exact_heads_give_the_exact_reverse_step(method, s, t):
    """Anisotropic Gaussian data, exact heads: every step of sn/npr is the exact q(x_s | x_t) (DDPM forward; for
    DDIM the exact conditional of its deterministic forward process); the scalar analytic variance is not."""
    x_t = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(t))
    forward = check_method(method)
    model = ANISO.head_model(head_kind(method))
    mean, var = reverse_moments(model, SCHED, x_t, s, t, method, **UNBOUNDED)
    exact_mean, exact_var = _exact_step(forward, s, t, x_t)
    torch.testing.assert_close(mean.double(), exact_mean, atol=1e-4, rtol=1e-5)  # x0hat: float32 error * 1/sqrt(abar)
    # NPR's head is Var[eps | x_t] itself; SN's is E[eps^2 | x_t] in float32, so h - eps_hat^2 loses digits where
    # Var[eps | x_t] is small (large t, small std): float32 cancellation, amplified by bbar_t / abar_t (~2.5e4 at
    # t = 1000, where SN's Chat is off by a factor of several for the std = 0.05 pixels). Checked where it is sound.
    if head_kind(method) == "npr" or t <= 300:
        rtol = 1e-5 if head_kind(method) == "npr" else 2e-3
        torch.testing.assert_close(var.double(), exact_var.expand_as(var), atol=1e-9, rtol=rtol)
    analytic = "analytic_" + forward
    _, iso = reverse_moments(ANISO, SCHED, x_t, s, t, analytic, gamma=ANISO.gamma(), **UNBOUNDED)
    assert ((iso / exact_var - 1).abs().max() > 0.05) or s == 1  # one scalar cannot fit every pixel


def test_mixture_heads_are_second_order_tweedie():
    """Var[eps | x_t] = 1 + bbar_t d^2/dx^2 log q_t(x_t) per pixel (second-order Tweedie), by autograd of the mixture's
    closed-form log density; E[eps | x_t] = -sqrt(bbar_t) d/dx log q_t(x_t)."""
    means, stds, weights = [-0.5, 0.3], [0.2, 0.35], [0.3, 0.7]
    oracle = GaussianMixtureOracle(SCHED, means, stds, weights, shape=(1, 1, 3))

    def log_qt(x, t):
        abar, bbar = SCHED.alphas_cumprod[t], SCHED.bbar[t]
        comps = []
        for m, s, w in zip(means, stds, weights):
            v = abar * s**2 + bbar
            comps.append(math.log(w) - 0.5 * x.numel() * torch.log(2 * math.pi * v) - ((x - abar.sqrt() * m) ** 2).sum()
                         / (2 * v))
        return torch.logsumexp(torch.stack(comps), 0)

    gen = torch.Generator().manual_seed(0)
    for t in (1, 30, 300, 1000):
        x = 0.6 * torch.randn(1, 1, 1, 3, generator=gen, dtype=torch.float64)
        hess = torch.autograd.functional.hessian(lambda y, t=t: log_qt(y, t), x).reshape(3, 3)
        grad = torch.autograd.functional.jacobian(lambda y, t=t: log_qt(y, t), x).reshape(3)
        eps, var = oracle.eps_and_variance(x, torch.tensor([t]))
        bbar = SCHED.bbar[t]
        torch.testing.assert_close(eps.reshape(3), -bbar.sqrt() * grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var.reshape(3), 1 + bbar * hess.diagonal(), rtol=1e-7, atol=1e-10)
        sn_eps, sn_head = oracle.head_model("sn")(x, torch.tensor([t]))
        npr_eps, npr_head = oracle.head_model("npr")(x, torch.tensor([t]))
        torch.testing.assert_close(sn_head, eps**2 + var)
        torch.testing.assert_close(npr_head, var)
        torch.testing.assert_close(sn_eps, oracle(x, torch.tensor([t])), rtol=1e-12, atol=1e-14)
        assert torch.equal(sn_eps, npr_eps)


def test_single_component_mixture_heads_equal_gaussian_heads():
    g = GaussianOracle(SCHED, mean=0.2, std=0.4, shape=(3, 2, 2))
    m = GaussianMixtureOracle(SCHED, [0.2], [0.4], [1.0], shape=(3, 2, 2))
    x, t = torch.randn(5, 3, 2, 2, dtype=torch.float64), torch.tensor([1, 10, 100, 500, 1000])
    for kind in ("sn", "npr"):
        for a, b in zip(g.head_model(kind)(x, t), m.head_model(kind)(x, t)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_anisotropic_oracle_closed_forms():
    assert ANISO.std.shape == SHAPE and not ANISO.isotropic
    flat = GaussianOracle(SCHED, mean=0.1, std=STD.flatten().tolist(), shape=SHAPE)  # a flat list is reshaped
    assert torch.equal(flat.std, ANISO.std)
    gen = torch.Generator().manual_seed(0)
    x0 = ANISO.sample_data(50000, gen)
    assert (x0.std(0) / STD - 1).abs().max() < 0.02
    assert (-ANISO.log_prob(x0) / (16 * math.log(2))).mean().item() == pytest.approx(ANISO.nll_bits_per_dim(), abs=0.01)
    for t in (10, 300, 1000):  # closed-form gamma_t = E ||eps_hat(x_t)||^2 / d, averaged over the pixels
        x_t = SCHED.alphas_cumprod[t].sqrt() * x0 + SCHED.bbar[t].sqrt() * torch.randn(x0.shape, generator=gen)
        g = ANISO(x_t, torch.tensor([t])).double().pow(2).mean()
        assert float(g) == pytest.approx(float(ANISO.gamma()[t]), abs=0.01)  # s.e. ~0.0015
    U = SCHED.bbar / SCHED.alphas_cumprod * (1 - ANISO.gamma())
    torch.testing.assert_close(U[1:], ANISO.posterior_variance()[1:], rtol=1e-9, atol=1e-12)
    iso = GaussianOracle(SCHED, mean=0.0, std=0.5, shape=(1, 2, 2))
    assert isinstance(iso.std, float) and iso.isotropic
    with pytest.raises(ValueError, match="does not fit"):
        GaussianOracle(SCHED, std=torch.ones(3), shape=SHAPE)
    with pytest.raises(ValueError, match="> 0"):
        GaussianOracle(SCHED, std=[0.1, -0.1], shape=(1, 1, 2))
    with pytest.raises(ValueError, match="'sn' or 'npr'"):
        ANISO.head_model("eps2")


@pytest.mark.parametrize("method", list(HEAD_METHODS))
def test_samples_of_exact_heads_have_the_per_pixel_moments(method):
    """K = 10: sn/npr (DDPM and DDIM) recover every pixel's variance; the scalar analytic variance cannot. Target:
    the sampler adds no noise at s = 0, so the samples are E[x_0 | x_1], of variance std^2 - Var[x_0 | x_1]."""
    n = 10000
    traj = make_trajectory("even", N, 10)
    x = sample(ANISO.head_model(head_kind(method)), SCHED, traj, method, (n, *SHAPE),
               generator=torch.Generator().manual_seed(0), **UNBOUNDED)
    target = STD.double() ** 2 - ANISO.posterior_variance_per_pixel(1)
    assert (x.var(0).double() / target - 1).abs().max() < 0.07  # the sample variance has a relative s.e. of 1.4%
    assert ((x.mean(0) - 0.1) / (STD / math.sqrt(n))).abs().max() < 4.5
    analytic = "analytic_" + check_method(method)
    y = sample(ANISO, SCHED, traj, analytic, (n, *SHAPE), gamma=ANISO.gamma(),
               generator=torch.Generator().manual_seed(0), **UNBOUNDED)
    assert (y.var(0).double() / target - 1).abs().max() > 1.0


def _manual_loop(model, traj, method, shape, seed, clip_sigma_y=None, avg_cov=False, **kw):
    """sample() written out with reverse_moments: same draws (x_T first, then one z per noisy step), the App. F.2 clip
    of the pair (tau_1, tau_2) as an elementwise clamp."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    pairs = list(zip([0, *traj[:-1]], traj))
    for k in range(len(traj), 0, -1):
        s, t = pairs[k - 1]
        mean, var = reverse_moments(model, SCHED, x, s, t, method, avg_cov=avg_cov, **kw)
        if k == 2 and clip_sigma_y is not None:
            var = var.clamp(max=sampling_clip_value(clip_sigma_y))
        x = mean if s == 0 else mean + var.sqrt() * torch.randn(shape, generator=gen)
    return x


@pytest.mark.parametrize("method", ["sn_ddpm", "npr_ddim"])
@pytest.mark.parametrize("avg_cov", [False, True])
def test_sample_is_the_loop_of_reverse_moments_with_clip_sigma_y(method, avg_cov):
    traj = make_trajectory("even", N, 6)
    model = FakeHead()
    x = sample(model, SCHED, traj, method, (8, *SHAPE), generator=torch.Generator().manual_seed(5), clip_sigma_y=1.0,
               avg_cov=avg_cov)
    assert model.calls == 6
    ref = _manual_loop(model, traj, method, (8, *SHAPE), 5, clip_sigma_y=1.0, avg_cov=avg_cov)
    torch.testing.assert_close(x, ref, rtol=0, atol=0)
    unclipped = _manual_loop(model, traj, method, (8, *SHAPE), 5, avg_cov=avg_cov)
    assert not torch.equal(x, unclipped)  # the clip acts: FakeHead's Chat at tau_2 is large
    steps = trajectory_coefficients(SCHED, traj, method, clip_sigma_y=1.0)
    assert [co.sigma2_max for co in steps] == [None, sampling_clip_value(1.0), None, None, None, None]


def test_head_model_serves_the_isotropic_methods_unchanged():
    """A head model's eps_hat drives the five isotropic methods: the same samples and NELBO as the plain model."""
    head = ANISO.head_model("sn")
    traj = make_trajectory("even", N, 5)
    for method in METHODS:
        kw = dict(gamma=ANISO.gamma(), eta=0.5 if method == "ddim" else 0.0)
        a = sample(ANISO, SCHED, traj, method, (16, *SHAPE), generator=torch.Generator().manual_seed(1), **kw)
        b = sample(head, SCHED, traj, method, (16, *SHAPE), generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(a, b), method
    x0 = ANISO.sample_data(64, torch.Generator().manual_seed(2))
    a = nll_bpd(ANISO, SCHED, traj, x0, list(METHODS), gamma=ANISO.gamma(), **UNBOUNDED)
    b = nll_bpd(head, SCHED, traj, x0, list(METHODS), gamma=ANISO.gamma(), **UNBOUNDED)
    for m in METHODS:
        assert torch.equal(a[m], b[m]) or (a[m].isnan().all() and b[m].isnan().all())


def test_avg_cov_of_exact_npr_is_the_analytic_variance():
    """Anisotropic Gaussian: the pixel mean of the exact Chat is U_t (exact gamma), so npr with avg_cov IS
    analytic_ddpm: same step variance, same samples (same draws), same NELBO."""
    x_t = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    npr = ANISO.head_model("npr")
    for s, t in [(0, 5), (3, 50), (100, 900)]:
        _, var = reverse_moments(npr, SCHED, x_t, s, t, "npr_ddpm", avg_cov=True, **UNBOUNDED)
        _, iso = reverse_moments(ANISO, SCHED, x_t, s, t, "analytic_ddpm", gamma=ANISO.gamma(), **UNBOUNDED)
        assert var.shape == (4, 1, 1, 1)
        torch.testing.assert_close(var.double(), iso.expand_as(var), rtol=2e-6, atol=1e-12)
    traj = make_trajectory("even", N, 10)
    kw = dict(generator=torch.Generator().manual_seed(3), **UNBOUNDED)
    a = sample(npr, SCHED, traj, "npr_ddpm", (32, *SHAPE), avg_cov=True, **kw)
    kw["generator"] = torch.Generator().manual_seed(3)
    b = sample(ANISO, SCHED, traj, "analytic_ddpm", (32, *SHAPE), gamma=ANISO.gamma(), **kw)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    x0 = ANISO.sample_data(256, torch.Generator().manual_seed(4))
    opts = dict(decoder="continuous", decoder_variance="method", **UNBOUNDED)
    bpd = nll_bpd(npr, SCHED, traj, x0, ["npr_ddpm", "analytic_ddpm"], gamma=ANISO.gamma(), avg_cov=True, **opts)
    torch.testing.assert_close(bpd["npr_ddpm"], bpd["analytic_ddpm"], rtol=0, atol=1e-5)
    per_pixel = nll_bpd(npr, SCHED, traj, x0, ["npr_ddpm"], **opts)["npr_ddpm"]
    assert per_pixel.mean() < bpd["analytic_ddpm"].mean() - 0.3


def test_avg_cov_averages_before_clipping():
    """The authors average Chat over the pixels, then clip: pixels with a negative SN Chat pull the mean down."""
    x = torch.linspace(-2, 2, 16).reshape(1, *SHAPE)
    model = FakeHead()
    s, t = 300, 600
    _, var = reverse_moments(model, SCHED, x, s, t, "sn_ddpm", avg_cov=True)
    eps, head = model(x, torch.tensor([t]))
    a_s, a_t = float(SCHED.alphas_cumprod[s]), float(SCHED.alphas_cumprod[t])
    chat = ((1 - a_t) / a_t * (head.double() - eps.double() ** 2)).mean().clamp(0, 1)
    beta_ts = 1 - a_t / a_s
    lam2, c = beta_ts * (1 - a_s) / (1 - a_t), math.sqrt(a_s) * beta_ts / (1 - a_t)
    assert ((1 - a_t) / a_t * (head - eps**2)).min() < 0  # some pixels have a negative Chat
    assert var.shape == (1, 1, 1, 1)
    assert float(var) == pytest.approx(lam2 + c**2 * float(chat), rel=1e-5)


def test_errors_say_what_to_do():
    x = torch.zeros(2, *SHAPE)
    msg = "method sn_ddpm needs a head model: model\\(x_t, t\\) must return \\(eps_hat, head\\)"
    with pytest.raises(ValueError, match=msg):
        reverse_moments(ANISO, SCHED, x, 0, 10, "sn_ddpm")
    with pytest.raises(ValueError, match=msg):
        sample(ANISO, SCHED, [1, 10], "sn_ddpm", (2, *SHAPE))
    with pytest.raises(ValueError, match=msg):
        nll_bpd(ANISO, SCHED, [1, 10], x, ["analytic_ddpm", "sn_ddpm"], gamma=ANISO.gamma())
    with pytest.raises(ValueError, match="needs an NPR head but the model's head is 'sn'"):
        sample(ANISO.head_model("sn"), SCHED, [1, 10], "npr_ddpm", (2, *SHAPE))
    with pytest.raises(ValueError, match="needs an SN head"):
        nll_bpd(ANISO.head_model("npr"), SCHED, [1, 10], x, ["sn_ddpm"])
    with pytest.raises(ValueError, match="per-pixel variance that depends on x_t"):
        reverse_variance(SCHED, [1, 10], "npr_ddpm")
    with pytest.raises(ValueError, match="0 <= s < t <= N"):
        reverse_moments(ANISO, SCHED, x, 10, 10, "ddim")
    with pytest.raises(ValueError, match="integer timesteps"):
        reverse_moments(ANISO, SCHED, x, 0.5, 10, "ddim")
    mean, _ = reverse_moments(ANISO, SCHED, x, torch.tensor(3), torch.tensor(10), "ddim")  # 0-d integer tensors
    assert mean.shape == x.shape
    with pytest.raises(ValueError, match="needs gamma"):
        reverse_moments(ANISO, SCHED, x, 0, 10, "analytic_ddpm")
    with pytest.raises(TypeError, match="must return eps_hat"):
        reverse_moments(lambda x, t: (x, x, x), SCHED, x, 0, 10, "ddim")
    with pytest.raises(ValueError, match="same shape"):
        reverse_moments(lambda x, t: (x, x[:, :1, :1]), SCHED, x, 0, 10, "sn_ddim")
    with pytest.raises(ValueError, match="clip_sigma_y must be > 0"):
        sample(FakeHead(), SCHED, [1, 10], "sn_ddpm", (2, *SHAPE), clip_sigma_y=0.0)
