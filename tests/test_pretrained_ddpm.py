"""DDPM / DDIM ``Model`` checkpoints through ``analytic_dpm.pretrained.load("ddpm", ...)`` (issue 8).

Ground truth: ``tests/fixtures/pretrained/ddpm/``, made by ``tools/make_pretrained_fixtures.py`` with
ermongroup/ddim's and pesser/pytorch_diffusion's own code: an ermongroup/ddim training checkpoint (list, EMA
weights last) with its YAML config, a pytorch_diffusion plain state dict, their outputs on fixed inputs along
their own loading/sampling paths, ddim's betas, and the key/shape manifests of the full-size public networks.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from analytic_dpm import pretrained
from analytic_dpm.pretrained import PretrainedError, ddpm, file_sha256

FIX = Path(__file__).resolve().parent / "fixtures" / "pretrained" / "ddpm"
CKPT, CONFIG, PESSER = FIX / "ddim_tiny_ckpt.pth", FIX / "ddim_tiny.yml", FIX / "pesser_tiny.ckpt"
TOL = 1e-4
LINEAR = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_diffusion_timesteps=1000)
DDIM_OPTIONS = dict(  # the same as ddim_tiny.yml, given as options
    resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
    dropout=0.1, resamp_with_conv=True, **LINEAR,
)  # fmt: skip


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIX / "reference.pt", weights_only=True)


def load(source, **options):
    return pretrained.load("ddpm", source, **options)


def eps(model, x, t) -> torch.Tensor:
    with torch.no_grad():
        return model.eps_model(x, torch.as_tensor(t).expand(x.shape[0]))


def assert_matches(model, part) -> None:
    for t, expected in zip(part["t"], part["out"], strict=True):
        assert (eps(model, part["x"], t) - expected).abs().max() < TOL, int(t)


# --------------------------------------------------------------------------------------------------------
# ermongroup/ddim checkpoints
# --------------------------------------------------------------------------------------------------------
def test_ddim_checkpoint_with_config_reproduces_its_output(ref):
    m = load(CKPT, config=CONFIG)
    assert_matches(m, ref["ddim"])  # its t = i in 0..N-1 is our t - 1
    assert m.timestep_convention == "t - 1" and m.identity["layout"] == "ddim_list:ema"
    assert (m.image_size, m.channels, m.kind) == (16, 3, "ddpm")
    assert not m.eps_model.training and m.options["config"] == str(CONFIG)
    assert m.identity["weights"] == file_sha256(CKPT) and "config" not in m.identity["options"]
    assert m.identity == load(CKPT, **DDIM_OPTIONS, var_type="fixedlarge", ema_rate=0.9999).identity
    json.dumps(m.identity)
    norms = [mod for mod in m.eps_model.modules() if isinstance(mod, torch.nn.GroupNorm)]
    assert norms and all(mod.eps == 1e-6 for mod in norms)  # DDPM's GroupNorm epsilon


def test_options_without_config_are_the_same(ref):
    m = load(CKPT, **DDIM_OPTIONS)
    assert_matches(m, ref["ddim"])
    assert {k: v for k, v in m.options.items() if k in DDIM_OPTIONS} == DDIM_OPTIONS
    # None means "not given": it neither overrides the config nor fails a type check
    assert load(CKPT, config=CONFIG, ch=None, ema_rate=None).options == load(CKPT, config=CONFIG).options


def test_betas_match_ddim_get_beta_schedule(ref):
    m = load(CKPT, config=CONFIG)
    assert m.schedule.betas.dtype == torch.float64 and m.schedule.N == 1000 and m.schedule.name == "linear"
    assert (m.schedule.betas[1:] - ref["ddim"]["betas"]["linear_1000"]).abs().max() < 1e-10
    assert m.schedule.betas[-1].item() == pytest.approx(0.02, abs=1e-15)  # NOT scaled by 1000 / N
    for name in ("quad", "const", "sigmoid"):  # options given alongside config override it
        m = load(CKPT, config=CONFIG, beta_schedule=name, num_diffusion_timesteps=200)
        assert (m.schedule.betas[1:] - ref["ddim"]["betas"][f"{name}_200"]).abs().max() < 1e-10, name
    jsd = torch.from_numpy(ddpm.get_beta_schedule("jsd", beta_start=0.0001, beta_end=0.02, num_diffusion_timesteps=200))
    assert (jsd - ref["ddim"]["betas"]["jsd_200"]).abs().max() < 1e-10
    with pytest.raises(PretrainedError, match=r"beta_schedule='jsd'.*not a usable schedule"):
        load(CKPT, config=CONFIG, beta_schedule="jsd")  # beta_N = 1


def test_training_weights_and_negative_controls(ref):
    part = ref["ddim"]
    training = load(CKPT, config=CONFIG, ema=False)
    assert training.identity["layout"] == "ddim_list:model"
    assert (eps(training, part["x"], 500) - part["out"][1]).abs().max() > 1e-2  # states[0] is not the EMA
    unshifted = load(CKPT, config=CONFIG, timestep_shift=False)
    assert unshifted.timestep_convention == "t"
    assert (eps(unshifted, part["x"], 500) - part["out"][1]).abs().max() > 1e-3


def test_prefixed_ema_and_no_ema_lists(ref, tmp_path):
    states = torch.load(CKPT, weights_only=True)
    assert len(states) == 5 and all(k.startswith("module.") for k in states[0])
    prefixed = [*states[:4], {f"module.{k}": v for k, v in states[4].items()}]  # DataParallel-style EMA keys
    torch.save(prefixed, tmp_path / "prefixed.pth")
    assert_matches(load(tmp_path / "prefixed.pth", config=CONFIG), ref["ddim"])
    torch.save(states[:4], tmp_path / "no_ema.pth")  # model.ema: False in the config -> no EMA item
    with pytest.raises(PretrainedError, match=r"holds no EMA weights.*pass ema=False"):
        load(tmp_path / "no_ema.pth", config=CONFIG)
    load(tmp_path / "no_ema.pth", config=CONFIG, ema=False)


def test_bayesian_model_type(ref, tmp_path):
    """DDIM's type: bayesian adds a learned `logvar` the noise prediction does not use."""
    states = torch.load(CKPT, weights_only=True)
    states[-1] = {**states[-1], "logvar": torch.zeros(1000)}
    torch.save(states, tmp_path / "bayesian.pth")
    with pytest.raises(PretrainedError, match=r"unexpected keys in the file: logvar.*type='simple' \(the weights look "
                                              r"like type='bayesian'\)"):
        load(tmp_path / "bayesian.pth", config=CONFIG)
    assert_matches(load(tmp_path / "bayesian.pth", config=CONFIG, type="bayesian"), ref["ddim"])


