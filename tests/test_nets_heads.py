"""The covariance-head network (``analytic_dpm.nets.HeadUNet``, spec section 11): one backbone forward for eps and
the head, the backbone unchanged, head-only training. (That it is the authors' architecture is shown by
``test_pretrained_heads.py``: their weights map on and reproduce their outputs.)"""

from __future__ import annotations

import pytest
import torch

from analytic_dpm.nets import CovarianceHead, HeadUNet, UNet

TINY = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, image_size=8, attention_resolutions=(4,),
            dropout=0.0)  # fmt: skip


def tiny_unet(**kw) -> UNet:
    torch.manual_seed(0)
    unet = UNet(**{**TINY, **kw})
    with torch.no_grad():  # the zero-initialised convs made live, so outputs are not trivially 0
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def inputs(batch: int = 2):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 8, 8, generator=gen), torch.tensor([1, 7])[:batch]


@pytest.mark.parametrize("mode", ["simple", "complex"])
@pytest.mark.parametrize("kind", ["sn", "npr"])
def test_eps_is_the_backbone_and_the_head_starts_at_zero(mode, kind):
    unet = tiny_unet()
    model = HeadUNet(unet, kind, mode)
    x, t = inputs()
    eps, head = model(x, t)
    assert model.head_kind == kind and model.mode == mode and model.eps_model is unet
    assert torch.equal(eps, unet(x, t)) and eps.abs().max() > 0
    assert head.shape == x.shape and torch.equal(head, torch.zeros_like(x))  # zero-initialised output conv
    assert isinstance(model.head, CovarianceHead) and model.head.mode == mode
    names = [type(m).__name__ for m in model.head]
    assert names == (["ResBlock"] if mode == "complex" else []) + ["GroupNorm", "SiLU", "Conv2d"]


def test_head_reads_the_last_feature_map_and_the_time():
    """head = conv(SiLU(GN(h))) with h the input of the backbone's output GroupNorm; complex: h through a ResBlock
    with the backbone's time embedding first."""
    unet = tiny_unet()
    simple = HeadUNet(unet, "sn", "simple", zero_init=False)
    complex_ = HeadUNet(unet, "npr", "complex", zero_init=False)
    x, t = inputs()
    h, emb = unet.features(x, t)
    assert h.shape == (2, 32, 8, 8) and emb.shape == (2, 128)
    assert torch.equal(unet.out(h), unet(x, t))
    gn, act, conv = simple.head
    assert torch.allclose(simple(x, t)[1], conv(act(gn(h))))
    block, gn, act, conv = complex_.head
    assert torch.allclose(complex_(x, t)[1], conv(act(gn(block(h, emb)))))
    # time conditioning: same x, other t -> other head (through the features and, for complex, the ResBlock)
    assert (complex_(x, t)[1] - complex_(x, t.flip(0))[1]).abs().max() > 1e-4


def test_learned_variance_backbone_gives_the_first_channels():
    unet = tiny_unet(out_channels=6)
    model = HeadUNet(unet, "sn", "simple")
    x, t = inputs()
    eps, head = model(x, t)
    assert eps.shape == head.shape == x.shape and torch.equal(eps, unet(x, t)[:, :3])
    with pytest.raises(ValueError, match=r"eps_channels=7 but the backbone outputs 6"):
        HeadUNet(unet, "sn", eps_channels=7)


def test_freeze_backbone_trains_the_head_only():
    unet = tiny_unet(dropout=0.1)
    model = HeadUNet(unet, "npr", "complex", zero_init=False).freeze_backbone()
    with torch.no_grad():  # the ResBlock's zero-initialised conv made live, so every head parameter gets a gradient
        for p in model.head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not any(p.requires_grad for p in unet.parameters())
    assert all(p.requires_grad for p in model.head_parameters())
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.head.parameters()}
    x, t = inputs()
    eps, head = model(x, t)
    loss = ((torch.randn_like(x) - eps).detach().pow(2) - head).pow(2).sum()  # the NPR loss of spec section 11
    loss.backward()
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())


def test_one_backbone_pass(monkeypatch):
    unet = tiny_unet()
    model = HeadUNet(unet, "sn", "complex")
    calls = []
    features = unet.features
    monkeypatch.setattr(unet, "features", lambda x, t: calls.append(1) or features(x, t))
    monkeypatch.setattr(unet, "forward", lambda *a: pytest.fail("the backbone's forward ran besides features"))
    model(*inputs())
    assert len(calls) == 1


def test_ddpm_style_backbone_options_reach_the_complex_head():
    unet = tiny_unet(use_scale_shift_norm=False, norm_eps=1e-6)
    model = HeadUNet(unet, "sn", "complex")
    block = model.head[0]
    assert block.use_scale_shift_norm is False and block.out_norm.eps == 1e-6 and model.head[1].eps == 1e-6
    assert block.emb_proj.out_features == 32  # no scale-shift: one bias per channel
    scale_shift = HeadUNet(tiny_unet(use_scale_shift_norm=True), "sn", "complex").head[0]
    assert scale_shift.emb_proj.out_features == 64


def test_refusals():
    with pytest.raises(ValueError, match=r"unknown head kind 'sigma'; choose one of sn, npr"):
        HeadUNet(tiny_unet(), "sigma")
    with pytest.raises(ValueError, match=r"unknown covariance head mode 'deep'; choose one of simple, complex"):
        HeadUNet(tiny_unet(), "sn", "deep")
