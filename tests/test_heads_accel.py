"""PreparedEpsModel (accel.py) passes a head model's (eps_hat, head) through: precision, float32 cast, static-batch
padding and chunking for both outputs, and the model's head_kind."""

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from analytic_dpm import NoiseSchedule, estimate_gamma, nll_bpd, sample
from analytic_dpm.accel import prepare_eps_model
from analytic_dpm.oracles import GaussianOracle


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class MicroHead(nn.Module):
    """Rows independent; one conv gives [eps_hat, raw head]; the NPR head is softplus(raw) (our parameterisation)."""

    head_kind = "npr"

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x, t):
        out = self.conv(x) * torch.cos(t.float() / 50)[:, None, None, None]
        return out[:, :1], nn.functional.softplus(out[:, 1:])


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(1, 1001, (n,), generator=g)


def test_fp32_and_bf16_head_outputs():
    net = MicroHead().eval()
    x, t = _inputs(6)
    with torch.no_grad():
        ref = net(x, t)
        fp32 = prepare_eps_model(net, precision="fp32")(x, t)
        bf16 = prepare_eps_model(net, precision="bf16")(x, t)
    assert isinstance(fp32, tuple) and len(fp32) == 2
    assert all(torch.equal(a, b) for a, b in zip(fp32, ref))
    for a, b in zip(bf16, ref):
        assert a.dtype == torch.float32 and a.shape == b.shape
        rel = (a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()
        assert 0 < rel < 0.03, rel  # bf16 really ran on both outputs and stays close
    assert prepare_eps_model(net).head_kind == "npr"
    assert prepare_eps_model(lambda x, t: x).head_kind is None


def test_static_batch_padding_and_chunks_for_both_outputs():
    net = MicroHead().eval()
    counter = CompileCounterWithBackend("eager")
    prepared = prepare_eps_model(net, compile=True, static_batch=8, backend=counter)
    x, t = _inputs(11)
    with torch.no_grad():
        ref = net(x, t)
        part = prepared(x[:3], t[:3])  # padded to 8, sliced back
        full = prepared(x, t)  # chunks 8 + 3
    for got, want in ((part, tuple(r[:3] for r in ref)), (full, ref)):
        assert isinstance(got, tuple) and len(got) == 2
        for a, b in zip(got, want):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert counter.frame_count == 1 and prepared.static_batch == 8


def test_core_functions_run_a_prepared_head_model():
    sched = NoiseSchedule.linear(1000)
    oracle = GaussianOracle(sched, 0.0, torch.linspace(0.1, 0.8, 16).reshape(1, 4, 4), (1, 4, 4))
    head = oracle.head_model("sn")
    prepared = prepare_eps_model(head, compile=True, static_batch=16, backend="eager")
    assert prepared.head_kind == "sn"
    x = sample(prepared, sched, [1, 500, 1000], "sn_ddpm", (5, 1, 4, 4), generator=torch.Generator().manual_seed(0),
               clip_x0=False, data_range=None)
    y = sample(head, sched, [1, 500, 1000], "sn_ddpm", (5, 1, 4, 4), generator=torch.Generator().manual_seed(0),
               clip_x0=False, data_range=None)
    torch.testing.assert_close(x, y, rtol=0, atol=0)
    x0 = oracle.sample_data(7)
    a = nll_bpd(prepared, sched, [1, 500, 1000], x0, ["sn_ddpm", "ddpm_beta"], batch_size=16)
    b = nll_bpd(head, sched, [1, 500, 1000], x0, ["sn_ddpm", "ddpm_beta"], batch_size=16)
    for m in a:
        torch.testing.assert_close(a[m], b[m], rtol=0, atol=0)
    g1 = estimate_gamma(prepared, sched, oracle.sample_data, 2, 500, progress=False)
    g2 = estimate_gamma(oracle, sched, oracle.sample_data, 2, 500, progress=False)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)  # a head model's eps_hat is the plain model's
