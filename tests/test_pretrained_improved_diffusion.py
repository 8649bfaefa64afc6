"""improved-diffusion and official Analytic-DPM checkpoints through ``analytic_dpm.pretrained.load`` (issue 8).

Ground truth: ``tests/fixtures/pretrained/{improved_diffusion,analytic_dpm_official}/``, made by
``tools/make_pretrained_fixtures.py`` with openai/improved-diffusion's and baofff/Analytic-DPM's own code: tiny
random-weight networks in those projects' on-disk layouts, their outputs on fixed inputs along their own
sampling paths, their betas, and the key/shape manifests of the full-size public networks.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from analytic_dpm import pretrained
from analytic_dpm.pretrained import PretrainedError, file_sha256
from analytic_dpm.pretrained import improved_diffusion as iddpm

FIX = Path(__file__).resolve().parent / "fixtures" / "pretrained"
IDDPM = FIX / "improved_diffusion"
OFFICIAL = FIX / "analytic_dpm_official"
TOL = 1e-4  # max abs difference to the reference implementation's output


@pytest.fixture(scope="module")
def ref():
    return torch.load(IDDPM / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def official_ref():
    return torch.load(OFFICIAL / "reference.pt", weights_only=True)


def load(source, **flags):
    return pretrained.load("improved_diffusion", source, **flags)


def eps(model, x, t) -> torch.Tensor:
    with torch.no_grad():
        return model.eps_model(x, torch.as_tensor(t).expand(x.shape[0]))


# --------------------------------------------------------------------------------------------------------
# improved-diffusion state dicts
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rescale", "key"), [(True, "out_rescaled"), (False, "out_plain")])
def test_reproduces_improved_diffusion_output(ref, rescale, key):
    """learn_sigma network; rescale_timesteps on (their default: (t-1) * 1000/N, float) and off (t - 1)."""
    m = load(IDDPM / "tiny_learn_sigma.pt", **ref["flags"], rescale_timesteps=rescale)
    with torch.no_grad():
        raw = m.eps_model.net(ref["x"], m.eps_model.network_timestep(ref["t"]))
        out = m.eps_model(ref["x"], ref["t"])
    assert raw.shape[1] == ref["out_channels"] == 6  # learn_sigma: eps and the variance interpolation
    assert out.shape == ref["x"].shape  # the adapter keeps the first C channels: epsilon
    assert (out - ref[key]).abs().max() < TOL
    expected = "(t - 1) * 1000 / 2000" if rescale else "t - 1"
    assert m.timestep_convention == expected == m.identity["timestep_convention"]


def test_rescale_pair_is_a_real_difference(ref):
    # t = 1 is fed 0 under both conventions, t = N is fed 1999 vs 999.5: the two references must differ there
    assert torch.allclose(ref["out_rescaled"][0], ref["out_plain"][0])
    assert (ref["out_rescaled"][1] - ref["out_plain"][1]).abs().max() > 0.05
    m = load(IDDPM / "tiny_learn_sigma.pt", **ref["flags"], rescale_timesteps=False)
    assert (eps(m, ref["x"][1:], 2000) - ref["out_rescaled"][1:]).abs().max() > 0.05


def test_betas_match_get_named_beta_schedule(ref):
    m = load(IDDPM / "tiny_learn_sigma.pt", **ref["flags"])
    assert m.schedule.betas.dtype == torch.float64 and m.schedule.N == 2000 and m.schedule.betas[0] == 0
    assert (m.schedule.betas[1:] - ref["betas"]["cosine_2000"]).abs().max() < 1e-10
    linear = torch.from_numpy(iddpm.get_named_beta_schedule("linear", 500))  # scaled by 1000 / N = 2
    assert (linear - ref["betas"]["linear_500"]).abs().max() < 1e-10
    assert abs(linear[-1].item() - 0.04) < 1e-15


def test_without_learn_sigma(ref, tmp_path):
    """The same network with 3 output channels (its out conv's first 3 filters) gives the first 3 channels."""
    sd = torch.load(IDDPM / "tiny_learn_sigma.pt", weights_only=True)
    sd["out.2.weight"], sd["out.2.bias"] = sd["out.2.weight"][:3].clone(), sd["out.2.bias"][:3].clone()
    torch.save(sd, tmp_path / "eps_only.pt")
    m = load(tmp_path / "eps_only.pt", **{**ref["flags"], "learn_sigma": False})
    assert m.eps_model.net.out_channels == 3
    assert (m.eps_model(ref["x"], ref["t"]) - ref["out_rescaled"]).abs().max() < TOL


def test_model_facts_options_and_identity(ref):
    path = IDDPM / "tiny_learn_sigma.pt"
    m = load(path, **ref["flags"])
    assert not m.eps_model.training and not m.eps_model.net.training
    assert next(m.eps_model.parameters()).device.type == "cpu"
    assert (m.image_size, m.channels, m.kind, m.source) == (32, 3, "improved_diffusion", str(path))
    # completed exactly as its scripts do: model_and_diffusion_defaults() + the flags given
    assert m.options["rescale_timesteps"] is True and m.options["use_scale_shift_norm"] is True
    assert m.options["num_heads"] == 4 and m.options["num_heads_upsample"] == 2
    assert m.options["sigma_small"] is False and m.options["timestep_respacing"] == ""
    assert m.options["timestep_shift"] is True  # a plain improved-diffusion state dict
    assert set(iddpm.DEFAULTS) <= set(m.options)
    assert m.identity["kind"] == "improved_diffusion" and m.identity["weights"] == file_sha256(path)
    assert m.identity["options"] == m.options and m.identity["layout"] == "state_dict"
    json.dumps(m.identity)  # JSON-able
    norms = [mod for mod in m.eps_model.modules() if isinstance(mod, torch.nn.GroupNorm)]
    assert norms and all(mod.eps == 1e-5 for mod in norms)
    # the decoder's attention blocks use num_heads_upsample, the encoder's num_heads
    heads = {n.split(".")[0]: mod.num_heads for n, mod in m.eps_model.net.named_modules() if hasattr(mod, "qkv")}
    assert heads == {"input_blocks": 4, "middle_block": 4, "output_blocks": 2}


def test_flag_values_as_strings_and_lists(ref):
    """Values pasted from its command line (str2bool strings, comma strings) or given by Hydra (lists)."""
    flags = {k: str(v) for k, v in ref["flags"].items()}
    m1 = load(IDDPM / "tiny_learn_sigma.pt", **flags)
    m2 = load(IDDPM / "tiny_learn_sigma.pt", **{**ref["flags"], "attention_resolutions": [16, 8]})
    assert m1.options == m2.options and m1.options["attention_resolutions"] == "16,8"
    m3 = load(IDDPM / "tiny_learn_sigma.pt", **ref["flags"], sigma_small=None, timestep_shift=None)  # None: not given
    assert m3.options == m2.options
    with torch.no_grad():
        assert (m1.eps_model(ref["x"], ref["t"]) - ref["out_rescaled"]).abs().max() < TOL


# --------------------------------------------------------------------------------------------------------
# Official Analytic-DPM checkpoints (their CKPT dict; trained and sampled on n in 1..N without the t - 1 shift)
# --------------------------------------------------------------------------------------------------------
def test_official_layout_no_shift(official_ref):
    path = OFFICIAL / "cifar10_tiny.ckpt.pth"
    m = load(path, **official_ref["flags"])
    assert m.kind == "analytic_dpm_official" and m.options["timestep_shift"] is False
    assert m.identity["layout"] == "analytic_dpm_official:ema_models_states[eps_model]"
    assert m.timestep_convention == "t * 1000 / 1000"
    for n, expected in zip(official_ref["n"], official_ref["eps"], strict=True):
        assert (eps(m, official_ref["x"], n) - expected).abs().max() < TOL, int(n)
    assert (m.schedule.betas[1:] - official_ref["betas"]).abs().max() < 1e-10


def test_official_layout_wrong_choices_do_not_match(official_ref):
    """Negative controls: the t - 1 shift, or the training (non-EMA) weights, give other outputs."""
    path, x = OFFICIAL / "cifar10_tiny.ckpt.pth", official_ref["x"]
    shifted = load(path, **official_ref["flags"], timestep_shift=True)
    assert (eps(shifted, x, 700) - official_ref["eps"][1]).abs().max() > 1e-3
    training = load(path, **official_ref["flags"], use_ema=False)
    assert training.identity["layout"].endswith("models_states[eps_model]")
    assert (eps(training, x, 700) - official_ref["eps"][1]).abs().max() > 1e-2


def test_official_weights_as_plain_state_dict_need_explicit_no_shift(official_ref, tmp_path):
    """baofff/Extended-Analytic-DPM re-saved the CIFAR-10 networks as plain state dicts: pass timestep_shift=False."""
    ckpt = torch.load(OFFICIAL / "cifar10_tiny.ckpt.pth", weights_only=True)
    torch.save(ckpt["ema_models_states"]["eps_model"], tmp_path / "cifar10_ls.pth")
    plain = load(tmp_path / "cifar10_ls.pth", **official_ref["flags"], timestep_shift=False)
    assert plain.kind == "improved_diffusion" and plain.timestep_convention == "t * 1000 / 1000"
    assert (eps(plain, official_ref["x"], 1000) - official_ref["eps"][2]).abs().max() < TOL
    default = load(tmp_path / "cifar10_ls.pth", **official_ref["flags"])  # improved-diffusion's t - 1
    assert (eps(default, official_ref["x"], 1000) - official_ref["eps"][2]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------
# The public full-size networks: the README's flags map every key of their state dicts
# --------------------------------------------------------------------------------------------------------
MANIFESTS = json.loads(gzip.decompress((IDDPM / "manifests.json.gz").read_bytes()))


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_public_network_keys_map_with_readme_flags(name):
    entry = MANIFESTS[name]
    fake = {k: torch.empty(shape, device="meta") for k, shape in entry["keys"]}
    flags = iddpm._complete_flags(entry["options"])
    unet, state_dict = iddpm.convert_state_dict(fake, flags)
    assert set(state_dict) == set(unet.state_dict())
    assert sum(p.numel() for p in unet.parameters()) == entry["num_params"]


def test_manifests_cover_the_paper_networks():
    assert {"imagenet64_uncond_100M_1500K", "analytic_dpm_cifar10"} <= set(MANIFESTS)


# --------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"predict_xstart": True}, r"predicts x_0"),
        ({"class_cond": True}, r"class-conditional"),
        ({"noise_schedule": "sqrt"}, r"unknown improved-diffusion noise_schedule 'sqrt'.*linear.*cosine"),
        ({"image_size": 128}, r"supports image_size \[32, 64, 256\]"),
        ({"learn_sigma": "maybe"}, r"option learn_sigma must be a boolean"),
        ({"num_heads": 3}, r"not divisible by num_heads=3"),
        ({"num_res_blocks": 2}, r"keys missing.*Probably wrong: num_res_blocks=2 \(the weights look like "
                                r"num_res_blocks=1\)"),
        ({"learn_sigma": False}, r"wrong shape: out\.2\.weight.*learn_sigma=False \(the weights look like "
                                 r"learn_sigma=True\)"),
        ({"use_scale_shift_norm": False}, r"emb_layers\.1\.weight.*use_scale_shift_norm=False"),
        ({"image_size": 64}, r"image_size=64 \(the weights look like image_size=32\)"),
        ({"attention_resolutions": "16"}, r"unexpected keys.*attention_resolutions='16' \(the weights look like "
                                          r"attention_resolutions='16,8'\)"),
        ({"num_channels": 64}, r"num_channels=64 \(the weights look like num_channels=32\)"),
    ],
)  # fmt: skip
def test_refusals(ref, override, match):
    with pytest.raises(PretrainedError, match=match):
        load(IDDPM / "tiny_learn_sigma.pt", **{**ref["flags"], **override})


