"""Schedules and pair quantities (spec sections 0-1): golden values and internal consistency."""

import math

import pytest
import torch

from analytic_dpm import NoiseSchedule


def test_linear_golden_values():
    s = NoiseSchedule.linear(1000)
    assert s.N == 1000 and s.betas.dtype == torch.float64 and s.betas.numel() == 1001
    assert s.betas[0] == 0 and s.alphas_cumprod[0] == 1 and s.bbar[0] == 0
    assert s.betas[1].item() == pytest.approx(1e-4, rel=1e-12)
    assert s.betas[1000].item() == pytest.approx(0.02, rel=1e-12)
    assert s.betas[2].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / 999, rel=1e-12)
    # abar_N of the DDPM linear schedule (known value ~4.04e-5)
    assert s.alphas_cumprod[1000].item() == pytest.approx(4.0358e-05, rel=1e-3)
    # 1000/N scaling
    s4 = NoiseSchedule.linear(4000)
    assert s4.betas[1].item() == pytest.approx(2.5e-5, rel=1e-12)
    assert s4.betas[4000].item() == pytest.approx(0.005, rel=1e-12)


def test_cosine_golden_values():
    s = NoiseSchedule.cosine(4000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for n in (1, 2, 1000, 3999):
        assert s.betas[n].item() == pytest.approx(1 - f(n / 4000) / f((n - 1) / 4000), rel=1e-10)
    assert s.betas[4000].item() == pytest.approx(0.999)  # clipped at 0.999
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))


def test_pair_quantities_consistent_and_stable():
    s = NoiseSchedule.linear(1000)
    t = torch.arange(1, 1001)
    # beta_{t|t-1} is beta_t itself, to float64 precision even for tiny betas
    assert torch.allclose(s.beta_ts(t - 1, t), s.betas[1:], rtol=1e-12, atol=0)
    # cumulative form sum_{i=s+1..t} beta_i alpha_{t|i} (spec section 0)
    for a, b in [(1, 2), (3, 17), (100, 900), (0, 1000), (999, 1000)]:
        cum = sum(s.betas[i].item() * s.alpha_ts(i, b).item() for i in range(a + 1, b + 1))
        assert s.beta_ts(a, b).item() == pytest.approx(cum, rel=1e-10)
        assert s.alpha_ts(a, b).item() == pytest.approx(
            s.alphas_cumprod[b].item() / s.alphas_cumprod[a].item(), rel=1e-12)
    # btilde_{s|t} = beta_{t|s} bbar_s / bbar_t; btilde_{0|t} = 0
    assert s.btilde(0, 10).item() == 0.0
    b1, b2 = s.betas[1].item(), s.betas[2].item()
    expected = b2 * b1 / (1 - (1 - b1) * (1 - b2))
    assert s.btilde(1, 2).item() == pytest.approx(expected, rel=1e-12)


def test_linear_small_N_rejected_with_clear_error():
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        NoiseSchedule.linear(20)  # beta_N = 0.02 * 1000/20 = 1
    NoiseSchedule.linear(25)  # fine: beta_N = 0.8
    with pytest.raises(ValueError, match="positive integer"):
        NoiseSchedule.linear(0)
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule.from_name("sigmoid", 100)
