"""Training a covariance head (SN-DPM / NPR-DPM, spec section 11) on a frozen noise predictor.

:class:`HeadModule` puts a :class:`~analytic_dpm.nets.HeadUNet` on the backbone (:mod:`.backbone`: one of our
checkpoints or an improved-diffusion / DDPM network), freezes the backbone and trains only the head, with the authors'
losses (``core/criterions/ddpm.py`` of baofff/Extended-Analytic-DPM), summed over pixels and averaged over the batch:

    SN:  sum_pixels (eps^2 - h(x_t))^2                          h ~ E[eps^2 | x_t]
    NPR: sum_pixels (stopgrad(eps - eps_hat(x_t))^2 - g(x_t))^2   g ~ E[(eps - eps_hat)^2 | x_t]

with t ~ U{1..N}, eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(bbar_t) eps (the authors also add the eps-MSE, which
has no gradient when the backbone is frozen; it is left out). The head reads the decoder's last feature map, so one
backbone forward per step gives eps_hat and the head; no autograd graph is built through the frozen backbone.

Backbone mode (``backbone_mode``): ``"eval"`` (the default) runs the frozen backbone with dropout off, so eps_hat is
the deterministic predictor used at sampling and the NPR head learns the residual of exactly that predictor;
``"train"`` keeps the backbone's dropout on while training, as the authors' code does (their whole network is in
train mode), so the NPR target also holds the dropout noise. The head itself is in train mode either way (the complex
head's ResBlock keeps its dropout).

Everything else (AdamW, the EMA of the head, the per-step RNG and the reproducible batch order of an exact resume,
bf16 through the trainer's precision, the divergence checks, ``torch.compile``) is
:class:`~analytic_dpm.training.base.StepTrainingModule`'s, as for :class:`~analytic_dpm.training.DiffusionModule`.
The divergence limit ``max_loss`` is per pixel here (the loss is a sum over d pixels): a step loss above
``max_loss * d``, or not finite, stops the run.

Checkpoints: :mod:`.head_checkpoint` (the backbone's weights, identity and source inside; refused against another
backbone).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..nets import HEAD_KINDS, HEAD_MODES, HeadUNet, set_attention_float32
from ..pretrained.heads import HeadAdapter
from ..registry import plain
from .backbone import Backbone, check_data_shape, load_backbone
from .base import StepTrainingModule
from .head_checkpoint import HEAD_CHECKPOINT_KEY, HEAD_FORMAT_VERSION, HeadCheckpointError, read_head_record
from .resume import normalize_epoch_end_checkpoint

log = logging.getLogger(__name__)

__all__ = ["BACKBONE_MODES", "HeadModule", "head_loss", "npr_head_loss", "sn_head_loss"]

BACKBONE_MODES = ("eval", "train")


def sn_head_loss(eps: Tensor, h: Tensor) -> Tensor:
    """Per-sample SN loss sum_pixels (eps^2 - h)^2 (spec section 11), float32 [B]."""
    return (eps.float().square() - h.float()).square().flatten(1).sum(1)


def npr_head_loss(eps: Tensor, eps_hat: Tensor, g: Tensor) -> Tensor:
    """Per-sample NPR loss sum_pixels (stopgrad(eps - eps_hat)^2 - g)^2 (spec section 11), float32 [B]."""
    residual2 = (eps.float() - eps_hat.float()).detach().square()
    return (residual2 - g.float()).square().flatten(1).sum(1)


def head_loss(kind: str, eps: Tensor, eps_hat: Tensor, head: Tensor) -> Tensor:
    """The per-sample loss of a ``kind`` (``"sn"`` / ``"npr"``) head, float32 [B]."""
    if kind == "sn":
        return sn_head_loss(eps, head)
    if kind == "npr":
        return npr_head_loss(eps, eps_hat, head)
    raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")


class HeadModule(StepTrainingModule):
    """Trains an SN or NPR head on a frozen backbone (module docstring).

    Args:
        backbone: the backbone spec (``{"ckpt_path": ...}`` or ``{"kind", "source", "options"}``, see
            :mod:`.backbone`), or an already loaded :class:`~.backbone.Backbone`.
        kind: ``"sn"`` or ``"npr"``. mode: ``"simple"`` or ``"complex"`` head. zero_init: zero-initialise the head's
            output conv (the authors' improved-diffusion heads; the head then starts at h = g = 0).
        backbone_mode: ``"eval"`` (dropout off; default) or ``"train"`` (the authors' choice); see the module docstring.
        lr, weight_decay, betas, eps, warmup_steps: AdamW on the head's parameters.
        ema_decay, ema_warmup: the EMA of the head (the backbone does not change).
        compile, compile_mode, channels_last, fused_optimizer, attention_float32: as for
            :class:`~analytic_dpm.training.DiffusionModule` (``compile`` wraps the whole backbone + head forward).
        max_loss: divergence limit per pixel (module docstring); None: only a non-finite loss.
        seed: the run's seed. config: the run config saved as hyper-parameters (``head``, ``backbone``, ``model``,
            ``diffusion`` are (over)written here; ``data`` is the caller's).
    """

    settings_section = "head"
    nothing_written = "no checkpoint was written from this head"

    def __init__(
        self,
        backbone: Mapping | Backbone,
        kind: str = "npr",
        mode: str = "simple",
        zero_init: bool = True,
        backbone_mode: str = "eval",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        compile: bool | str = False,
        compile_mode: str | None = None,
        channels_last: bool = False,
        fused_optimizer: bool | str = "auto",
        attention_float32: bool = True,
        max_loss: float | None = 1.0e4,
        seed: int = 0,
        config: Mapping | None = None,
    ):
        super().__init__(
            lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, warmup_steps=warmup_steps, ema_decay=ema_decay,
            ema_warmup=ema_warmup, compile=compile, compile_mode=compile_mode, channels_last=channels_last,
            fused_optimizer=fused_optimizer, attention_float32=attention_float32, max_loss=max_loss, seed=seed,
        )  # fmt: skip
        if kind not in HEAD_KINDS:
            raise ValueError(f"head.kind={kind!r}; choose one of {', '.join(HEAD_KINDS)} (head=sn or head=npr)")
        if mode not in HEAD_MODES:
            raise ValueError(f"head.mode={mode!r}; choose one of {', '.join(HEAD_MODES)}")
        if backbone_mode not in BACKBONE_MODES:
            raise ValueError(f"head.backbone_mode={backbone_mode!r}; choose eval (dropout off, the predictor used at "
                             "sampling) or train (dropout on, as the authors trained)")
        bb = backbone if isinstance(backbone, Backbone) else load_backbone(backbone)
        self.backbone = bb  # plain attribute: the record of where the frozen network came from
        self.head_kind, self.mode = str(kind), str(mode)
        self.zero_init, self.backbone_mode = bool(zero_init), str(backbone_mode)
        self.noise_schedule = bb.schedule

        full = plain(config) if config is not None else {}
        full["head"] = {"kind": self.head_kind, "mode": self.mode, "zero_init": self.zero_init,
                        "backbone_mode": self.backbone_mode, **self.optimizer_settings()}
        full["backbone"] = dict(bb.spec)
        full["model"] = dict(bb.network)
        full["diffusion"] = {"schedule": bb.schedule.name, "N": bb.schedule.N}
        full.setdefault("seed", self.seed)
        self.save_hyperparameters(full)

        self.net = HeadUNet(bb.unet, self.head_kind, self.mode, eps_channels=bb.eps_channels,
                            zero_init=self.zero_init).freeze_backbone()
        if not self.attention_float32:
            set_attention_float32(self.net, False)
        self.ema_head = copy.deepcopy(self.net.head).requires_grad_(False)
        # our t -> the network's timestep (the backbone format's rule), kept out of the module tree
        object.__setattr__(self, "_adapter", HeadAdapter(self.net, t_offset=bb.t_offset, t_scale=bb.t_scale))
        object.__setattr__(self, "_ema_view", None)

        self.register_buffer("sqrt_abar", bb.schedule.alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_bbar", bb.schedule.bbar.sqrt().float(), persistent=False)
        self._pixels: int | None = None  # d, from the first batch
        # per-timestep sums of the step losses since the last reset (device; read by HeadDiagnostics)
        self._t_loss: Tensor | None = None
        self._t_count: Tensor | None = None
        self._last_step: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ what is trained
    @property
    def N(self) -> int:
        return self.noise_schedule.N

    @property
    def backbone_identity(self) -> str:
        return self.backbone.identity

    def trainable_parameters(self):
        return self.net.head.parameters()

    def ema_pairs(self) -> tuple[nn.Module, nn.Module]:
        return self.ema_head, self.net.head

    def compile_target(self) -> nn.Module:
        return self.net

    def channels_last_modules(self) -> list[nn.Module]:
        return [self.net, self.ema_head]

    def train(self, mode: bool = True) -> HeadModule:
        """Lightning's train/eval switch, with the frozen backbone kept in ``backbone_mode`` while training."""
        super().train(mode)
        if mode and self.backbone_mode == "eval":
            self.net.unet.eval()
        return self

    def network_timestep(self, t: Tensor) -> Tensor:
        """The timestep the backbone is fed for our integer ``t`` (1..N)."""
        return self._adapter.network_timestep(t)

    def step_loss(self, x0: Tensor, forward=None) -> Tensor:
        """The head loss (per-pixel sum, batch mean) at t ~ U{1..N}, eps ~ N(0, I), drawn from the global RNG."""
        if self._pixels is None:
            check_data_shape(self.backbone, tuple(x0.shape[1:]))
            self._pixels = int(x0[0].numel())
        b = x0.shape[0]
        t = torch.randint(1, self.N + 1, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        view = (-1,) + (1,) * (x0.ndim - 1)
        x_t = self.sqrt_abar[t].view(view) * x0 + self.sqrt_bbar[t].view(view) * noise
        if self.channels_last and x_t.ndim == 4:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        if forward is None:
            compiled = self._compiled_forward
            forward = compiled if compiled is not None else self.net
        eps_hat, head = forward(x_t, self.network_timestep(t))
        per_sample = head_loss(self.head_kind, noise, eps_hat, head)
        self._last_step = (t, per_sample.detach())
        return per_sample.mean()

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        t, per_sample = self._last_step
        if self._t_loss is None:
            self._t_loss = torch.zeros(self.N + 1, device=per_sample.device)
            self._t_count = torch.zeros(self.N + 1, device=per_sample.device)
        self._t_loss.index_add_(0, t, per_sample)
        self._t_count.index_add_(0, t, torch.ones_like(per_sample))
        return loss

    def loss_limit(self) -> float | None:
        if self.max_loss is None:
            return None
        return self.max_loss * (self._pixels or 1)

    def limit_description(self) -> str:
        return f"head.max_loss={self.max_loss:g} per pixel (x {self._pixels} pixels)"

    # ------------------------------------------------------------------ diagnostics
    def reset_timestep_losses(self) -> None:
        """Start a new window of per-timestep loss sums (HeadDiagnostics: at every epoch start)."""
        self._t_loss = self._t_count = None

    def timestep_losses(self) -> tuple[Tensor, Tensor] | None:
        """``(loss sums [N+1], counts [N+1])`` of the steps since the last reset (on the device), or None."""
        if self._t_loss is None:
            return None
        return self._t_loss, self._t_count

    def ema_head_model(self) -> HeadAdapter:
        """``(x_t, t) -> (eps_hat, head)`` with the EMA head on the backbone, our timestep convention (the same
        function :func:`~analytic_dpm.training.load_head_checkpoint` gives). It shares this module's tensors; after
        putting it in eval mode, call ``module.train(module.training)`` to restore the training modes."""
        view = self._ema_view
        if view is None:
            with torch.device("meta"):  # only the (replaced) head of this wrapper is built, and on no memory
                net = HeadUNet(self.net.unet, self.head_kind, self.mode, eps_channels=self.net.eps_channels,
                               zero_init=self.zero_init)
            net.head = self.ema_head
            view = HeadAdapter(net, t_offset=self.backbone.t_offset, t_scale=self.backbone.t_scale)
            object.__setattr__(self, "_ema_view", view)
        return view

    def num_parameters(self) -> int:
        """Trainable (head) parameters."""
        return sum(p.numel() for p in self.net.head.parameters())

    # ------------------------------------------------------------------ checkpoints
    def head_record(self) -> dict[str, Any]:
        """The ``analytic_dpm_head`` entry of this module's checkpoints (:mod:`.head_checkpoint`)."""
        bb = self.backbone
        return {
            "format_version": HEAD_FORMAT_VERSION,
            "head_kind": self.head_kind,
            "mode": self.mode,
            "zero_init": self.zero_init,
            "backbone_mode": self.backbone_mode,
            "eps_channels": self.net.eps_channels,
            "backbone": {"identity": bb.identity, "source": dict(bb.source), "network": dict(bb.network),
                         "t_offset": bb.t_offset, "t_scale": bb.t_scale, "spec": dict(bb.spec),
                         "timestep_convention": bb.timestep_convention},
            "schedule": {"name": bb.schedule.name, "N": bb.schedule.N, "betas": bb.schedule.betas.clone()},
            "gamma": None if bb.gamma is None else bb.gamma.clone(),
            "gamma_meta": dict(bb.gamma_meta),
            **self.training_state(),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_divergence()  # never write a checkpoint from a diverged head
        checkpoint[HEAD_CHECKPOINT_KEY] = self.head_record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        try:
            record = read_head_record(checkpoint, "the checkpoint to resume")
        except HeadCheckpointError as e:
            raise ConfigError(f"{e}; a head run resumes only a head checkpoint of the same backbone and head") from None
        check_resume_record(record, self)
        self.restore_training_state(record)
        normalize_epoch_end_checkpoint(checkpoint)  # resume at the next epoch's start (training/resume.py)
        sd = checkpoint.get("state_dict", {})
        if not any(k.startswith("ema_head.") for k in sd):  # a checkpoint without EMA: start the EMA from the head
            for k in [k for k in sd if k.startswith("net.head.")]:
                sd["ema_head." + k[len("net.head."):]] = sd[k]


def check_resume_record(record: Mapping[str, Any], module: HeadModule) -> None:
    """A head checkpoint may only be resumed by a run of the same backbone (weights identity) and head."""
    stored = str((record.get("backbone") or {}).get("identity"))
    if stored != module.backbone_identity:
        source = module.backbone.source
        raise ConfigError(
            f"the checkpoint to resume holds a head trained on another backbone (weights {stored[:23]}...) than this "
            f"run's ({module.backbone_identity[:23]}..., from {source.get('path') or source.get('source')}): "
            "a head only fits the noise predictor it was trained on. Pass the backbone it was trained on, or start a "
            "new run (another hydra.run.dir, or overwrite=true)"
        )
    for key, have in (("head_kind", module.head_kind), ("mode", module.mode)):
        if record.get(key) != have:
            raise ConfigError(f"the checkpoint to resume holds a {key}={record.get(key)!r} head; this run trains "
                              f"{key}={have!r}: resume it with the same head settings or start a new run")
