"""The authors' released SN-DPM / NPR-DPM models through ``pretrained.load(..., method=..., mode=...)`` (issue 17).

Ground truth: ``tests/fixtures/pretrained/extended_analytic_dpm/``, made by ``tools/make_head_fixtures.py`` with
baofff/Extended-Analytic-DPM's own code: tiny random-weight ``UNetModel4Pretrained`` / ``Model4Pretrained``
networks (every parameter non-zero) saved as the plain state dicts they release, their ``DTWrapper`` outputs
(eps, head) on fixed inputs, and the key/shape manifests of their full-size released networks.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from analytic_dpm import pretrained
from analytic_dpm.nets import HeadUNet
from analytic_dpm.pretrained import PretrainedError, ddpm, file_sha256
from analytic_dpm.pretrained import improved_diffusion as iddpm
from analytic_dpm.pretrained.heads import HEAD_METHODS, HeadAdapter
from analytic_dpm.pretrained.unet_mapping import DDPM_HEAD_PREFIXES, IDDPM_HEAD_PREFIXES

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "pretrained" / "extended_analytic_dpm"
TOL = 2e-5  # max abs difference to their wrapper's output (observed ~2e-6; outputs are O(1))
SN, NPR = "pred_eps_eps2_pretrained", "pred_eps_epsc_pretrained"
REF = torch.load(FIX / "reference.pt", weights_only=True)
NETWORKS = sorted(REF["networks"])


def load(name: str, method: str | None = SN, source: Path | None = None, **extra):
    net = REF["networks"][name]
    head = {} if method is None else {"method": method, "mode": net["mode"]}
    return pretrained.load(net["kind"], source or FIX / net["file"], **{**net["options"], **head, **extra})


def crop(x: torch.Tensor, box) -> torch.Tensor:
    return x if box is None else x[..., box[0]: box[1], box[2]: box[3]]


def strip_head(name: str, tmp_path: Path) -> Path:
    """The backbone's weights alone (the released file without its head keys), as a plain state dict."""
    net = REF["networks"][name]
    prefixes = IDDPM_HEAD_PREFIXES if net["kind"] == "improved_diffusion" else DDPM_HEAD_PREFIXES
    sd = torch.load(FIX / net["file"], weights_only=True)
    plain = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
    assert len(plain) < len(sd)
    torch.save(plain, tmp_path / "backbone.pt")
    return tmp_path / "backbone.pt"


def test_fixture_covers_families_modes_and_conventions():
    nets = REF["networks"]
    assert {(n["kind"], n["mode"]) for n in nets.values()} == {
        ("improved_diffusion", "simple"), ("improved_diffusion", "complex"), ("ddpm", "simple"), ("ddpm", "complex"),
    }  # fmt: skip
    assert REF["made_with"].startswith("baofff/Extended-Analytic-DPM@")
    for n in nets.values():  # t = 1 and t = N in one batch
        assert n["n"].tolist() == [1, n["schedule"][1]]
        assert n["head"].abs().min() > 0  # the head is live


# --------------------------------------------------------------------------------------------------------
# head_model = their DTWrapper's (eps, head); eps_model unchanged
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [SN, NPR])
@pytest.mark.parametrize("name", NETWORKS)
def test_head_model_reproduces_their_wrapper(name, method):
    ref = REF["networks"][name]
    m = load(name, method)
    assert isinstance(m.head_model, HeadAdapter) and isinstance(m.head_model.net, HeadUNet)
    assert m.head_model.head_kind == HEAD_METHODS[method] == {SN: "sn", NPR: "npr"}[method]
    assert m.head_model.mode == m.options["mode"] == ref["mode"] and m.options["method"] == method
    assert not m.head_model.training and not m.head_model.net.training
    with torch.no_grad():
        eps, head = m.head_model(ref["x"], ref["n"])
    assert eps.shape == head.shape == ref["x"].shape and eps.dtype == head.dtype == torch.float32
    assert (crop(eps, ref["crop"]) - ref["eps"]).abs().max() < TOL
    assert (crop(head, ref["crop"]) - ref["head"]).abs().max() < TOL
    # eps_model: the same backbone, alone, with the same timestep rule
    assert m.eps_model is m.head_model.eps_model and m.eps_model.net is m.head_model.net.unet
    with torch.no_grad():
        assert torch.equal(m.eps_model(ref["x"], ref["n"]), eps)
    json.dumps(m.identity)


