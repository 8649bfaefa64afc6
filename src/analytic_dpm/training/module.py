"""The Lightning module that trains the noise predictor eps_theta(x_t, t) with the epsilon-MSE loss.

Randomness: every training step first reseeds torch's global RNG (CPU and every CUDA device) with
``mix_seed(seed, rank, batch number)``, then draws t, eps and dropout from it. A step's randomness is thus
a pure function of the run's seed and how many batches came before it, which (with the batch order of
:mod:`analytic_dpm.training.data`) makes resuming from a checkpoint exact and keeps anything that runs
between steps (Gamma calibration, logging, checkpointing) from changing the training trajectory.

EMA: ``ema_model`` is a frozen copy of ``eps_model`` updated after every optimizer step
(``optimizer_step``), so a checkpoint written at any hook after the step already holds the matching EMA.
Both are in ``state_dict`` (keys ``eps_model.*`` and ``ema_model.*``); calibration, evaluation and
:func:`~analytic_dpm.training.load_checkpoint` use the EMA weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn

from ..data import to_model_space
from ..schedule import NoiseSchedule
from .data import mix_seed

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_KEY", "DiffusionModule", "build_model", "plain"]

#: key of this project's entry in a Lightning checkpoint
CHECKPOINT_KEY = "analytic_dpm"
FORMAT_VERSION = 1


def plain(obj: Any) -> Any:
    """A deep copy of ``obj`` made only of dict / list / str / int / float / bool / None (OmegaConf resolved)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            obj = OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj)


def build_model(model_cfg: Mapping) -> nn.Module:
    """Instantiate a network config (``_target_`` + kwargs, e.g. ``conf/model/*.yaml``) from this package."""
    from hydra.utils import instantiate

    target = model_cfg.get("_target_") if isinstance(model_cfg, Mapping) else None
    if isinstance(model_cfg, Mapping) and "oracle" in model_cfg and target is None:
        raise ValueError(
            f"model={model_cfg.get('oracle')!r} is an exact (oracle) noise predictor for evaluation only: there is "
            "nothing to train; choose a network, e.g. model=unet_small"
        )
    if not isinstance(target, str) or not target.startswith("analytic_dpm."):
        raise ValueError(
            f"the model config needs a `_target_` inside the analytic_dpm package (e.g. analytic_dpm.nets.UNet), "
            f"got {target!r}"
        )
    net = instantiate(dict(model_cfg), _convert_="all")
    if not isinstance(net, nn.Module):
        raise ValueError(f"{target} did not build an nn.Module")
    return net


def _warmup_factor(warmup_steps: int):
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps)

    return factor