# --------------------------------------------------------------------------------------------------------
# pesser/pytorch_diffusion conversions (plain state dicts)
# --------------------------------------------------------------------------------------------------------
def test_pytorch_diffusion_state_dict(ref):
    """One channel, no resampling convs (avg-pool down, nearest up), attention at the full resolution."""
    part = ref["pesser"]
    m = load(PESSER, **part["options"], **LINEAR)
    assert_matches(m, part)
    assert m.identity["layout"] == "state_dict" and (m.image_size, m.channels) == (16, 1)
    assert m.eps_model(part["x"], part["t"]).shape == part["x"].shape


# --------------------------------------------------------------------------------------------------------
# The public full-size networks: the README's options map every key of their state dicts
# --------------------------------------------------------------------------------------------------------
MANIFESTS = json.loads(gzip.decompress((FIX / "manifests.json.gz").read_bytes()))


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_public_network_keys_map_with_readme_options(name):
    entry = MANIFESTS[name]
    fake = {k: torch.empty(shape, device="meta") for k, shape in entry["keys"]}
    unet, state_dict = ddpm.convert_state_dict(fake, ddpm._complete(entry["options"]))
    assert set(state_dict) == set(unet.state_dict())
    assert sum(p.numel() for p in unet.parameters()) == entry["num_params"]