def test_timestep_conventions():
    conventions = {name: load(name).timestep_convention for name in NETWORKS}
    assert conventions == {"iddpm_simple": "t * 1000 / 1000", "iddpm_complex_learn_sigma": "(t - 1) * 1000 / 4000",
                           "ddpm_simple": "t - 1", "ddpm_complex": "t - 1"}  # fmt: skip


def test_one_backbone_forward_per_call(monkeypatch):
    m = load("ddpm_complex")
    unet = m.head_model.net.unet
    calls = []
    features = unet.features
    monkeypatch.setattr(unet, "features", lambda x, t: calls.append(1) or features(x, t))
    monkeypatch.setattr(unet, "forward", lambda *a: pytest.fail("the backbone's forward ran besides features"))
    ref = REF["networks"]["ddpm_complex"]
    with torch.no_grad():
        m.head_model(ref["x"], ref["n"])
    assert len(calls) == 1


@pytest.mark.parametrize("name", NETWORKS)
def test_eps_model_equals_the_plain_load_of_the_backbone(name, tmp_path):
    ref = REF["networks"][name]
    plain = load(name, method=None, source=strip_head(name, tmp_path))
    head = load(name, SN)
    assert plain.head_model is None
    with torch.no_grad():
        e_plain = plain.eps_model(ref["x"], ref["n"])
        assert torch.equal(head.eps_model(ref["x"], ref["n"]), e_plain)
    assert (crop(e_plain, ref["crop"]) - ref["eps"]).abs().max() < TOL
    # a plain load records nothing new: its options and identity are as before this feature
    assert "method" not in plain.options and "mode" not in plain.options
    assert "method" not in plain.identity["options"] and "mode" not in plain.identity["options"]


def test_identity_separates_head_models():
    sn, npr = load("iddpm_simple", SN), load("iddpm_simple", NPR)
    assert sn.identity["weights"] == npr.identity["weights"] == file_sha256(FIX / "iddpm_simple.pt")
    assert sn.identity["options"]["method"] == SN and npr.identity["options"]["method"] == NPR
    assert sn.identity["options"]["mode"] == "simple"
    assert sn.identity != npr.identity
    assert sn.identity["options"] == sn.options and sn.kind == "improved_diffusion"
    d = load("ddpm_simple", NPR)
    assert d.identity["options"]["method"] == NPR and d.identity["options"]["mode"] == "simple"


def test_mode_defaults_to_simple_as_theirs():
    net = REF["networks"]["iddpm_simple"]
    m = pretrained.load("improved_diffusion", FIX / net["file"], **net["options"], method=SN)
    assert m.options["mode"] == "simple" and m.head_model.mode == "simple"


def test_negative_controls():
    """The fixtures can tell the wrong timestep convention and a wrong head apart."""
    ref = REF["networks"]["iddpm_simple"]
    shifted = load("iddpm_simple", SN, timestep_shift=True)  # the t - 1 of improved-diffusion: wrong here
    with torch.no_grad():
        eps, head = shifted.head_model(ref["x"], ref["n"])
    assert (crop(head, ref["crop"]) - ref["head"]).abs().max() > 1e-3
    m = load("iddpm_simple", SN)
    with torch.no_grad():
        m.head_model.net.head[2].bias.add_(1e-3)  # a nudge to the head conv
        _, head = m.head_model(ref["x"], ref["n"])
    assert (crop(head, ref["crop"]) - ref["head"]).abs().max() > 5e-4


