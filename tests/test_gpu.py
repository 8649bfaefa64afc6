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