def test_unknown_flag_lists_the_known_ones(ref):
    with pytest.raises(PretrainedError, match=r"unknown improved_diffusion option\(s\) use_fp16.*num_res_blocks.*"
                                              r"timestep_shift"):
        load(IDDPM / "tiny_learn_sigma.pt", **ref["flags"], use_fp16=True)


def test_class_conditional_weights_are_refused(ref, tmp_path):
    sd = torch.load(IDDPM / "tiny_learn_sigma.pt", weights_only=True)
    sd["label_emb.weight"] = torch.zeros(1000, 128)
    torch.save(sd, tmp_path / "cond.pt")
    with pytest.raises(PretrainedError, match=r"class-conditional network \(it has label_emb\.weight\)"):
        load(tmp_path / "cond.pt", **ref["flags"])


def test_bad_files(tmp_path):
    with pytest.raises(PretrainedError, match=r"does not exist"):
        load(tmp_path / "missing.pt")
    with pytest.raises(PretrainedError, match=r"is a directory"):
        load(tmp_path)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(PretrainedError, match=r"expected an improved-diffusion state dict.*holds list"):
        load(tmp_path / "list.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module: code, refused by weights_only
    with pytest.raises(PretrainedError, match=r"weights_only=True"):
        load(tmp_path / "module.pt")
    torch.save({"models_states": {}, "ema_models_states": {}}, tmp_path / "empty.ckpt.pth")
    with pytest.raises(PretrainedError, match=r"no ema_models_states; pass use_ema=False"):
        load(tmp_path / "empty.ckpt.pth")
