"""``analytic_dpm.reverse_moments`` for the head methods against the authors' own ``predict_xprev_cov_xprev``.

Contract: /work/notes/head-contract.md (``reverse_moments(model, schedule, x_t, s, t, method, *, gamma=None,
eta=0.0, clip_x0=True, data_range=(-1, 1), avg_cov=False) -> (mean, variance)``). Ground truth:
``tests/fixtures/pretrained/extended_analytic_dpm/reference.pt``, made by ``tools/make_head_fixtures.py`` with
baofff/Extended-Analytic-DPM's ``DDPM`` / ``DDIM(eta=0)`` (``core/diffusion/dtdpm.py``) ``predict_xprev_cov_xprev(x_t,
s, t, 'optimal')`` for SN (``eps_eps2``) and NPR (``eps_epsc``) wrappers on tiny random-weight networks. Their (s, t)
index the schedule 0..N exactly as ours (no conversion). Variants: ``clip`` (their evaluation setting: x0 clamp and
Chat clipped to [0, 1]) = ours ``clip_x0=True, data_range=(-1, 1)``; ``avg_cov`` = the same with ``avg_cov=True``;
``no_clip_x0`` (their ``clip_x0=False, clip_cov_x0=True``) = ours ``clip_x0=False, data_range=(-1, 1)``.

Two references: the formulas alone (a stand-in model returning their network's recorded (eps, head) at x_t), and
end to end (our ``pretrained.load(..., method=...)`` head model on the same x_t).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from analytic_dpm import pretrained, reverse_moments
from analytic_dpm.schedule import NoiseSchedule

FIX = Path(__file__).resolve().parent / "fixtures" / "pretrained" / "extended_analytic_dpm"
REF = torch.load(FIX / "reference.pt", weights_only=True)
METHOD_FLAGS = {"sn": "pred_eps_eps2_pretrained", "npr": "pred_eps_epsc_pretrained"}
VARIANTS = {  # their variant -> our keyword arguments
    "clip": dict(clip_x0=True, data_range=(-1, 1), avg_cov=False),
    "avg_cov": dict(clip_x0=True, data_range=(-1, 1), avg_cov=True),
    "no_clip_x0": dict(clip_x0=False, data_range=(-1, 1), avg_cov=False),
}
CASES = [(name, kind, forward, variant) for name in sorted(REF["moments"]) for kind in ("sn", "npr")
         for forward in ("ddpm", "ddim") for variant in VARIANTS]  # fmt: skip


def their(ref: dict, kind: str, forward: str, variant: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Their (mean, variance) at pair i; the mean does not depend on the head nor on avg_cov, and without the x0
    clamp the variance is the clamped one (their cov clip is separate)."""
    mean = ref["mean"][forward]["clip" if variant == "avg_cov" else variant][i]
    var = ref["var"][kind][forward]["clip" if variant == "no_clip_x0" else variant][i]
    return mean, var


def check(ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor], x_t: torch.Tensor,
          box, avg_cov: bool, rel: float, what: str) -> None:
    mean, var = ours
    assert mean.shape == x_t.shape, what
    if avg_cov:  # one value per image, broadcastable against x_t
        assert var.numel() == x_t.shape[0] and var.shape == (x_t.shape[0],) + (1,) * (x_t.ndim - 1), what
    else:
        assert var.shape == x_t.shape, what
    h0, h1, w0, w1 = box
    mean = mean[..., h0:h1, w0:w1].to(theirs[0].dtype)
    var = var.to(theirs[1].dtype) if avg_cov else var[..., h0:h1, w0:w1].to(theirs[1].dtype)
    for name, got, want in (("mean", mean, theirs[0]), ("variance", var, theirs[1])):
        err = (got - want).abs().max().item()
        assert err <= rel * want.abs().max().item() + 1e-9, f"{what} {name}: max abs error {err:.3g}"


def schedule_of(ref_name: str) -> NoiseSchedule:
    name, n = REF["networks"][ref_name]["schedule"]
    return NoiseSchedule.from_betas(REF["betas"][f"{name}_{n}"][1:], name=name)