def test_manifests_cover_the_paper_networks():
    assert {"ddim_celeba64", "pesser_lsun_bedroom", "pesser_cifar10"} <= set(MANIFESTS)
    assert MANIFESTS["pesser_cifar10"]["num_params"] == 35_746_307  # Ho et al.'s CIFAR-10 network


# --------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"num_res_blocks": 2}, r"keys missing.*Probably wrong: num_res_blocks=2 \(the weights look like "
                                r"num_res_blocks=1\)"),
        ({"ch_mult": [1, 2, 4]}, r"wrong shape.*ch_mult=\[1, 2, 4\] \(the weights look like ch_mult=\[1, 2, 2\]\)"),
        ({"attn_resolutions": [16]}, r"attn_resolutions=\[16\] \(the weights look like attn_resolutions=\[8\]\)"),
        ({"resamp_with_conv": False}, r"unexpected keys in the file: down\.0\.downsample\.conv\.weight.*"
                                      r"resamp_with_conv=False \(the weights look like resamp_with_conv=True\)"),
        ({"ch": 64}, r"ch=64 \(the weights look like ch=32\)"),
        ({"out_ch": 6}, r"out_ch=6 but in_channels=3"),
        ({"beta_schedule": "cosine"}, r"unknown DDPM/DDIM beta_schedule 'cosine'.*linear"),
        ({"type": "fancy"}, r"unknown DDIM model type 'fancy'"),
        ({"ch_mult": "one"}, r"option ch_mult must be"),
        ({"resolution": 18}, r"image_size=18 cannot be halved 2 times"),
    ],
)  # fmt: skip
def test_refusals(override, match):
    with pytest.raises(PretrainedError, match=match):
        load(CKPT, config=CONFIG, **override)


def test_unknown_and_missing_options():
    with pytest.raises(PretrainedError, match=r"unknown ddpm option\(s\) channels; known options are the Model "
                                              r"arguments \(ch, out_ch, ch_mult"):
        load(CKPT, config=CONFIG, channels=3)
    with pytest.raises(PretrainedError, match=r"missing ddpm option\(s\) ch, out_ch, num_res_blocks, attn_resolutions, "
                                              r"in_channels, resolution, beta_schedule.*config=PATH"):
        load(PESSER)


def test_bad_configs_and_files(tmp_path):
    with pytest.raises(PretrainedError, match=r"DDIM config .* does not exist"):
        load(CKPT, config=tmp_path / "missing.yml")
    (tmp_path / "odd.yml").write_text(CONFIG.read_text().replace("    ema: True\n", "    ema: True\n    heads: 4\n"))
    with pytest.raises(PretrainedError, match=r"keys this adapter does not know: heads"):
        load(CKPT, config=tmp_path / "odd.yml")
    (tmp_path / "no_model.yml").write_text("data:\n  image_size: 16\n")
    with pytest.raises(PretrainedError, match=r"has no `model:` section"):
        load(CKPT, config=tmp_path / "no_model.yml")
    (tmp_path / "code.yml").write_text("model: !!python/object/apply:os.system ['true']\n")  # safe_load refuses tags
    with pytest.raises(PretrainedError, match=r"cannot parse the DDIM config"):
        load(CKPT, config=tmp_path / "code.yml")
    with pytest.raises(PretrainedError, match=r"does not exist"):
        load(tmp_path / "missing.ckpt", config=CONFIG)
    torch.save({"model": {"a": 1}}, tmp_path / "nested.pth")
    with pytest.raises(PretrainedError, match=r"expected a DDPM Model state dict.*holds \['model'\]"):
        load(tmp_path / "nested.pth", config=CONFIG)
