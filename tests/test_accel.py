"""Evaluation-path speed options (issue 9): precision, torch.compile with static shapes, fallback; the GPU benchmark's
CPU smoke run. The real inductor comparison is slow-marked (a cold inductor compile takes minutes on 2 CPU cores);
the fast tests compile with Dynamo's eager / aot_eager backends, which trace exactly the graph inductor would get."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from analytic_dpm import NoiseSchedule, estimate_gamma, make_trajectory, nll_bpd, sample
from analytic_dpm.accel import (
    AccelSettings,
    CompileFallbackWarning,
    PreparedEpsModel,
    precision_scope,
    prepare_eps_model,
    resolve_settings,
    tf32_scope,
)
from analytic_dpm.nets import UNet
from analytic_dpm.oracles import GaussianOracle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_unet(seed: int = 0) -> UNet:
    """conf/model/unet_tiny.yaml's network at 1x8x8, with the zero-initialised convs re-drawn so every block
    (res-blocks, time embedding, middle attention) shapes the output."""
    torch.manual_seed(seed)
    net = UNet(in_channels=1, image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(), dropout=0.0, num_heads=1)
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.05)
    return net.eval()


class Micro(nn.Module):
    """A small predictor whose rows are independent: conv(x) modulated by t."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * torch.cos(t.float() / 50)[:, None, None, None]


