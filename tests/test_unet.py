"""Tests of the DDPM / iDDPM UNet (analytic_dpm.nets.UNet) and its Hydra model configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from analytic_dpm.nets import UNet, timestep_embedding
from analytic_dpm.nets.unet import AttentionBlock, Downsample, ResBlock

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"

# The paper's CIFAR10 network (iDDPM UNet, L_simple, fixed variance).
IDDPM_CIFAR10 = dict(
    in_channels=3, image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3,
    attention_resolutions=[16, 8], dropout=0.3, num_heads=4, use_scale_shift_norm=True,
)  # fmt: skip
# The original DDPM CIFAR10 network.
DDPM_CIFAR10 = dict(
    in_channels=3, image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
    attention_resolutions=[16], dropout=0.1, use_scale_shift_norm=False,
)  # fmt: skip


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta(**kwargs) -> UNet:
    """Build on the meta device: parameter shapes only, no memory or initialisation cost."""
    with torch.device("meta"):
        return UNet(**kwargs)


def tiny(**overrides) -> UNet:
    kwargs = dict(
        in_channels=1, image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=[8], dropout=0.0,
    )  # fmt: skip
    kwargs.update(overrides)
    return UNet(**kwargs)


def perturb_(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add noise to every parameter, so that zero-initialised layers no longer hide anything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


# --------------------------------------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------------------------------------
def test_param_count_iddpm_cifar10_paper_model():
    assert n_params(build_meta(**IDDPM_CIFAR10)) == 52_542_979


def test_param_count_ddpm_cifar10_matches_official_tf_model():
    n = n_params(build_meta(**DDPM_CIFAR10))
    assert n == 35_746_307  # the official DDPM TensorFlow CIFAR10 model
    assert round(n / 1e6, 1) == 35.7  # "35.7M" in the DDPM paper


def test_meta_and_cpu_builds_agree():
    assert n_params(tiny()) == n_params(build_meta(**dict(
        in_channels=1, image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=[8], dropout=0.0,
    )))  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Forward / backward on tiny configs
# --------------------------------------------------------------------------------------------------------
TINY_CASES = {
    "16x16x1": dict(in_channels=1, image_size=16),
    "16x16x3": dict(in_channels=3, image_size=16),
    "28x28x1-fmnist": dict(in_channels=1, image_size=28, channel_mult=(1, 2, 2), attention_resolutions=[7]),
    "scale-shift-heads": dict(in_channels=3, use_scale_shift_norm=True, num_head_channels=32),
    "resblock-updown": dict(in_channels=3, resblock_updown=True, attention_resolutions=[16, 8], num_heads=2),
    "no-conv-resample": dict(
        in_channels=1, image_size=28, channel_mult=(1, 2, 2), attention_resolutions=[7], conv_resample=False
    ),
    "out-channels": dict(in_channels=3, out_channels=6),
}


@pytest.mark.parametrize("overrides", TINY_CASES.values(), ids=TINY_CASES.keys())
def test_forward_backward_shapes(overrides):
    torch.manual_seed(0)
    model = tiny(**overrides)
    c, s = model.in_channels, model.image_size
    x = torch.randn(2, c, s, s)
    t = torch.tensor([1, 1000])
    out = model(x, t)
    assert out.shape == (2, model.out_channels, s, s)
    assert out.dtype == x.dtype
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_output_zero_at_init_then_nonzero_after_one_step():
    torch.manual_seed(0)
    model = tiny(in_channels=3, dropout=0.1)
    x, noise = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    t = torch.randint(1, 1001, (4,))
    out = model(x, t)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv

    # One plain gradient-descent step (done by hand: the first torch.optim step imports Dynamo, ~seconds).
    F.mse_loss(out, noise).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-2 * p.grad
    assert model(x, t).abs().max() > 0


def test_zero_init_of_res_block_and_attention_output_convs():
    model = tiny()
    for name, module in model.named_modules():
        if name.endswith("out_conv") or name.endswith("proj_out") or name == "out.2":
            assert all(torch.count_nonzero(p) == 0 for p in module.parameters()), name


def test_timestep_changes_output():
    torch.manual_seed(0)
    model = tiny(in_channels=3).eval()
    perturb_(model)
    x = torch.randn(1, 3, 16, 16).expand(3, -1, -1, -1)  # same image, three timesteps
    out = model(x, torch.tensor([1, 2, 500]))
    assert not torch.allclose(out[0], out[1])
    assert not torch.allclose(out[1], out[2])
    # Deterministic in eval mode; integer, float and scalar (0-d) timesteps are embedded identically.
    out_again = model(x, torch.tensor([1.0, 2.0, 500.0]))
    assert torch.allclose(out, out_again, atol=1e-6)
    assert torch.allclose(model(x[:1], torch.tensor(500)), out[2:], atol=1e-5, rtol=1e-4)


def test_timestep_embedding():
    t = torch.tensor([0, 1, 1000])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos(0), sin(0)
    assert torch.allclose(emb[1, 0], torch.cos(torch.tensor(1.0)))  # lowest frequency is 1
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = tiny(in_channels=3, attention_resolutions=[16, 8], num_heads=2).eval()
    perturb_(model)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    ref = model(x, t)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last), t)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_runs_attention_in_float32(monkeypatch):
    torch.manual_seed(0)
    model = tiny(in_channels=3).eval()
    perturb_(model)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    ref = model(x, t)

    seen_dtypes = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen_dtypes.append((q.dtype, k.dtype, v.dtype))
        out = sdpa(q, k, v, *args, **kwargs)
        seen_dtypes.append((out.dtype,))
        return out

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.float32  # cast back to the input dtype
    assert seen_dtypes and all(d == torch.float32 for dts in seen_dtypes for d in dts)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


DDPM_OPTIONS = dict(time_embedding="ddpm", downsample_padding="asymmetric", norm_eps=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options", [{}, {**DDPM_OPTIONS, "num_heads": 2, "num_heads_upsample": 1}], ids=["iddpm", "ddpm"]
)
def test_torch_compile_fullgraph(options):
    """No graph breaks (the `eager` backend checks Dynamo tracing without needing a C++ compiler)."""
    torch.manual_seed(0)
    model = tiny(in_channels=1, image_size=28, channel_mult=(1, 2, 2), attention_resolutions=[7], **options).eval()
    perturb_(model)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([1, 999])
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x, t), model(x, t), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------
# Options that make the UNet identical to DDPM / iDDPM (issue 8)
# --------------------------------------------------------------------------------------------------------
def test_emb_act_applies_silu_before_the_projection():
    torch.manual_seed(0)
    block = ResBlock(32, 128, dropout=0.0, out_channels=64, use_scale_shift_norm=True).eval()
    assert block.emb_act is True  # the DDPM / iDDPM architecture is the default
    perturb_(block)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 128)

    def by_hand(act: bool) -> torch.Tensor:  # iDDPM's ResBlock._forward, written out
        h = block.in_conv(F.silu(block.in_norm(x)))
        e = block.emb_proj(F.silu(emb) if act else emb)[:, :, None, None]
        scale, shift = e.chunk(2, dim=1)
        h = F.silu(block.out_norm(h) * (1 + scale) + shift)
        return block.skip(x) + block.out_conv(h)

    with torch.no_grad():
        assert torch.allclose(block(x, emb), by_hand(True), atol=1e-6)
        block.emb_act = False  # networks trained by this project before issue 8
        assert torch.allclose(block(x, emb), by_hand(False), atol=1e-6)
        assert not torch.allclose(by_hand(True), by_hand(False), atol=1e-3)
    blocks = [m for m in tiny(emb_act=False).modules() if isinstance(m, ResBlock)]
    assert blocks and not any(m.emb_act for m in blocks)


def test_ddpm_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 37.0, 999.0])
    emb = timestep_embedding(t, 8, kind="ddpm")
    k = torch.arange(4, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * k / 3)  # DDPM: k / (half - 1), so the last frequency is 1/10000
    args = t.double()[:, None] * freqs
    assert torch.allclose(emb.double(), torch.cat([torch.sin(args), torch.cos(args)], 1), atol=2e-4)
    assert torch.allclose(emb[:, 3], torch.sin(t / 10000.0), atol=1e-6)  # sines first, lowest frequency last
    assert not torch.allclose(emb, timestep_embedding(t, 8))  # iDDPM's differs (cosines first, k / half)
    with pytest.raises(ValueError, match="unknown time embedding"):
        timestep_embedding(t, 8, kind="fourier")


def test_asymmetric_downsample_is_ddpm_same_padding():
    torch.manual_seed(0)
    sym, asym = Downsample(4), Downsample(4, padding="asymmetric")
    asym.op.load_state_dict(sym.op.state_dict())  # same keys (op.weight, op.bias), same weights
    assert set(asym.state_dict()) == set(sym.state_dict()) == {"op.weight", "op.bias"}
    x = torch.randn(2, 4, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), asym.op.weight, asym.op.bias, stride=2)
    assert asym(x).shape == sym(x).shape == (2, 4, 4, 4)
    assert torch.allclose(asym(x), expected, atol=1e-6)
    assert not torch.allclose(asym(x), sym(x), atol=1e-3)
    with pytest.raises(ValueError, match="unknown downsample padding"):
        Downsample(4, padding="reflect")


def test_ddpm_options_reach_every_layer():
    model = tiny(in_channels=3, **DDPM_OPTIONS)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    downs = [m for m in model.modules() if isinstance(m, Downsample)]
    assert downs and all(isinstance(m.pad, torch.nn.ZeroPad2d) and m.op.padding == (0, 0) for m in downs)
    assert model.time_embedding == "ddpm"
    assert n_params(model) == n_params(tiny(in_channels=3))  # parameter-free options
    assert all(m.eps == 1e-5 for m in tiny().modules() if isinstance(m, torch.nn.GroupNorm))


def test_num_heads_upsample():
    model = tiny(in_channels=3, attention_resolutions=[16, 8], num_heads=4, num_heads_upsample=2)
    heads = {name.split(".")[0]: m.num_heads for name, m in model.named_modules() if isinstance(m, AttentionBlock)}
    assert heads == {"input_blocks": 4, "middle_block": 4, "output_blocks": 2}
    assert tiny(num_heads=2, num_heads_upsample=-1).num_heads_upsample == 2  # iDDPM's -1: same as num_heads
    with pytest.raises(ValueError, match="not divisible by num_heads_upsample=3"):
        tiny(num_heads_upsample=3)


def test_attention_qkv_channel_order_is_three_heads_d():
    """The qkv conv's output channels are (3, heads, d): the order the pretrained key mapping relies on."""
    torch.manual_seed(0)
    c, heads = 64, 4
    block = AttentionBlock(c, heads).eval()
    perturb_(block)
    x = torch.randn(2, c, 4, 4)
    with torch.no_grad():
        qkv = block.qkv(block.norm(x)).reshape(2, 3, heads, c // heads, 16)  # (3, heads, d) by construction
        q, k, v = qkv.unbind(1)  # each [B, heads, d, HW]
        w = torch.softmax(torch.einsum("bhdt,bhds->bhts", q, k) / math.sqrt(c // heads), dim=-1)
        h = torch.einsum("bhts,bhds->bhdt", w, v).reshape(2, c, 4, 4)
        assert torch.allclose(block(x), x + block.proj_out(h), atol=1e-5)


def test_model_configs_set_the_issue8_options():
    for path in CONF_DIR.glob("unet_*.yaml"):
        cfg = OmegaConf.load(path)
        assert cfg.emb_act is True, path.name  # stated explicitly: older stored configs lack the key
        ddpm = path.stem in ("unet_cifar10_ddpm", "unet_celeba64")
        expected = ("ddpm", "asymmetric") if ddpm else ("iddpm", "symmetric")
        assert (cfg.time_embedding, cfg.downsample_padding) == expected, path.name


# --------------------------------------------------------------------------------------------------------
# Invalid configurations
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(attention_resolutions=[4]), r"attention_resolutions \[4\] are not feature-map resolutions"),
        (dict(attention_resolutions="16,5"), r"attention_resolutions \[5\]"),
        (dict(base_channels=48), r"multiple of 32 for GroupNorm"),
        (dict(base_channels=16, channel_mult=(2, 3)), r"offending channel counts: \[48\]"),
        (dict(image_size=18, channel_mult=(1, 2, 2)), r"cannot be halved 2 times"),
        (dict(channel_mult=()), r"channel_mult must be a non-empty"),
        (dict(num_res_blocks=0), r"num_res_blocks must be >= 1"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(num_heads=3), r"not divisible by num_heads=3"),
        (dict(num_head_channels=24), r"not divisible by num_head_channels=24"),
        (dict(in_channels=0), r"must be positive"),
    ],
)
def test_invalid_options_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError):
        tiny(num_levels=3)


