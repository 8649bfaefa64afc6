"""CUDA checks (make test-gpu): the core runs on the GPU and agrees with the CPU."""

import pytest
import torch

from analytic_dpm import NoiseSchedule, estimate_gamma, make_trajectory, nll_bpd, sample
from analytic_dpm.oracles import GaussianOracle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_dp_on_gpu_equals_cpu():
    sched = NoiseSchedule.linear(1000)
    gamma = GaussianOracle(sched, 0.0, 0.5).gamma() * 0.97
    gamma[0] = 0
    for K in (10, 100, 1000):
        cpu = make_trajectory("optimal", 1000, K, gamma, schedule=sched)
        gpu = make_trajectory("optimal", 1000, K, gamma.cuda(), schedule=sched)
        assert cpu == gpu


def test_sampler_nll_gamma_on_gpu():
    sched = NoiseSchedule.linear(1000)
    oracle = GaussianOracle(sched, 0.0, 0.5, (3, 8, 8))
    gen = torch.Generator(device="cuda").manual_seed(0)
    g = estimate_gamma(oracle, sched, lambda n, gen: oracle.sample_data(n).cuda(), 20, 4096, generator=gen,
                       device="cuda", progress=False)
    assert torch.allclose(g.cpu()[1:], oracle.gamma()[1:], rtol=0.15)
    traj = make_trajectory("even", 1000, 10)
    x = sample(oracle, sched, traj, "analytic_ddpm", (512, 3, 8, 8), gamma=oracle.gamma(), generator=gen,
               device="cuda", clip_x0=False, data_range=None)
    assert x.is_cuda and abs(x.var().item() - 0.25) < 0.02
    bpd = nll_bpd(oracle, sched, traj, oracle.sample_data(256).cuda(), ["analytic_ddpm"], gamma=oracle.gamma(),
                  decoder="continuous", decoder_variance="method", clip_x0=False, data_range=None)
    assert abs(bpd["analytic_ddpm"].mean().item() - 1.0471) < 0.05


# ------------------------------------------------------------------------------------------- issue 9: speed options
class _BF16RoundedOracle(torch.nn.Module):
    """The exact Gaussian predictor with its input and output passed through identity 1x1 convolutions: under bf16
    autocast both are rounded to bfloat16, as a network's first and last layers would be."""

    def __init__(self, oracle, channels):
        super().__init__()
        self.oracle = oracle
        self.conv_in = torch.nn.Conv2d(channels, channels, 1, bias=False)
        self.conv_out = torch.nn.Conv2d(channels, channels, 1, bias=False)
        with torch.no_grad():
            for conv in (self.conv_in, self.conv_out):
                conv.weight.copy_(torch.eye(channels)[:, :, None, None])

    def forward(self, x, t):
        return self.conv_out(self.oracle(self.conv_in(x), t))


def _random_tiny_unet():
    from analytic_dpm.nets import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=3, image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(8,), dropout=0.0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            torch.nn.init.normal_(m.weight, std=0.02)
    return net.eval().cuda()


def test_bf16_and_fp32_sampling_of_the_same_seeds_agree():
    """Stated tolerance: RMS difference < 0.005 per pixel (images in [-1, 1]; one 8-bit level is 2/255 = 0.0078),
    max < 0.05 for the exact predictor and < 0.25 for the random UNet. Measured with a CPU's bf16: exact predictor
    RMS <= 0.0025, max <= 0.02 (K = 10 and 100, all three methods); random tiny UNet (DDPM-type methods) RMS 0.0023,
    max 0.064 (an untrained network is not smooth: a few pixels move further). DDIM is left out for the random UNet:
    its deterministic sampler amplifies any perturbation through an untrained network's large Jacobian."""
    from analytic_dpm.accel import prepare_eps_model

    sched = NoiseSchedule.linear(1000)
    oracle = GaussianOracle(sched, 0.0, 0.5, (3, 16, 16))
    cases = [(_BF16RoundedOracle(oracle, 3).cuda(), m, K) for m in ("ddim", "ddpm_beta_tilde", "analytic_ddpm")
             for K in (10, 100)]
    cases += [(_random_tiny_unet(), m, 10) for m in ("ddpm_beta_tilde", "analytic_ddpm")]
    for net, method, K in cases:
        out = {}
        for precision in ("fp32", "bf16"):
            model = prepare_eps_model(net, precision=precision, compile=False)
            gen = torch.Generator(device="cuda").manual_seed(1)
            out[precision] = sample(model, sched, make_trajectory("even", 1000, K), method, (64, 3, 16, 16),
                                    gamma=oracle.gamma(), generator=gen, device="cuda")
        diff = (out["fp32"] - out["bf16"]).abs()
        assert diff.max() > 0, "bf16 did not change anything: autocast is not reaching the network"
        max_tol = 0.05 if isinstance(net, _BF16RoundedOracle) else 0.25
        rms = float(diff.pow(2).mean().sqrt())
        assert rms < 0.005 and diff.max() < max_tol, (type(net).__name__, method, K, rms, float(diff.max()))


