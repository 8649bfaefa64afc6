"""The Lightning module that trains the noise predictor eps_theta(x_t, t) with the epsilon-MSE loss.

The step loop, AdamW, the EMA, the per-step RNG, the divergence checks and ``torch.compile`` are those of
:class:`~analytic_dpm.training.base.StepTrainingModule` (see its module docstring: a step's randomness is a pure
function of the run's seed and the batch number, which makes resuming exact). This module adds the network, the
epsilon-MSE loss and Gamma.

EMA: ``ema_model`` is a frozen copy of ``eps_model``. Both are in ``state_dict`` (keys ``eps_model.*`` and
``ema_model.*``); calibration, evaluation and :func:`~analytic_dpm.training.load_checkpoint` use the EMA weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nets import set_attention_float32
from ..registry import plain
from ..schedule import NoiseSchedule
from .base import CHECK_EVERY_WITHOUT_LOGGING, StepTrainingModule, TrainingDivergedError
from .checkpoint import CHECKPOINT_KEY, FORMAT_VERSION
from .resume import normalize_epoch_end_checkpoint

log = logging.getLogger(__name__)

__all__ = ["CHECK_EVERY_WITHOUT_LOGGING", "DiffusionModule", "TrainingDivergedError", "build_model"]


def build_model(model_cfg: Mapping) -> nn.Module:
    """A network of this package from a config (``_target_`` + kwargs, e.g. ``conf/model/*.yaml``), through the
    allow list of :mod:`analytic_dpm.registry` (the same rules as for a config read from a checkpoint)."""
    from ..registry import build_network

    target = model_cfg.get("_target_") if isinstance(model_cfg, Mapping) else None
    if isinstance(model_cfg, Mapping) and "oracle" in model_cfg and target is None:
        raise ValueError(
            f"model={model_cfg.get('oracle')!r} is an exact (oracle) noise predictor for evaluation only: there is "
            "nothing to train; choose a network, e.g. model=unet_small"
        )
    return build_network(dict(model_cfg))


class DiffusionModule(StepTrainingModule):
    """Trains ``eps_model(x_t, t)`` (t in 1..N) on ``E ||eps - eps_model(sqrt(abar_t) x_0 + sqrt(bbar_t) eps, t)||^2``.

    Args:
        model: the network config (``_target_`` + kwargs, as in ``conf/model``), instantiated here.
        schedule, N: the noise schedule (``linear`` / ``cosine``) and its number of steps.
        lr, weight_decay, betas, eps: AdamW. ``warmup_steps`` > 0 adds a linear warm-up of the learning rate.
        ema_decay: decay of the EMA of the weights. ``ema_warmup``: use ``min(ema_decay, (1 + n) / (10 + n))``
            at the n-th update (useful for short runs; off for the paper's 0.9999).
        compile: ``torch.compile`` the training network (True, False, or ``"auto"``: on when training on CUDA);
            state-dict keys are unchanged; a failure falls back to eager with a warning (module docstring).
        compile_mode: ``torch.compile`` mode (None: torch's default).
        channels_last: keep the training network and its inputs in channels-last memory format.
        fused_optimizer: AdamW's fused implementation (True, False, or ``"auto"``: when training on CUDA and no
            GradScaler runs, i.e. any precision but ``16-mixed``); speed only, never refuses a resume.
        attention_float32: evaluate the UNet's self-attention in float32 under bf16 autocast (the default), or,
            ``False``, in bf16 (faster on GPUs; :func:`analytic_dpm.nets.set_attention_float32`). A run-time
            choice like ``compile``: the weights and checkpoints are the same, and changing it never refuses a
            resume. Networks without this package's attention blocks ignore it.
        max_loss: a step loss above this (or not finite) is divergence and stops the run (None: only a
            non-finite loss). The epsilon-MSE of an untrained, zero-initialised network is 1.
        seed: the run's seed; the per-step randomness derives from it (module docstring).
        config: the full run config (plain containers), saved as the checkpoint's hyper-parameters; the
            ``model``, ``diffusion`` and ``module`` sections are (over)written from the arguments.
    """

    def __init__(
        self,
        model: Mapping,
        schedule: str = "linear",
        N: int = 1000,
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
        model_cfg = plain(model)
        self.noise_schedule = NoiseSchedule.from_name(str(schedule), int(N))

        full = plain(config) if config is not None else {}
        full["model"] = model_cfg
        full["diffusion"] = {**(full.get("diffusion") or {}), "schedule": str(schedule), "N": int(N)}
        full["module"] = {
            **{k: v for k, v in (full.get("module") or {}).items() if k == "_target_"},
            **self.optimizer_settings(),
        }
        full.setdefault("seed", self.seed)
        self.save_hyperparameters(full)

        self.eps_model = build_model(model_cfg)
        self.ema_model = copy.deepcopy(self.eps_model).requires_grad_(False)
        if not self.attention_float32:
            for net in (self.eps_model, self.ema_model):
                set_attention_float32(net, False)

        sched = self.noise_schedule
        self.register_buffer("sqrt_abar", sched.alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_bbar", sched.bbar.sqrt().float(), persistent=False)

        # Gamma (set by GammaCalibration or calibrate_checkpoint)
        self.gamma: Tensor | None = None
        self.gamma_meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ what is trained
    @property
    def N(self) -> int:
        return self.noise_schedule.N

    def trainable_parameters(self):
        return self.eps_model.parameters()

    def ema_pairs(self) -> tuple[nn.Module, nn.Module]:
        return self.ema_model, self.eps_model

    def compile_target(self) -> nn.Module:
        return self.eps_model

    def channels_last_modules(self) -> list[nn.Module]:
        return [self.eps_model, self.ema_model]

    def step_loss(self, x0: Tensor, forward=None) -> Tensor:
        return self.diffusion_loss(x0, forward=forward)

    def diffusion_loss(self, x0: Tensor, forward=None) -> Tensor:
        """epsilon-MSE at t ~ U{1..N} with eps ~ N(0, I), drawn from the global RNG.

        ``forward``: the network to call (default: the compiled one when compilation is on, else ``eps_model``).
        """
        b = x0.shape[0]
        t = torch.randint(1, self.N + 1, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        view = (-1,) + (1,) * (x0.ndim - 1)
        x_t = self.sqrt_abar[t].view(view) * x0 + self.sqrt_bbar[t].view(view) * noise
        if self.channels_last and x_t.ndim == 4:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        if forward is None:
            compiled = self._compiled_forward
            forward = compiled if compiled is not None else self.eps_model  # (no truth test: it calls len())
        pred = forward(x_t, t)
        return F.mse_loss(pred.float(), noise)

    # ------------------------------------------------------------------ Gamma
    def set_gamma(self, gamma: Tensor, **meta: Any) -> None:
        """Store a calibrated Gamma (float64 [N+1]) and its metadata (M, epoch, step, seconds, ...)."""
        gamma = torch.as_tensor(gamma).detach().to("cpu", torch.float64)
        if gamma.shape != (self.N + 1,):
            raise ValueError(f"gamma must have shape [{self.N + 1}], got {tuple(gamma.shape)}")
        self.gamma = gamma
        self.gamma_meta = dict(meta)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_divergence()  # never write a checkpoint from a diverged network
        meta = self.gamma_meta
        checkpoint[CHECKPOINT_KEY] = {
            "format_version": FORMAT_VERSION,
            "gamma": None if self.gamma is None else self.gamma.clone(),
            "gamma_M": meta.get("M"),
            "gamma_epoch": meta.get("epoch"),
            "gamma_step": meta.get("step"),
            "calibration_seconds": meta.get("seconds"),
            "gamma_seed": meta.get("seed"),
            "schedule": self.noise_schedule.name,
            "N": self.N,
            **self.training_state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY) or {}
        if state.get("N") not in (None, self.N) or state.get("schedule") not in (None, self.noise_schedule.name):
            raise ValueError(
                f"checkpoint was trained with schedule {state.get('schedule')!r}, N={state.get('N')}; "
                f"this run uses {self.noise_schedule.name!r}, N={self.N}"
            )
        self.restore_training_state(state)
        if state.get("gamma") is not None:
            self.set_gamma(
                state["gamma"], M=state.get("gamma_M"), epoch=state.get("gamma_epoch"), step=state.get("gamma_step"),
                seconds=state.get("calibration_seconds"), seed=state.get("gamma_seed"),
            )  # fmt: skip
        else:
            self.gamma, self.gamma_meta = None, {}
        stored_model = (checkpoint.get("hyper_parameters") or {}).get("model") or {}
        if isinstance(stored_model, Mapping) and "emb_act" not in stored_model and any(
                getattr(m, "emb_act", False) for m in self.eps_model.modules()):
            raise ValueError(
                "this checkpoint was trained by analytic_dpm 0.1.0, whose UNet had no SiLU on the time embedding "
                "inside ResBlocks; resume it with model.emb_act=false (evaluation handles it by itself)"
            )
        normalize_epoch_end_checkpoint(checkpoint)  # resume at the next epoch's start (training/resume.py)
        sd = checkpoint.get("state_dict", {})
        if not any(k.startswith("ema_model.") for k in sd):  # e.g. a checkpoint without EMA: start EMA from it
            for k in [k for k in sd if k.startswith("eps_model.")]:
                sd["ema_model." + k[len("eps_model."):]] = sd[k]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.eps_model.parameters())