# --------------------------------------------------------------------------------------------------------
# Hydra configs
# --------------------------------------------------------------------------------------------------------
CONFIG_CASES = {
    # file: (data config, expected parameter count or None)
    "unet_cifar10_iddpm": ({"channels": 3, "image_size": 32}, 52_542_979),
    "unet_cifar10_ddpm": ({"channels": 3, "image_size": 32}, 35_746_307),
    "unet_celeba64": ({"channels": 3, "image_size": 64}, 78_700_803),
    "unet_imagenet64": ({"channels": 3, "image_size": 64}, 121_060_483),
    "unet_small": ({"channels": 1, "image_size": 28}, 1_062_497),
    "unet_tiny": ({"channels": 1, "image_size": 16}, 651_041),
}


def test_every_model_config_is_tested():
    unets = {p.stem for p in CONF_DIR.glob("*.yaml") if not p.stem.startswith("oracle_")}  # oracles: evaluation only
    assert unets == set(CONFIG_CASES)


@pytest.mark.parametrize("name", CONFIG_CASES)
def test_model_config_instantiates(name):
    data, expected = CONFIG_CASES[name]
    path = CONF_DIR / f"{name}.yaml"
    assert path.read_text().startswith("# ")  # a description line with the parameter count
    model_cfg = OmegaConf.load(path)
    assert model_cfg._target_ == "analytic_dpm.nets.UNet"
    cfg = OmegaConf.create({"data": data, "model": model_cfg})
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert isinstance(model, UNet)
    assert model.in_channels == model.out_channels == data["channels"]
    assert n_params(model) == expected
    assert f"{expected:,}" in path.read_text().splitlines()[0]


@pytest.mark.parametrize(("name", "channels", "size"), [("unet_tiny", 3, 32), ("unet_small", 1, 28)])
def test_small_configs_run_forward(name, channels, size):
    cfg = OmegaConf.create(
        {
            "data": {"channels": channels, "image_size": size},
            "model": OmegaConf.load(CONF_DIR / f"{name}.yaml"),
        }
    )
    model = instantiate(cfg.model)
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([1, 1000])).shape == x.shape