def test_compiled_network_on_cuda_matches_eager_without_recompiling():
    from analytic_dpm.accel import prepare_eps_model

    net = _random_tiny_unet()
    x = torch.randn(32, 3, 16, 16, device="cuda")
    t = torch.randint(1, 1001, (32,), device="cuda")
    with torch.no_grad():
        for precision, tol in (("fp32", 1e-4), ("bf16", 2e-2)):
            eager = prepare_eps_model(net, precision=precision, compile=False)(x, t)
            for mode in (None, "reduce-overhead"):
                torch._dynamo.reset()
                model = prepare_eps_model(net, precision=precision, compile=True, mode=mode)
                outs = [model(x, t), model(x[:7], t[:7]), model(x, t), model(x[:7], t[:7])]
                assert model.compiled, model.fallback_reason
                assert len(model.compile_events) == 1 and model.static_batch == 32  # no recompile for the 7
                torch.testing.assert_close(outs[2], eager, atol=tol, rtol=tol)
                torch.testing.assert_close(outs[3], eager[:7], atol=tol, rtol=tol)
                torch.testing.assert_close(outs[0], outs[2])  # CUDA graphs: earlier outputs are not overwritten


def test_training_step_does_not_synchronise():
    """training_step + backward + clipping + fused AdamW + EMA with torch.cuda.set_sync_debug_mode('error') around the
    module's own code, off logging steps."""
    from types import SimpleNamespace

    from analytic_dpm.training import DiffusionModule

    net_cfg = {"_target_": "analytic_dpm.nets.UNet", "in_channels": 3, "image_size": 16, "base_channels": 32,
               "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8], "dropout": 0.1}
    module = DiffusionModule(net_cfg, N=1000, lr=1e-4).cuda()
    module._trainer = SimpleNamespace(log_every_n_steps=100, world_size=1, global_rank=0,
                                      _logger_connector=SimpleNamespace(should_update_logs=False))
    opt = module.configure_optimizers()  # module.fused_optimizer=auto: the fused AdamW on CUDA
    assert opt.defaults["fused"] is True
    batch = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8).cuda()
    def no_sync(fn, *args):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # raises on any synchronising call inside the module's own code
        try:
            return fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    for i in range(3):  # the first step creates the loss window, the later ones add to it
        loss = no_sync(module.training_step, batch, i)
        loss.backward()
        no_sync(module.configure_gradient_clipping, opt, 1.0, "norm")  # the module clips for a fused AdamW
        opt.step()
        opt.zero_grad(set_to_none=True)
        no_sync(module.update_ema)
        no_sync(module.on_train_batch_end, loss, batch, i)
    mean, count = module._read_window()
    assert count == 3 and 0 < mean < 10


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_bf16_attention_on_cuda_stays_close():
    """attention_float32=False under bf16 autocast: SDPA's bf16 kernels (flash / memory-efficient), which also round
    the softmax probabilities to bf16. Stated tolerance: relative L2 < 3e-2 to the float32-attention bf16 network
    (CPU, where SDPA accumulates bf16 in float32, the two are identical)."""
    from analytic_dpm.nets import set_attention_float32

    net = _random_tiny_unet()
    x = torch.randn(64, 3, 16, 16, device="cuda")
    t = torch.randint(1, 1001, (64,), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = net(x, t)
        set_attention_float32(net, False)
        out = net(x, t)
    set_attention_float32(net, True)
    assert out.dtype == ref.dtype == torch.float32 and torch.isfinite(out).all()
    assert _rel(out, ref) < 3e-2, _rel(out, ref)


def test_inception_feature_options_on_cuda(random_inception_weights):
    """fp32 (TF32 off), tf32, bf16 and channels_last features of the same images on CUDA: tf32 and bf16 move them a
    little (stated tolerances: relative L2 < 1e-2 for tf32, < 5e-2 for bf16), channels_last only by rounding
    (< 1e-4); the global TF32 switches are unchanged afterwards."""
    from analytic_dpm import accel
    from analytic_dpm.fid.metrics import InceptionFeatures

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    before = accel._read_tf32()
    fp32 = InceptionFeatures(random_inception_weights, device="cuda", batch_size=8, check_hash=False)
    ref = fp32(images)
    for precision, tol in (("tf32", 1e-2), ("bf16", 5e-2)):
        ext = InceptionFeatures(random_inception_weights, batch_size=8, precision=precision, check_hash=False,
                                model=fp32.model)
        assert _rel(ext(images), ref) < tol, precision
    cl = InceptionFeatures(random_inception_weights, device="cuda", batch_size=8, channels_last=True,
                           check_hash=False)
    assert _rel(cl(images), ref) < 1e-4
    assert accel._read_tf32() == before