# --------------------------------------------------------------------------------------------------------
# The full-size released networks: every key maps with the options of their README
# --------------------------------------------------------------------------------------------------------
MANIFESTS = json.loads(gzip.decompress((FIX / "manifests.json.gz").read_bytes()))


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_released_network_keys_map(name):
    entry = MANIFESTS[name]
    fake = {k: torch.empty(shape, device="meta") for k, shape in entry["keys"]}
    if entry["kind"] == "improved_diffusion":
        net, state_dict = iddpm.convert_state_dict(fake, iddpm._complete_flags(entry["options"]))
    else:
        net, state_dict = ddpm.convert_state_dict(fake, ddpm._complete(entry["options"]))
    assert isinstance(net, HeadUNet) and net.mode == entry["options"]["mode"]
    assert set(state_dict) == set(net.state_dict())
    assert sum(p.numel() for p in net.parameters()) == entry["num_params"]


def test_manifests_cover_the_released_models():
    assert set(MANIFESTS) == {f"{d}_{k}" for d in ("cifar10_ls", "cifar10_cs", "imagenet64", "celeba64",
                                                   "lsun_bedroom") for k in ("sn", "npr")}  # fmt: skip
    assert MANIFESTS["imagenet64_sn"]["options"]["mode"] == "complex"
    assert MANIFESTS["lsun_bedroom_sn"]["options"]["mode"] == "complex"


# --------------------------------------------------------------------------------------------------------
# Configs: the pretrained config group offers the two options, null by default
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["improved_diffusion", "ddpm"])
def test_config_group_offers_method_and_mode(kind):
    from analytic_dpm.evaluation.request import PretrainedSource
    from analytic_dpm.evaluation.sources import load_pretrained

    cfg = OmegaConf.load(ROOT / "conf" / "pretrained" / f"{kind}.yaml")
    assert cfg.options.method is None and cfg.options.mode is None
    name = {"improved_diffusion": "iddpm_complex_learn_sigma", "ddpm": "ddpm_complex"}[kind]
    net = REF["networks"][name]
    options = {**OmegaConf.to_container(cfg.options), **net["options"], "method": NPR, "mode": "complex"}
    spec = {"kind": kind, "source": str(FIX / net["file"]), "options": options}
    m = load_pretrained(PretrainedSource.from_spec(spec), "cpu")
    assert m.head_model.head_kind == "npr" and m.head_model.mode == "complex"


# --------------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["iddpm_simple", "ddpm_simple"])
@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"method": "pred_eps"}, r"unknown method 'pred_eps'.*pred_eps_eps2_pretrained \(SN-DPM\).*"
                                 r"pred_eps_epsc_pretrained \(NPR-DPM\)"),
        ({"method": SN, "mode": "fancy"}, r"unknown covariance head mode 'fancy'; choose one of simple, complex"),
        ({"mode": "simple"}, r"mode='simple' is the covariance head's architecture and needs method="),
        ({"method": SN, "mode": "complex"}, r"mode='complex' \(the weights look like mode='simple'\)"),
    ],
)  # fmt: skip
def test_refusals(name, override, match):
    net = REF["networks"][name]
    with pytest.raises(PretrainedError, match=match):
        pretrained.load(net["kind"], FIX / net["file"], **net["options"], **override)


@pytest.mark.parametrize(("name", "key"), [("iddpm_complex_learn_sigma", r"out2\."), ("ddpm_complex", r"before_out\."),
                                           ("ddpm_simple", r"norm_out2\.")])  # fmt: skip
def test_head_file_without_method_says_what_to_pass(name, key):
    with pytest.raises(PretrainedError, match=rf"unexpected keys.*no method given, but the file holds a covariance "
                                              rf"head \({key}.*pass method=pred_eps_eps2_pretrained"):
        load(name, method=None)


@pytest.mark.parametrize("name", ["iddpm_simple", "ddpm_simple"])
def test_method_on_a_plain_file_says_to_drop_it(name, tmp_path):
    with pytest.raises(PretrainedError, match=r"keys missing.*holds no covariance head.*drop method"):
        load(name, SN, source=strip_head(name, tmp_path))
