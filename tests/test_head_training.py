"""Training a covariance head (SN / NPR, spec section 11) on a frozen noise predictor: the losses, the module, its
checkpoints and their backbone identity, exact resume, the diagnostics callback, train.py and the configs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from test_training import ROOT, make_cfg

from analytic_dpm.errors import ConfigError
from analytic_dpm.identity import digest_state_dict
from analytic_dpm.training import (
    HeadCheckpointError,
    HeadModule,
    LoadedHeadCheckpoint,
    is_head_checkpoint,
    load_checkpoint,
    load_head_checkpoint,
    train,
)
from analytic_dpm.training.backbone import BackboneError, backbone_spec, load_backbone
from analytic_dpm.training.head_module import head_loss, npr_head_loss, sn_head_loss
from analytic_dpm.training.run import run_cli

pytestmark = [pytest.mark.filterwarnings("ignore:The dirpath has changed"),
              pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec"),
              pytest.mark.filterwarnings("ignore:Found .* module.s. in eval mode")]

CONF = ROOT / "conf"
IDDPM_FIX = ROOT / "tests" / "fixtures" / "pretrained" / "improved_diffusion"

# the head_quickstart experiment, shrunk: the tiny backbone's own data (Gaussian 1x8x8, batches of 8), N = 50
HEAD_TINY = [
    "experiment=head_quickstart",
    "trainer.accelerator=cpu",
    "trainer.max_steps=4",
    "trainer.limit_train_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "head.lr=1e-2",
    "callbacks.head_diagnostics.nll_images=4",
    "callbacks.head_diagnostics.nll_K=[5]",
    "callbacks.head_diagnostics.batch_size=100",
    "callbacks.head_diagnostics.gamma_samples=2",
]


def head_cfg(run_dir: Path, backbone: Path, *overrides: str):
    return make_cfg(run_dir, f"backbone.ckpt_path={backbone}", *overrides, base=HEAD_TINY)


def head_run(run_dir: Path, backbone: Path, *overrides: str) -> dict:
    return train(head_cfg(run_dir, backbone, *overrides))


def head_weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith("net.unet.")}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def backbone(tiny_ckpt):
    return load_backbone({"ckpt_path": str(tiny_ckpt)})


@pytest.fixture(scope="module")
def trained_head(tmp_path_factory, tiny_ckpt):
    """A 4-step NPR head run on the tiny backbone (2 epochs of 2 batches, diagnostics after each)."""
    run_dir = tmp_path_factory.mktemp("head") / "run"
    return run_dir, head_run(run_dir, tiny_ckpt)


# ------------------------------------------------------------------------------------------- the losses
def test_losses_against_hand_computation():
    eps = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]]], [[[1.5, 0.25], [-0.5, -2.0]]]])  # [2, 1, 2, 2]
    eps_hat = torch.tensor([[[[0.25, -0.5], [1.0, 0.5]]], [[[1.0, 0.0], [0.0, -1.0]]]])
    head = torch.tensor([[[[0.1, 0.9], [3.0, 0.2]]], [[[2.0, 0.1], [0.3, 4.5]]]])
    sn = [sum((e * e - h) ** 2 for e, h in zip(eps[b].flatten().tolist(), head[b].flatten().tolist()))
          for b in range(2)]
    npr = [sum(((e - p) ** 2 - h) ** 2 for e, p, h in zip(eps[b].flatten().tolist(), eps_hat[b].flatten().tolist(),
                                                           head[b].flatten().tolist())) for b in range(2)]
    torch.testing.assert_close(sn_head_loss(eps, head), torch.tensor(sn), rtol=1e-6, atol=0)
    torch.testing.assert_close(npr_head_loss(eps, eps_hat, head), torch.tensor(npr), rtol=1e-6, atol=0)
    assert torch.equal(head_loss("sn", eps, eps_hat, head), sn_head_loss(eps, head))
    assert torch.equal(head_loss("npr", eps, eps_hat, head), npr_head_loss(eps, eps_hat, head))
    with pytest.raises(ValueError, match="unknown head kind"):
        head_loss("xx", eps, eps_hat, head)
    # NPR: stopgrad on the residual, so no gradient reaches eps_hat; only the head gets one
    p, g = eps_hat.clone().requires_grad_(), head.clone().requires_grad_()
    npr_head_loss(eps, p, g).sum().backward()
    assert p.grad is None and g.grad is not None
    torch.testing.assert_close(g.grad, -2 * ((eps - eps_hat) ** 2 - head))


def test_step_loss_is_the_per_pixel_sum_batch_mean(backbone):
    module = HeadModule(backbone, kind="sn", zero_init=True)
    x0 = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    loss = module.step_loss(x0)
    torch.manual_seed(3)  # the same draws by hand: t, then eps
    t = torch.randint(1, 51, (6,))
    eps = torch.randn_like(x0)
    # a zero-initialised SN head outputs h = 0: the loss is the batch mean of sum_pixels eps^4
    torch.testing.assert_close(loss, eps.pow(4).flatten(1).sum(1).mean())
    assert torch.equal(module._last_step[0], t)


def test_timestep_bands():
    from analytic_dpm.training.head_callback import band_edges, band_losses

    assert band_edges(1000, 4) == [(1, 250), (251, 500), (501, 750), (751, 1000)]
    edges = band_edges(50, 4)
    assert edges[0][0] == 1 and edges[-1][1] == 50 and all(a[1] + 1 == b[0] for a, b in zip(edges, edges[1:]))
    sums, counts = torch.zeros(11), torch.zeros(11)
    sums[[1, 2, 9]] = torch.tensor([2.0, 4.0, 10.0])
    counts[[1, 2, 9]] = torch.tensor([1.0, 1.0, 2.0])
    out = band_losses(sums, counts, band_edges(10, 2))
    assert out["t1-5"] == {"lo": 1, "hi": 5, "count": 2.0, "loss": 3.0} and out["t6-10"]["loss"] == 5.0


# ------------------------------------------------------------------------------------------- the module
def test_backbone_is_frozen_and_runs_once_per_step(backbone):
    module = HeadModule(backbone, kind="npr", mode="complex", lr=1e-2)
    module.train()
    calls = {"backbone": 0, "head": 0}
    hooks = [module.net.unet.time_embed.register_forward_hook(lambda *a: calls.__setitem__("backbone",
                                                                                         calls["backbone"] + 1)),
             module.net.head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))]
    before = {k: v.clone() for k, v in module.net.unet.state_dict().items()}
    opt = module.configure_optimizers()
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in module.net.head.parameters()}
    x0 = torch.randn(4, 1, 8, 8)
    for i in range(3):
        loss = module.training_step(x0, i)
        assert not module.net.unet.training and module.net.head.training  # backbone_mode=eval: dropout off
        loss.backward()
        assert all(p.grad is None for p in module.net.unet.parameters())  # no graph through the backbone
        opt.step()
        opt.zero_grad()
        module.update_ema()
    for h in hooks:
        h.remove()
    assert calls == {"backbone": 3, "head": 3}  # one backbone forward per step serves eps_hat and the head
    assert_same(before, module.net.unet.state_dict())
    assert not all(torch.equal(a, b) for a, b in zip(module.ema_head.parameters(), module.net.head.parameters()))
    train_mode = HeadModule(backbone, backbone_mode="train")
    train_mode.train()
    assert train_mode.net.unet.training  # the authors' choice: the backbone's dropout on
    with pytest.raises(ValueError, match="backbone_mode"):
        HeadModule(backbone, backbone_mode="frozen")


def test_module_from_a_backbone_spec(tiny_ckpt, backbone):
    module = HeadModule({"ckpt_path": str(tiny_ckpt)}, kind="sn")
    assert module.backbone_identity == backbone.identity and module.hparams["backbone"]["ckpt_path"] == str(tiny_ckpt)
    assert module.hparams["head"]["kind"] == "sn" and module.hparams["diffusion"] == {"schedule": "linear", "N": 50}
    with pytest.raises(ValueError, match="head.kind='xx'"):
        HeadModule(backbone, kind="xx")


def test_bench_heads_runs(tiny_ckpt, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_heads", ROOT / "bench" / "bench_heads.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "heads.json"
    assert bench.main(["--ckpt", str(tiny_ckpt), "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["batch_size"] == 8 and res["image_shape"] == [1, 8, 8] and len(res["head_step_s_all"]) == 2
    assert 0 < res["head_to_backbone_ratio"] == res["head_step_s"] / res["backbone_step_s"]


def test_bench_head_sampling_runs(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_head_sampling", ROOT / "bench" / "bench_head_sampling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sampling.json"
    argv = ["--K", "2", "--batch", "2", "--repeat", "1", "--kind", "sn", "--mode", "complex", "--out", str(out)]
    assert bench.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["K"] == 2 and row["head"] == "sn:complex" and len(row["times"]["sn_ddpm (head model)"]) == 1
    assert 0 < row["ratio"] == row["head_method_s"] / row["analytic_ddpm_s"]


def test_head_ema_update(backbone):
    module = HeadModule(backbone, ema_decay=0.9)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.net.head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        for p in module.ema_head.parameters():
            p.zero_()
    module.update_ema()
    for e, p in zip(module.ema_head.parameters(), module.net.head.parameters()):
        torch.testing.assert_close(e, 0.1 * p)
    assert module.ema_updates == 1
    warm = HeadModule(backbone, ema_decay=0.999, ema_warmup=True)
    assert warm.current_ema_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)


def test_data_of_another_shape_is_refused(backbone):
    module = HeadModule(backbone)
    with pytest.raises(ConfigError, match=r"shape \(3, 8, 8\) but the backbone takes 1x8x8"):
        module.step_loss(torch.randn(2, 3, 8, 8))


def test_npr_head_moves_toward_the_empirical_residual(backbone):
    """On the tiny problem the NPR head's g, averaged over pixels, approaches the Monte-Carlo E[(eps - eps_hat)^2] at
    each t (a sanity check that it learns, not a tight bound)."""
    torch.manual_seed(0)
    module = HeadModule(backbone, kind="npr", lr=2e-2, ema_decay=0.0, fused_optimizer=False)
    module.train()
    opt = module.configure_optimizers()
    x_data = torch.randn(4096, 1, 8, 8) * 0.5  # the tiny backbone's data: Gaussian, std 0.5
    gen = torch.Generator().manual_seed(1)
    ts = [3, 15, 30, 48]

    def gap() -> list[float]:
        out = []
        with torch.no_grad():
            for t in ts:
                x0 = x_data[:512]
                eps = torch.randn(x0.shape, generator=gen)
                x_t = module.sqrt_abar[t] * x0 + module.sqrt_bbar[t] * eps
                eps_hat, g = module.net(x_t, torch.full((512,), t))
                out.append(abs(float(g.mean()) - float((eps - eps_hat).pow(2).mean())))
        return out

    module.eval()
    before = gap()
    module.train()
    for i in range(120):
        idx = torch.randint(0, x_data.shape[0], (32,), generator=gen)
        module.training_step(x_data[idx], i).backward()
        opt.step()
        opt.zero_grad()
    module.eval()
    after = gap()
    # measured: |gap| 0.73..0.93 before, 0.08..0.12 after (an SN head, h ~ E[eps^2] ~ 1, would stay > 0.25 at t = 48)
    assert all(a < 0.25 * b for a, b in zip(after, before)), (before, after)


# ------------------------------------------------------------------------------------------- a run and its checkpoint
def test_run_writes_a_head_checkpoint_with_the_backbone_identity(trained_head, tiny_ckpt):
    run_dir, summary = trained_head
    assert summary["global_step"] == 4 and not summary["interrupted"]
    last = Path(summary["last_checkpoint"])
    assert last == run_dir / "checkpoints" / "last.ckpt" and is_head_checkpoint(last)
    assert not is_head_checkpoint(tiny_ckpt)
    ckpt = torch.load(last, weights_only=True)  # plain containers + tensors only
    rec = ckpt["analytic_dpm_head"]
    base = load_checkpoint(tiny_ckpt)
    assert rec["backbone"]["identity"] == digest_state_dict(base.model)  # the backbone's EMA weights
    assert rec["backbone"]["source"]["type"] == "checkpoint"
    assert rec["backbone"]["source"]["path"] == str(Path(tiny_ckpt).resolve())
    assert (rec["head_kind"], rec["mode"], rec["backbone_mode"]) == ("npr", "complex", "eval")
    assert torch.equal(rec["gamma"], base.gamma) and rec["gamma_meta"]["M"] == base.gamma_meta["M"]
    assert torch.equal(rec["schedule"]["betas"], base.schedule.betas) and rec["schedule"]["name"] == "linear"
    hp = ckpt["hyper_parameters"]
    assert hp["data"] == base.hparams["data"]  # the checkpoint's own data (backbone.use_checkpoint_data)
    assert hp["model"] == base.hparams["model"] and hp["diffusion"] == {"schedule": "linear", "N": 50}
    assert hp["head"]["kind"] == "npr" and hp["head"]["lr"] == 1e-2 and "module" not in hp
    assert hp["backbone"] == {"ckpt_path": str(tiny_ckpt), "use_checkpoint_data": True}
    # the frozen backbone's weights are those of the checkpoint, untouched by training
    sd = ckpt["state_dict"]
    for k, v in base.model.state_dict().items():
        assert torch.equal(sd[f"net.unet.{k}"], v), k
    assert not any(p.requires_grad for p in summary["module"].net.unet.parameters())
    # the diagnostics: JSON per epoch and the logged keys
    files = sorted((run_dir / "head").glob("head_epoch*.json"))
    assert [f.name for f in files] == ["head_epoch000.json", "head_epoch001.json"]
    report = json.loads(files[-1].read_text())
    assert report["step"] == 4 and len(report["loss_bands"]) == 4
    assert sum(b["count"] for b in report["loss_bands"].values()) == 2 * 8  # the epoch's 2 batches of 8
    assert {"nll_K5/npr_ddpm", "nll_K5/analytic_ddpm", "nll_K5/gain"} <= set(report["nll_bpd"])
    assert report["gamma"]["source"] == "backbone checkpoint"
    metrics = next(run_dir.glob("csv/version_*/metrics.csv")).read_text()
    for key in ("head/loss_t1-12", "head/loss_t39-50", "head/nll_K5/npr_ddpm", "head/nll_K5/gain", "train/loss",
                "train/images_per_second"):
        assert key in metrics, key
    assert summary["head_history"][-1]["step"] == 4


def test_load_head_checkpoint_gives_the_trained_ema_head(trained_head, tiny_ckpt):
    run_dir, summary = trained_head
    module = summary["module"]
    loaded = load_head_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(loaded, LoadedHeadCheckpoint)
    assert loaded.head_kind == loaded.head_model.head_kind == "npr" and loaded.mode == "complex"
    assert loaded.methods == ("npr_ddpm", "npr_ddim") and loaded.gamma_meta["weights"] == "ema"
    assert loaded.backbone_identity == module.backbone_identity and loaded.backbone_source["type"] == "checkpoint"
    assert not loaded.head_model.training and loaded.schedule.N == 50
    base = load_checkpoint(tiny_ckpt)
    assert torch.equal(loaded.gamma, base.gamma) and loaded.hparams["data"] == base.hparams["data"]
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 25, 50])
    view = module.ema_head_model().eval()
    with torch.no_grad():
        eps_a, head_a = loaded.head_model(x, t)
        eps_b, head_b = view(x, t)
        eps_c = base.model(x, t)
    module.train(module.training)
    assert torch.equal(eps_a, eps_b) and torch.equal(head_a, head_b) and torch.equal(eps_a, eps_c)
    assert torch.equal(loaded.eps_model(x, t), eps_c)
    assert not torch.equal(head_a, torch.zeros_like(head_a))  # the head learned something
    ema = {k[len("ema_head."):]: v for k, v in module.state_dict().items() if k.startswith("ema_head.")}
    assert_same(ema, loaded.head_model.net.head.state_dict())
    # a backbone checkpoint is not a head checkpoint, and says where to go
    with pytest.raises(HeadCheckpointError, match="not a covariance-head checkpoint"):
        load_head_checkpoint(tiny_ckpt)
    with pytest.raises(ValueError, match="covariance-head checkpoint.*load_head_checkpoint"):
        load_checkpoint(run_dir / "checkpoints" / "last.ckpt")


def _other_backbone(tiny_ckpt: Path, out: Path, scale: float = 1.001) -> Path:
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    for k in [k for k in ckpt["state_dict"] if k.startswith("ema_model.") and k.endswith("weight")][:1]:
        ckpt["state_dict"][k] = ckpt["state_dict"][k] * scale
    torch.save(ckpt, out)
    return out


def test_another_backbone_is_refused(trained_head, tiny_ckpt, tmp_path):
    run_dir, summary = trained_head
    head_ckpt = run_dir / "checkpoints" / "last.ckpt"
    other = _other_backbone(tiny_ckpt, tmp_path / "other.ckpt")
    other_net = load_checkpoint(other).model
    with pytest.raises(HeadCheckpointError, match="another backbone"):
        load_head_checkpoint(head_ckpt, expect_backbone=other_net)
    with pytest.raises(HeadCheckpointError, match="another backbone"):
        load_head_checkpoint(head_ckpt, expect_backbone=digest_state_dict(other_net))
    assert load_head_checkpoint(head_ckpt, expect_backbone=load_checkpoint(tiny_ckpt).model).head_kind == "npr"
    # resuming the head with ckpt_path=... on another backbone
    with pytest.raises(ConfigError, match=r"another backbone \(weights sha256:"):
        head_run(tmp_path / "resume", other, f"ckpt_path={head_ckpt}", "trainer.max_steps=6")
    # a head checkpoint whose backbone weights were altered
    ckpt = torch.load(head_ckpt, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.startswith("net.unet.") and k.endswith("weight"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] * 1.001
    torch.save(ckpt, tmp_path / "altered.ckpt")
    with pytest.raises(HeadCheckpointError, match="do not hash to the recorded backbone identity"):
        load_head_checkpoint(tmp_path / "altered.ckpt")


def test_a_run_directory_is_not_resumed_on_a_changed_backbone_file(tiny_ckpt, tmp_path):
    """The same command after the backbone file was replaced: the directory's head checkpoint is refused (the weights
    identity), not silently continued on the new network."""
    bb = tmp_path / "backbone.ckpt"
    shutil.copy(tiny_ckpt, bb)
    run_dir = tmp_path / "run"
    head_run(run_dir, bb, "trainer.max_steps=2", "~callbacks.head_diagnostics")
    _other_backbone(tiny_ckpt, bb)
    with pytest.raises(ConfigError, match="another backbone"):
        head_run(run_dir, bb, "trainer.max_steps=4", "~callbacks.head_diagnostics")


def test_the_runs_own_data_and_a_shape_mismatch(tiny_ckpt, tmp_path):
    from test_training import TINY_DATA

    common = ("backbone.use_checkpoint_data=false", "trainer.max_steps=2", "~callbacks.head_diagnostics")
    summary = head_run(tmp_path / "own", tiny_ckpt, *common, *TINY_DATA, "data.num_train=48")
    hp = torch.load(summary["last_checkpoint"], weights_only=True)["hyper_parameters"]
    assert hp["data"]["num_train"] == 48 and hp["backbone"]["use_checkpoint_data"] is False
    with pytest.raises(ConfigError, match=r"images of shape \(1, 16, 16\) but the backbone takes 1x8x8"):
        head_run(tmp_path / "bad", tiny_ckpt, *common, *TINY_DATA, "data.image_size=16")
    assert not list((tmp_path / "bad").rglob("*.ckpt"))


def test_head_settings_define_the_run(tiny_ckpt, tmp_path):
    run_dir = tmp_path / "run"
    head_run(run_dir, tiny_ckpt, "trainer.max_steps=2", "~callbacks.head_diagnostics")
    with pytest.raises(ConfigError, match=r"head\.lr: 0\.01 -> 0\.02"):
        head_run(run_dir, tiny_ckpt, "trainer.max_steps=4", "head.lr=2e-2", "~callbacks.head_diagnostics")
    with pytest.raises(ConfigError, match=r"head\.kind: 'npr' -> 'sn'"):
        head_run(run_dir, tiny_ckpt, "trainer.max_steps=4", "head=sn", "head.lr=1e-2", "~callbacks.head_diagnostics")
    resumed = head_run(run_dir, tiny_ckpt, "trainer.max_steps=4", "head.compile=false", "head.channels_last=true",
                       "~callbacks.head_diagnostics")  # speed-only settings never refuse a resume
    assert resumed["global_step"] == 4


# ------------------------------------------------------------------------------------------- exactness
def test_resume_is_exact_at_an_epoch_boundary(trained_head, tiny_ckpt, tmp_path):
    _, full = trained_head
    first = head_run(tmp_path / "a", tiny_ckpt, "trainer.max_steps=2")
    resumed = head_run(tmp_path / "b", tiny_ckpt, "trainer.max_steps=4", f"ckpt_path={first['last_checkpoint']}")
    assert resumed["global_step"] == 4 and resumed["module"].ema_updates == 4
    assert_same(head_weights(full["module"]), head_weights(resumed["module"]))


def test_resume_is_exact_after_a_sigterm_mid_epoch(tiny_ckpt, tmp_path):
    kill = ["+callbacks.sigterm_at.step=3", "+callbacks.sigterm_at._target_=signals.SigtermAtStep"]
    cut = tmp_path / "cut"
    with pytest.raises(SystemExit) as stop:
        run_cli(head_cfg(cut, tiny_ckpt, "trainer.max_steps=6", *kill))
    assert stop.value.code == 143
    assert torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    resumed = head_run(cut, tiny_ckpt, "trainer.max_steps=6")  # the same directory: resumes from last.ckpt
    whole = head_run(tmp_path / "whole", tiny_ckpt, "trainer.max_steps=6", "~callbacks.head_diagnostics")
    assert resumed["global_step"] == whole["global_step"] == 6
    # bitwise equal, and the diagnostics (run only in `resumed`) did not touch the training trajectory
    assert_same(head_weights(resumed["module"]), head_weights(whole["module"]))


def test_bf16_mixed_head_run(tiny_ckpt, tmp_path):
    summary = head_run(tmp_path / "bf16", tiny_ckpt, "trainer.precision=bf16-mixed", "trainer.max_steps=2",
                       "callbacks.head_diagnostics.nll_images=0")
    module = summary["module"]
    assert summary["trainer"].precision == "bf16-mixed" and summary["global_step"] == 2
    assert all(p.dtype == torch.float32 for p in module.ema_head.parameters())
    assert load_head_checkpoint(summary["last_checkpoint"]).head_kind == "npr"


def test_diverging_head_stops_with_a_clear_error(tiny_ckpt, tmp_path):
    from analytic_dpm.training.base import TrainingDivergedError

    with pytest.raises(TrainingDivergedError, match=r"exceeds head\.max_loss=1e-06 per pixel \(x 64 pixels\).*"
                                                    r"no checkpoint was written from this head.*head\.lr="):
        head_run(tmp_path / "run", tiny_ckpt, "head.max_loss=1e-6", "head=sn", "head.lr=1e-2")
    assert not list((tmp_path / "run").rglob("*.ckpt"))


# ------------------------------------------------------------------------------------------- backbones
def test_pretrained_improved_diffusion_backbone(tmp_path):
    """The improved-diffusion fixture (learned sigma, N = 2000 cosine, fed (t - 1) * 1000 / N): the head trains on
    its first 3 output channels with its timestep rule and schedule, and loads back as the same function."""
    from analytic_dpm import pretrained

    flags = torch.load(IDDPM_FIX / "reference.pt", weights_only=True)["flags"]
    options = [f"backbone.options.{k}=" + (f"'{v}'" if isinstance(v, str) else str(v)) for k, v in flags.items()]
    summary = train(make_cfg(
        tmp_path / "run", "backbone=improved_diffusion", f"backbone.source={IDDPM_FIX / 'tiny_learn_sigma.pt'}",
        *options, "head=sn", "head.lr=1e-3", "data=gaussian", "data.channels=3", "data.image_size=32",
        "data.num_train=32", "data.num_test=4", "data.batch_size=4", "trainer.max_steps=2",
        "callbacks.head_diagnostics.nll_images=0", base=[o for o in HEAD_TINY if not o.startswith("head.lr")]))
    module = summary["module"]
    assert summary["global_step"] == 2 and module.N == 2000 and module.noise_schedule.name == "cosine"
    assert (module.backbone.t_offset, module.backbone.t_scale) == (-1, 0.5)
    assert summary["head_history"][-1]["loss_bands"]["t1-500"]["count"] > 0
    loaded = load_head_checkpoint(summary["last_checkpoint"])
    ref = pretrained.load("improved_diffusion", IDDPM_FIX / "tiny_learn_sigma.pt", **flags)
    assert loaded.backbone_identity == digest_state_dict(ref.eps_model.net)
    assert loaded.backbone_source["kind"] == "improved_diffusion" and loaded.gamma is None
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 2000])
    with torch.no_grad():
        eps, h = loaded.head_model(x, t)
        assert torch.equal(eps, ref.eps_model(x, t))  # the backbone alone, in its own timestep convention
        assert h.shape == x.shape and loaded.head_model.head_kind == "sn"
    assert torch.equal(loaded.schedule.betas, ref.schedule.betas)


def test_pretrained_ddpm_backbone_from_its_config(tmp_path):
    """The DDIM fixture (an ermongroup/ddim checkpoint and its YAML, 3x16x16, fed t - 1): the generic ddpm backbone."""
    from analytic_dpm import pretrained

    fix = ROOT / "tests" / "fixtures" / "pretrained" / "ddpm"
    summary = train(make_cfg(
        tmp_path / "run", "backbone=ddpm", f"backbone.source={fix / 'ddim_tiny_ckpt.pth'}",
        f"backbone.options.config={fix / 'ddim_tiny.yml'}", "data=gaussian", "data.channels=3", "data.image_size=16",
        "data.num_train=32", "data.num_test=4", "data.batch_size=4", "trainer.max_steps=2",
        "callbacks.head_diagnostics.nll_images=0", base=HEAD_TINY))
    loaded = load_head_checkpoint(summary["last_checkpoint"])
    ref = pretrained.load("ddpm", fix / "ddim_tiny_ckpt.pth", config=fix / "ddim_tiny.yml")
    assert loaded.backbone_identity == digest_state_dict(ref.eps_model.net) and loaded.schedule.N == 1000
    assert loaded.backbone_source["identity"]["timestep_convention"] == "t - 1"
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 1000])
    with torch.no_grad():
        assert torch.equal(loaded.head_model(x, t)[0], ref.eps_model(x, t))


def test_diagnostics_calibrate_gamma_once_for_a_backbone_without_one(tiny_ckpt, tmp_path):
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["analytic_dpm"]["gamma"] = None
    bare = tmp_path / "no_gamma.ckpt"
    torch.save(ckpt, bare)
    summary = head_run(tmp_path / "run", bare)
    first, last = summary["head_history"]
    assert first["gamma"]["source"] == last["gamma"]["source"] == "quick calibration"
    assert first["gamma"]["M"] == 2 and first["gamma"]["seed"] == last["gamma"]["seed"]
    assert {"nll_K5/npr_ddpm", "nll_K5/analytic_ddpm"} <= set(last["nll_bpd"])
    assert load_head_checkpoint(summary["last_checkpoint"]).gamma is None  # the quick one is not the backbone's


def test_backbone_specs_and_refusals(tmp_path, tiny_ckpt, trained_head):
    with pytest.raises(BackboneError, match="not this package's UNet"):
        backbone_spec({"kind": "diffusers", "source": "x", "options": {}})
    with pytest.raises(BackboneError, match="unknown backbone kind 'onnx'"):
        backbone_spec({"kind": "onnx", "source": "x"})
    with pytest.raises(BackboneError, match="needs a backbone"):
        backbone_spec(None)
    assert backbone_spec({"kind": "ddpm", "source": "m.ckpt", "options": {"ch": 8, "ema": None}}) == {
        "kind": "ddpm", "source": "m.ckpt", "options": {"ch": 8}}
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_backbone({"ckpt_path": str(tmp_path / "nope.ckpt")})
    head_ckpt = trained_head[0] / "checkpoints" / "last.ckpt"
    with pytest.raises(BackboneError, match="is a covariance-head checkpoint"):
        load_backbone({"ckpt_path": str(head_ckpt)})


def test_head_and_backbone_go_together(tiny_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(make_cfg(tmp_path / "a", f"+backbone.ckpt_path={tiny_ckpt}"))
    assert stop.value.code == 2 and "head=npr or head=sn" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(make_cfg(tmp_path / "b", "head=npr"))
    assert "needs the noise predictor it is trained on" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(make_cfg(tmp_path / "c", base=["experiment=head_quickstart"]))
    assert "backbone.ckpt_path is required" in capsys.readouterr().err


def test_plain_training_refuses_a_head_checkpoint_directory(trained_head, tmp_path):
    """A noise-predictor config in a head run's directory is another run (the head and backbone are run-defining)."""
    from test_training import TINY

    run_dir, _ = trained_head
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    with pytest.raises(ConfigError, match=r"(?s)another config.*head: \{"):
        train(make_cfg(copy, base=TINY))
    with pytest.raises(ConfigError, match="is a covariance-head checkpoint: resume it with its head run's config"):
        train(make_cfg(tmp_path / "other", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", base=TINY))


def test_compiled_head_training_runs_the_compiled_network(tiny_ckpt, tmp_path, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")  # Dynamo's capture without code generation: fast on a CPU
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counter, dynamic=False))
    common = ("trainer.max_steps=2", "~callbacks.head_diagnostics")
    compiled = head_run(tmp_path / "c", tiny_ckpt, "head.compile=true", *common)
    module = compiled["module"]
    assert counter.frame_count >= 1 and module._compiled_forward is not None and module.compile_seconds > 0
    eager = head_run(tmp_path / "e", tiny_ckpt, *common)
    a, b = head_weights(module), head_weights(eager["module"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    torch._dynamo.reset()


def test_wandb_offline_head_run(tiny_ckpt, tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    run_dir = tmp_path / "wb"
    head_run(run_dir, tiny_ckpt, "logger=wandb", "trainer.max_steps=2")
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    deadline = time.monotonic() + 60  # wandb's service may still be writing after finish() returns
    while True:
        blob = next(runs[0].glob("*.wandb")).read_bytes()
        if b"head/nll_K5/gain" in blob or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert b"head/nll_K5/npr_ddpm" in blob and b"head/loss_t1-12" in blob and b"head/nll_K5/gain" in blob


# ------------------------------------------------------------------------------------------- train.py and configs
def test_train_py_head_quickstart(tmp_path, tiny_ckpt):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "ADPM_DATA_DIR": str(tmp_path / "data")}
    out = tmp_path / "cli"
    args = [*HEAD_TINY, f"backbone.ckpt_path={tiny_ckpt}", "trainer.max_steps=2", f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = load_head_checkpoint(out / "checkpoints" / "last.ckpt")
    assert loaded.head_kind == "npr" and loaded.gamma_meta["checkpoint_step"] == 2
    assert (out / "head" / "head_epoch000.json").is_file()


def cfg_of(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_head_configs_compose_with_the_papers_settings():
    from omegaconf import OmegaConf

    q = cfg_of("experiment=head_quickstart", "backbone.ckpt_path=last.ckpt")
    assert q.backbone == {"ckpt_path": "last.ckpt", "use_checkpoint_data": True}
    assert (q.head.kind, q.head.mode, q.head.backbone_mode) == ("npr", "complex", "eval")
    assert q.trainer.max_steps == q.trainer.limit_train_batches and 50 <= q.trainer.max_steps <= 400
    assert "head_diagnostics" in q.callbacks and "gamma_calibration" not in q.callbacks
    assert cfg_of("experiment=head_quickstart", "head=sn").head.kind == "sn"
    assert cfg_of("experiment=head_quickstart", "head.mode=simple").head.mode == "simple"
    for name, schedule in (("head_cifar10_ls", "linear"), ("head_cifar10_cs", "cosine")):
        c = cfg_of(f"experiment={name}", "backbone.source=model.pt")
        assert c.backbone.kind == "improved_diffusion" and c.backbone.source == "model.pt"
        o = c.backbone.options
        assert (o.image_size, o.num_channels, o.num_res_blocks, o.dropout) == (32, 128, 3, 0.3)
        assert (o.diffusion_steps, o.noise_schedule, o.timestep_shift) == (1000, schedule, False)
        assert c.data._target_.endswith("CIFAR10DataModule") and c.data.batch_size == 128 and c.data.flip is False
        assert (c.head.lr, c.head.ema_decay, c.head.weight_decay) == (1e-4, 0.9999, 0.0)
        assert c.trainer.max_steps == 500_000 and c.trainer.precision == "bf16-mixed"
        assert c.trainer.gradient_clip_val is None
        spec = backbone_spec(OmegaConf.to_container(c.backbone))
        assert spec["options"]["timestep_shift"] is False and "method" not in spec["options"]
    ce = cfg_of("experiment=head_celeba64", "backbone.source=ckpt.pth")
    assert ce.backbone.kind == "ddpm" and ce.data._target_.endswith("CelebA64DataModule")
    o = ce.backbone.options
    assert (o.ch, list(o.ch_mult), o.num_res_blocks, list(o.attn_resolutions), o.resolution) == (
        128, [1, 2, 2, 2, 4], 2, [16], 64)
    assert (o.beta_schedule, o.beta_start, o.beta_end, o.num_diffusion_timesteps) == ("linear", 1e-4, 0.02, 1000)
    assert (ce.head.lr, ce.head.ema_decay, ce.data.batch_size) == (1e-4, 0.9999, 128)
    # our own CIFAR-10 model as the backbone of the paper's head setting; any improved-diffusion file
    own = cfg_of("experiment=head_cifar10_ls", "backbone=checkpoint", "backbone.ckpt_path=last.ckpt")
    assert own.backbone == {"ckpt_path": "last.ckpt", "use_checkpoint_data": True}
    other = cfg_of("experiment=head_cifar10_ls", "backbone=improved_diffusion", "backbone.source=m.pt",
                   "backbone.options.num_res_blocks=2")
    assert other.backbone.options.num_res_blocks == 2 and other.backbone.options.dropout is None


@pytest.mark.parametrize("group", ["backbone", "head"])
def test_every_backbone_and_head_option_composes(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = cfg_of("experiment=head_quickstart", f"{group}={option}")
        assert cfg[group] is not None
        if group == "head":
            assert cfg.head.kind == option and cfg.head.lr == 3e-3  # the experiment's values stay on top
        elif option != "checkpoint":
            assert cfg.backbone.kind in ("improved_diffusion", "ddpm") and "options" in cfg.backbone


@pytest.mark.ddp
def test_ddp_head_run(tiny_ckpt, tmp_path):
    """Two CPU processes (gloo): the head trains on both halves of each global batch, the band statistics of the
    diagnostics are summed over the ranks, and the checkpoint loads."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests" / "helpers")]),
               WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    args = [*HEAD_TINY, f"backbone.ckpt_path={tiny_ckpt}", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.precision=32-true", f"hydra.run.dir={out}"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "head" / "head_epoch001.json").read_text())
    assert sum(b["count"] for b in report["loss_bands"].values()) == 2 * 2 * 8  # 2 ranks x 2 batches of 8
    assert load_head_checkpoint(out / "checkpoints" / "last.ckpt").gamma_meta["checkpoint_step"] == 4