def inputs(n: int, shape=(1, 8, 8), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(1, 1001, (n,), generator=g)


# ------------------------------------------------------------------------------------------- precision
def test_every_precision_runs_on_cpu_and_bf16_stays_close():
    net = tiny_unet()
    x, t = inputs(6)
    with torch.no_grad():
        ref = net(x, t)
        assert ref.std() > 0.1 and not torch.allclose(net(x, t.flip(0)), ref)  # output depends on t
        out = {p: prepare_eps_model(net, precision=p)(x, t) for p in ("fp32", "tf32", "bf16")}
    for p, y in out.items():
        assert y.dtype == torch.float32 and y.shape == x.shape, p
    assert torch.equal(out["fp32"], ref)  # fp32 eager is the network itself
    assert torch.allclose(out["tf32"], ref, atol=1e-6)  # TF32 has no effect on a CPU
    rel = (out["bf16"] - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
    assert 0 < rel < 0.03, rel  # bf16 really ran (not equal) and stays within 3% RMS of fp32


def test_tf32_switches_are_scoped_and_restored():
    seen = {}

    def spy(x, t):
        seen["matmul"] = torch.get_float32_matmul_precision()
        seen["cudnn"] = torch.backends.cudnn.allow_tf32
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return x

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    x, t = inputs(2)
    prepare_eps_model(spy, precision="tf32")(x, t)
    assert seen == {"matmul": "high", "cudnn": True, "autocast": False}
    prepare_eps_model(spy, precision="fp32")(x, t)
    assert seen == {"matmul": "highest", "cudnn": False, "autocast": False}
    prepare_eps_model(spy, precision="bf16")(x, t)
    assert seen == {"matmul": "highest", "cudnn": False, "autocast": True}
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
    # restored after an error too, and from a non-default starting state
    torch.set_float32_matmul_precision("medium")
    try:
        with pytest.raises(ZeroDivisionError), tf32_scope(False):
            assert torch.get_float32_matmul_precision() == "highest"
            raise ZeroDivisionError
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before[0])


def test_precision_overrides_an_outer_autocast():
    net = tiny_unet()
    x, t = inputs(4)
    with torch.no_grad():
        ref = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. Lightning's bf16-mixed around a calibration
            y = prepare_eps_model(net, precision="fp32")(x, t)
            with precision_scope("fp32", "cpu"):
                z = net(x, t)
    assert torch.equal(y, ref) and torch.equal(z, ref)


# ------------------------------------------------------------------------------------------- compile
def test_compiled_tiny_unet_matches_eager_without_recompiling():
    net = tiny_unet()
    counter = CompileCounterWithBackend("aot_eager")  # Dynamo + AOTAutograd: the graph inductor would compile
    prepared = prepare_eps_model(net, compile=True, backend=counter)
    assert prepared.compiled and prepared.settings.identity() == {"precision": "fp32", "compile": "default"}
    x, t = inputs(8)
    with torch.no_grad():
        ref = net(x, t)
        full = prepared(x, t)
        part = prepared(x[:3], t[:3])  # the last partial batch of a loop
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part, ref[:3], atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1 and prepared.static_batch == 8
    assert len(prepared.compile_events) == 1 and prepared.compile_seconds > 0
    assert prepared.record()["compile"] == "default" and prepared.record()["compile_fallback"] is None


def test_padding_is_exact_and_never_recompiles():
    net = Micro().eval()
    counter = CompileCounterWithBackend("eager")
    prepared = prepare_eps_model(net, compile=True, backend=counter)
    x, t = inputs(6, (2, 5, 5))
    with torch.no_grad():
        for n in (6, 2, 6, 5, 1):
            y = prepared(x[:n], t[:n])
            pad_x = torch.cat([x[:n], x[n - 1:n].expand(6 - n, 2, 5, 5)])
            pad_t = torch.cat([t[:n], t[n - 1:n].expand(6 - n)])
            assert torch.equal(y, net(pad_x, pad_t)[:n])  # exactly the unpadded rows of the padded call
            torch.testing.assert_close(y, net(x[:n], t[:n]))
        assert torch.equal(prepared(x, 500), net(x, torch.full((6,), 500)))  # a scalar t is broadcast
    assert counter.frame_count == 1, "a partial batch must not recompile"


def test_fixed_static_batch_runs_in_chunks():
    net = Micro().eval()
    counter = CompileCounterWithBackend("eager")
    prepared = prepare_eps_model(net, compile=True, backend=counter, static_batch=4)
    x, t = inputs(10, (2, 5, 5))
    with torch.no_grad():
        y = prepared(x, t)  # 4 + 4 + 2 (padded to 4)
        torch.testing.assert_close(y, net(x, t))
    assert counter.frame_count == 1 and prepared.static_batch == 4


def test_eager_cpu_calls_run_in_chunks_with_the_same_numbers():
    """On a CPU an eager call of more than CPU_CHUNK rows runs in chunks (cache-sized activations): the network sees
    no call above CPU_CHUNK rows, and the output equals one whole call, for a noise predictor and a head model."""
    from analytic_dpm.accel import CPU_CHUNK

    net = tiny_unet()
    sizes = []

    def head_model(x, t):
        sizes.append(x.shape[0])
        eps = net(x, t)
        return eps, eps.square()

    head_model.head_kind = "sn"
    n = 2 * CPU_CHUNK + 5
    x, t = inputs(n)
    prepared = prepare_eps_model(head_model, compile=False, device="cpu")
    assert prepared.head_kind == "sn"
    with torch.no_grad():
        eps, head = prepared(x, t)
        whole = net(x, t)
    assert sizes == [CPU_CHUNK, CPU_CHUNK, 5]
    torch.testing.assert_close(eps, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head, whole.square(), rtol=1e-5, atol=1e-6)
    sizes.clear()
    with torch.no_grad():
        prepared(x[:CPU_CHUNK], t[:CPU_CHUNK])
    assert sizes == [CPU_CHUNK]


def test_auto_static_batch_grows_to_the_largest_seen():
    net = Micro().eval()
    counter = CompileCounterWithBackend("eager")
    prepared = prepare_eps_model(net, compile=True, backend=counter)
    x, t = inputs(8, (2, 5, 5))
    with torch.no_grad():
        for n in (3, 8, 5, 8, 1):
            torch.testing.assert_close(prepared(x[:n], t[:n]), net(x[:n], t[:n]))
    assert counter.frame_count == 2 and [size for size, _ in prepared.compile_events] == [3, 8]


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler on this machine")


def test_compile_failure_falls_back_to_eager_with_a_warning():
    net = Micro().eval()
    prepared = prepare_eps_model(net, compile=True, backend=_broken_backend)
    x, t = inputs(4, (2, 5, 5))
    with pytest.warns(CompileFallbackWarning, match="no C\\+\\+ compiler.*runs eagerly"), torch.no_grad():
        y = prepared(x, t)
    assert torch.equal(y, net(x, t)) and not prepared.compiled
    assert prepared.record()["compile"] == "off" and "no C++ compiler" in prepared.record()["compile_fallback"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls are plain eager, silently
        with torch.no_grad():
            assert torch.equal(prepared(x[:2], t[:2]), net(x[:2], t[:2]))


def test_torch_compile_unavailable_falls_back(monkeypatch):
    def no_dynamo(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", no_dynamo)
    with pytest.warns(CompileFallbackWarning, match="Dynamo is not supported"):
        prepared = prepare_eps_model(Micro().eval(), compile=True)
    assert not prepared.compiled
    x, t = inputs(2, (2, 5, 5))
    with torch.no_grad():
        assert prepared(x, t).shape == x.shape


def test_a_bad_input_is_not_blamed_on_compile():
    counter = CompileCounterWithBackend("eager")
    prepared = prepare_eps_model(Micro().eval(), compile=True, backend=counter)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        with pytest.raises(RuntimeError, match="channels"), torch.no_grad():
            prepared(torch.randn(2, 3, 5, 5), torch.tensor([1, 2]))  # 3 channels into a 2-channel conv
    assert prepared.compiled and prepared.static_batch is None  # the input was wrong, not the compiler


def test_settings_validation_and_defaults():
    assert resolve_settings(device="cpu").compile is False  # auto: off on a CPU
    assert resolve_settings(device="cuda").compile is True  # auto: on for CUDA (decided without a GPU)
    s = resolve_settings(device="cuda", precision="bf16", mode="reduce-overhead", static_batch=256)
    assert s == AccelSettings("bf16", True, "reduce-overhead", 256, "cuda", "inductor")
    assert s.identity() == {"precision": "bf16", "compile": "reduce-overhead"} and s.as_dict()["static_batch"] == 256
    assert resolve_settings(device="cuda", compile="off").identity() == {"precision": "fp32", "compile": "off"}
    with pytest.warns(CompileFallbackWarning, match="CUDA graphs"):
        assert resolve_settings(device="cpu", compile=True, mode="reduce-overhead").mode is None
    for bad in ({"precision": "fp16"}, {"mode": "fast"}, {"static_batch": 0}, {"compile": "maybe"},
                {"precision": "bf16", "device": "meta"}):
        with pytest.raises(ValueError):
            resolve_settings(**{"device": "cpu", **bad})
    with pytest.raises(TypeError, match="callable"):
        prepare_eps_model(42)
    prepared = prepare_eps_model(Micro(), precision="bf16")
    again = prepare_eps_model(prepared, precision="fp32")  # re-wrapping unwraps first
    assert isinstance(again.eps_model, Micro) and again.settings.precision == "fp32"


def test_core_functions_take_prepared_models_unchanged():
    sched = NoiseSchedule.linear(100)
    oracle = GaussianOracle(sched, 0.0, 0.5, (1, 4, 4))  # no parameters: the device comes from the caller
    traj = make_trajectory("even", 100, 5)
    gamma = oracle.gamma()
    x0 = oracle.sample_data(10, torch.Generator().manual_seed(2))

    def run(model):
        g = torch.Generator().manual_seed(0)
        xs = sample(model, sched, traj, "analytic_ddpm", (6, 1, 4, 4), gamma=gamma, generator=g, clip_x0=False,
                    data_range=None)
        bpd = nll_bpd(model, sched, traj, x0, ["analytic_ddpm"], gamma=gamma, decoder="continuous",
                      decoder_variance="method", clip_x0=False, data_range=None, batch_size=7,
                      generator=torch.Generator().manual_seed(1))
        gam = estimate_gamma(model, sched, x0, 2, 64, generator=torch.Generator().manual_seed(3), progress=False)
        return xs, bpd["analytic_ddpm"], gam

    ref = run(oracle)
    prepared = prepare_eps_model(oracle, device="cpu")
    for a, b in zip(ref, run(prepared)):
        assert torch.equal(a, b)
    # a UNet: the core finds its device through the wrapper's parameters
    net = tiny_unet()
    prepared = prepare_eps_model(net, precision="bf16")
    assert next(prepared.parameters()).device.type == "cpu" and isinstance(prepared, PreparedEpsModel)
    xs = sample(prepared, NoiseSchedule.linear(1000), make_trajectory("even", 1000, 3), "ddim", (2, 1, 8, 8),
                generator=torch.Generator().manual_seed(0))
    assert xs.shape == (2, 1, 8, 8) and torch.isfinite(xs).all()


@pytest.mark.slow
def test_inductor_compiled_tiny_unet_matches_eager():
    """The real compiler on a CPU (minutes when its cache is cold)."""
    net = tiny_unet()
    x, t = inputs(8)
    with torch.no_grad():
        for precision, tol in (("fp32", 1e-4), ("bf16", 3e-2)):
            torch._dynamo.reset()
            prepared = prepare_eps_model(net, precision=precision, compile=True)
            y, part = prepared(x, t), prepared(x[:5], t[:5])
            assert prepared.compiled, prepared.fallback_reason
            eager = prepare_eps_model(net, precision=precision)(x, t)
            torch.testing.assert_close(y, eager, atol=tol, rtol=tol)
            torch.testing.assert_close(part, eager[:5], atol=tol, rtol=tol)
            assert len(prepared.compile_events) == 1


# ------------------------------------------------------------------------------------------- benchmark
def test_bench_gpu_tiny_writes_every_section(tmp_path, capsys):
    """``python bench/bench_gpu.py --tiny --out FILE``, run in this process (saves the imports)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    with torch.random.fork_rng():
        assert bench.main(["--tiny", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["meta"]["tiny"] is True and res["meta"]["device"] == "cpu"
    assert res["matmul"]["bf16_tflops"] > 0
    (name, m), = res["models"].items()
    assert m["parameters"] > 0 and m["flops"]["forward_per_image"] > 0
    assert m["flops"]["train_per_image"] > 2 * m["flops"]["forward_per_image"]
    for key in ("train_plain", "train_project", "forward_fp32_eager", "eval_default", "sample_default"):
        assert m[key].get("images_per_s", 0) > 0, (key, m[key])
    assert m["train_project"]["how"].startswith("Lightning Trainer.fit")
    assert m["eval_default"]["settings"]["precision"] in ("fp32", "tf32", "bf16")
    assert "overhead_vs_network" in m["sample_default"]
    precisions = ("fp32", "tf32", "bf16", "bf16-attn")
    cells = {(c["precision"], c["compile"]): c for c in m["forward_matrix"]}
    assert set(cells) == {(p, c) for p in precisions for c in ("off", "default", "reduce-overhead")}
    assert all(cells[(p, "off")]["images_per_s"] > 0 for p in precisions)
    assert "skipped" in cells[("bf16", "default")]  # no compile on a CPU unless asked
    assert "skipped" in res["fusion"]  # likewise
    variants = m["train_project_variants"]
    assert set(variants) == {"attention bf16", "channels_last", "AdamW foreach"}
    assert variants["attention bf16"]["overrides"] == ["module.attention_float32=false"]
    assert all(v["images_per_s"] > 0 for v in variants.values())
    assert res["table"] and "images/s" in stdout and not res["errors"]