def test_their_schedule_is_ours():
    for name, net in REF["networks"].items():
        if name not in REF["moments"]:
            continue
        m = pretrained.load(net["kind"], FIX / net["file"], **net["options"], method=METHOD_FLAGS["sn"])
        assert (m.schedule.betas - schedule_of(name).betas).abs().max() < 1e-12


class Recorded:
    """A head model that returns their network's recorded (eps, head) at the recorded x_t, t."""

    def __init__(self, x_t: torch.Tensor, t: int, eps: torch.Tensor, head: torch.Tensor, kind: str):
        self.x_t, self.t, self.eps, self.head, self.head_kind = x_t, t, eps, head, kind

    def __call__(self, x: torch.Tensor, t: torch.Tensor):
        assert torch.equal(x, self.x_t) and torch.as_tensor(t).long().flatten().unique().tolist() == [self.t]
        return self.eps.clone(), self.head.clone()


@pytest.mark.parametrize(("name", "kind", "forward", "variant"),
                         [c for c in CASES if REF["moments"][c[0]]["net"] is not None])
def test_formulas_match_theirs(name, kind, forward, variant):
    ref = REF["moments"][name]
    schedule = schedule_of(name)
    for i, (s, t) in enumerate(ref["pairs"].tolist()):
        x_t = ref["x_t"][i]
        model = Recorded(x_t, t, ref["net"]["eps"][i], ref["net"]["head"][i], kind)
        ours = reverse_moments(model, schedule, x_t, s, t, f"{kind}_{forward}", eta=0.0, **VARIANTS[variant])
        check(ours, their(ref, kind, forward, variant, i), x_t, ref["crop"], variant == "avg_cov", 1e-5,
              f"{name} {kind}_{forward} {variant} (s, t) = ({s}, {t})")


@pytest.fixture(scope="module")
def head_models():
    out = {}
    for name in REF["moments"]:
        net = REF["networks"][name]
        for kind, flag in METHOD_FLAGS.items():
            out[name, kind] = pretrained.load(net["kind"], FIX / net["file"], **net["options"], method=flag,
                                              mode=net["mode"])
    return out


@pytest.mark.parametrize(("name", "kind", "forward", "variant"), CASES)
def test_loaded_head_model_matches_theirs(head_models, name, kind, forward, variant):
    ref = REF["moments"][name]
    m = head_models[name, kind]
    for i, (s, t) in enumerate(ref["pairs"].tolist()):
        x_t = ref["x_t"][i]
        with torch.no_grad():
            ours = reverse_moments(m.head_model, m.schedule, x_t, s, t, f"{kind}_{forward}", eta=0.0,
                                   **VARIANTS[variant])
        # the network's float32 differences (~1e-6) are amplified by bbar_t / abar_t in Chat: a looser tolerance
        check(ours, their(ref, kind, forward, variant, i), x_t, ref["crop"], variant == "avg_cov", 1e-4,
              f"{name} {kind}_{forward} {variant} (s, t) = ({s}, {t})")


def test_the_reference_separates_what_it_should():
    """SN and NPR, DDPM and DDIM, the clips and avg_cov all give different reference values (no vacuous case)."""
    for ref in REF["moments"].values():
        for forward in ("ddpm", "ddim"):
            assert (ref["var"]["sn"][forward]["clip"] - ref["var"]["npr"][forward]["clip"]).abs().max() > 1e-4
            assert (ref["mean"][forward]["clip"] - ref["mean"][forward]["no_clip_x0"]).abs().max() > 1e-2
            for kind in ("sn", "npr"):
                per_pixel, avg = ref["var"][kind][forward]["clip"], ref["var"][kind][forward]["avg_cov"]
                assert (avg > 0).all() and (per_pixel.amax(dim=(2, 3, 4)) > avg.flatten(1)).any()
        assert (ref["mean"]["ddpm"]["clip"][1:] - ref["mean"]["ddim"]["clip"][1:]).abs().max() > 1e-2