class DiffusionModule(LightningModule):
    """Trains ``eps_model(x_t, t)`` (t in 1..N) on ``E ||eps - eps_model(sqrt(abar_t) x_0 + sqrt(bbar_t) eps, t)||^2``.

    Args:
        model: the network config (``_target_`` + kwargs, as in ``conf/model``), instantiated here.
        schedule, N: the noise schedule (``linear`` / ``cosine``) and its number of steps.
        lr, weight_decay, betas, eps: AdamW. ``warmup_steps`` > 0 adds a linear warm-up of the learning rate.
        ema_decay: decay of the EMA of the weights. ``ema_warmup``: use ``min(ema_decay, (1 + n) / (10 + n))``
            at the n-th update (useful for short runs; off for the paper's 0.9999).
        compile: ``torch.compile`` the training network (in place: state-dict keys are unchanged).
        channels_last: keep the training network and its inputs in channels-last memory format.
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
        compile: bool = False,
        channels_last: bool = False,
        seed: int = 0,
        config: Mapping | None = None,
    ):
        super().__init__()
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if float(lr) <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        model_cfg = plain(model)
        self.noise_schedule = NoiseSchedule.from_name(str(schedule), int(N))
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.adam_betas, self.adam_eps = tuple(float(b) for b in betas), float(eps)
        self.warmup_steps = int(warmup_steps)
        self.ema_decay, self.ema_warmup = float(ema_decay), bool(ema_warmup)
        self.compile_model, self.channels_last = bool(compile), bool(channels_last)
        self.seed = int(seed)

        full = plain(config) if config is not None else {}
        full["model"] = model_cfg
        full["diffusion"] = {**(full.get("diffusion") or {}), "schedule": str(schedule), "N": int(N)}
        full["module"] = {
            **{k: v for k, v in (full.get("module") or {}).items() if k == "_target_"},
            "lr": self.lr, "weight_decay": self.weight_decay, "betas": list(self.adam_betas), "eps": self.adam_eps,
            "warmup_steps": self.warmup_steps, "ema_decay": self.ema_decay, "ema_warmup": self.ema_warmup,
            "compile": self.compile_model, "channels_last": self.channels_last,
        }  # fmt: skip
        full.setdefault("seed", self.seed)
        self.save_hyperparameters(full)

        self.eps_model = build_model(model_cfg)
        self.ema_model = copy.deepcopy(self.eps_model).requires_grad_(False)

        sched = self.noise_schedule
        self.register_buffer("sqrt_abar", sched.alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_bbar", sched.bbar.sqrt().float(), persistent=False)

        # training state saved in checkpoint["analytic_dpm"] (plain python numbers)
        self.batches_trained = 0  # training_step calls so far = the number of the next batch
        self.images_trained = 0  # examples seen by this process
        self.ema_updates = 0
        # Gamma (set by GammaCalibration or calibrate_checkpoint)
        self.gamma: Tensor | None = None
        self.gamma_meta: dict[str, Any] = {}
        self._prepared = False

    # ------------------------------------------------------------------ setup
    @property
    def N(self) -> int:
        return self.noise_schedule.N

    def on_fit_start(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        if self.channels_last:
            self.eps_model.to(memory_format=torch.channels_last)
            self.ema_model.to(memory_format=torch.channels_last)
        if self.compile_model:
            self.eps_model.compile()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.eps_model.parameters(), lr=self.lr, betas=self.adam_betas, eps=self.adam_eps,
            weight_decay=self.weight_decay,
        )  # fmt: skip
        if self.warmup_steps <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_factor(self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    # ------------------------------------------------------------------ training
    def step_seed(self) -> int:
        """The seed of the current training step (depends on seed, rank and the batch number only)."""
        return mix_seed(self.seed, "train-step", self.global_rank, self.batches_trained)

    def diffusion_loss(self, x0: Tensor) -> Tensor:
        """epsilon-MSE at t ~ U{1..N} with eps ~ N(0, I), drawn from the global RNG."""
        b = x0.shape[0]
        t = torch.randint(1, self.N + 1, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        view = (-1,) + (1,) * (x0.ndim - 1)
        x_t = self.sqrt_abar[t].view(view) * x0 + self.sqrt_bbar[t].view(view) * noise
        if self.channels_last and x_t.ndim == 4:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        pred = self.eps_model(x_t, t)
        return F.mse_loss(pred.float(), noise)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        if isinstance(batch, (list, tuple)):  # tolerate (x, label) batches
            batch = batch[0]
        torch.manual_seed(self.step_seed())
        x0 = to_model_space(batch)
        loss = self.diffusion_loss(x0)
        self.batches_trained += 1
        self.images_trained += int(x0.shape[0])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x0.shape[0])
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def current_ema_decay(self) -> float:
        if self.ema_warmup:
            return min(self.ema_decay, (1.0 + self.ema_updates) / (10.0 + self.ema_updates))
        return self.ema_decay

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights (buffers are copied)."""
        w = 1.0 - self.current_ema_decay()
        ema_p = list(self.ema_model.parameters())
        cur_p = [p.detach() for p in self.eps_model.parameters()]
        try:
            torch._foreach_lerp_(ema_p, cur_p, w)
        except (AttributeError, RuntimeError):  # pragma: no cover - old torch / odd layouts
            for e, p in zip(ema_p, cur_p):
                e.lerp_(p, w)
        for e, b in zip(self.ema_model.buffers(), self.eps_model.buffers()):
            e.copy_(b)
        self.ema_updates += 1

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
            "seed": self.seed,
            "batches_trained": self.batches_trained,
            "images_trained": self.images_trained,
            "ema_updates": self.ema_updates,
            "ema_decay": self.ema_decay,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY) or {}
        if state.get("N") not in (None, self.N) or state.get("schedule") not in (None, self.noise_schedule.name):
            raise ValueError(
                f"checkpoint was trained with schedule {state.get('schedule')!r}, N={state.get('N')}; "
                f"this run uses {self.noise_schedule.name!r}, N={self.N}"
            )
        if state.get("seed") is not None and int(state["seed"]) != self.seed:
            log.warning("resuming a run trained with seed %s under seed %s: the data order and noise of the "
                        "remaining steps follow the new seed", state["seed"], self.seed)
        self.batches_trained = int(state.get("batches_trained", 0))
        self.images_trained = int(state.get("images_trained", 0))
        self.ema_updates = int(state.get("ema_updates", 0))
        if state.get("gamma") is not None:
            self.set_gamma(
                state["gamma"], M=state.get("gamma_M"), epoch=state.get("gamma_epoch"), step=state.get("gamma_step"),
                seconds=state.get("calibration_seconds"), seed=state.get("gamma_seed"),
            )  # fmt: skip
        else:
            self.gamma, self.gamma_meta = None, {}
        sd = checkpoint.get("state_dict", {})
        if not any(k.startswith("ema_model.") for k in sd):  # e.g. a checkpoint without EMA: start EMA from it
            for k in [k for k in sd if k.startswith("eps_model.")]:
                sd["ema_model." + k[len("eps_model."):]] = sd[k]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.eps_model.parameters())
