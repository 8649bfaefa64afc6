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

No per-step host synchronisation: the step's loss is accumulated on the device together with a divergence
record (the first step whose loss is not finite or above ``max_loss``); both are read once per logging
window (``trainer.log_every_n_steps``; every 100 steps when logging is off), at epoch ends and before any
checkpoint is written. ``train/loss`` is the mean loss of the window, logged as a CPU number, so neither the
progress bar nor the loggers touch the device between windows. A diverged run stops with
:class:`TrainingDivergedError` (what happened, at which step, what to try) and never writes a checkpoint (or a
Gamma) from the diverged network.

Optimizer: AdamW, its fused single-kernel implementation where ``fused_optimizer`` says so (``"auto"``: when
training on CUDA without a GradScaler, i.e. not under ``16-mixed``). Same update rule; only float rounding differs
from the multi-tensor (``foreach``) one. Gradient clipping then runs here (:meth:`configure_gradient_clipping`):
Lightning's mixed-precision plugin refuses to clip for any fused optimizer because one *could* unscale a
GradScaler's gradients itself, but with no scaler (bf16-mixed, fp32) the gradients are the true ones.

Compilation (``compile``: True, False or ``"auto"`` = on when training on CUDA): the training network is
wrapped by ``torch.compile`` (state-dict keys unchanged). The first step runs the compiled forward and
backward once on its own batch, under a forked RNG, before the real step: if compilation fails the run warns
and continues eagerly, bit-identical to a run with ``compile=false``; its wall time is ``compile_seconds``.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn

from ..accel import CompileFallbackWarning, parse_flag
from ..data import to_model_space
from ..errors import UserError
from ..nets import set_attention_float32
from ..registry import plain
from ..schedule import NoiseSchedule
from ..seeding import mix_seed
from .checkpoint import CHECKPOINT_KEY, FORMAT_VERSION
from .resume import normalize_epoch_end_checkpoint

log = logging.getLogger(__name__)

__all__ = ["DiffusionModule", "TrainingDivergedError", "build_model"]

#: steps between divergence checks when logging is off (trainer.log_every_n_steps=0)
CHECK_EVERY_WITHOUT_LOGGING = 100


class TrainingDivergedError(UserError, RuntimeError):
    """The training loss became non-finite or exploded; the message says at which step and what to try."""


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
        self.compile_model = parse_flag(compile, "module.compile")
        self.compile_mode = None if compile_mode in (None, "default") else str(compile_mode)
        self.channels_last = bool(channels_last)
        self.fused_optimizer = parse_flag(fused_optimizer, "module.fused_optimizer")
        self.attention_float32 = bool(attention_float32)
        if max_loss is not None and not float(max_loss) > 0:
            raise ValueError(f"max_loss must be positive or null, got {max_loss}")
        self.max_loss = None if max_loss is None else float(max_loss)
        self.seed = int(seed)

        full = plain(config) if config is not None else {}
        full["model"] = model_cfg
        full["diffusion"] = {**(full.get("diffusion") or {}), "schedule": str(schedule), "N": int(N)}
        full["module"] = {
            **{k: v for k, v in (full.get("module") or {}).items() if k == "_target_"},
            "lr": self.lr, "weight_decay": self.weight_decay, "betas": list(self.adam_betas), "eps": self.adam_eps,
            "warmup_steps": self.warmup_steps, "ema_decay": self.ema_decay, "ema_warmup": self.ema_warmup,
            "compile": self.compile_model, "compile_mode": self.compile_mode, "channels_last": self.channels_last,
            "attention_float32": self.attention_float32, "fused_optimizer": self.fused_optimizer,
            "max_loss": self.max_loss,
        }  # fmt: skip
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

        # training state saved in checkpoint["analytic_dpm"] (plain python numbers)
        self.batches_trained = 0  # training_step calls so far = the number of the next batch
        self.images_trained = 0  # examples seen by this process
        self.ema_updates = 0
        # Gamma (set by GammaCalibration or calibrate_checkpoint)
        self.gamma: Tensor | None = None
        self.gamma_meta: dict[str, Any] = {}
        self._prepared = False
        # torch.compile of eps_model, kept out of the module tree (state-dict keys stay eps_model.*)
        object.__setattr__(self, "_compiled_forward", None)
        self._compile_probe_pending = False
        self.compile_seconds: float | None = None  # wall time of the first (compiling) step
        # device-side window statistics: [loss sum, steps, first bad step (-1: none), loss at that step]
        self._window: Tensor | None = None

    # ------------------------------------------------------------------ setup
    @property
    def N(self) -> int:
        return self.noise_schedule.N

    def compile_enabled(self) -> bool:
        """Whether this run compiles the training network (``"auto"``: when it trains on CUDA)."""
        if self.compile_model == "auto":
            return self.device.type == "cuda"
        return bool(self.compile_model)

    def on_fit_start(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        if self.channels_last:
            self.eps_model.to(memory_format=torch.channels_last)
            self.ema_model.to(memory_format=torch.channels_last)
        if self.compile_enabled():
            kwargs: dict[str, Any] = {"dynamic": False}
            if self.compile_mode is not None:
                kwargs["mode"] = self.compile_mode
            try:
                object.__setattr__(self, "_compiled_forward", torch.compile(self.eps_model, **kwargs))
                self._compile_probe_pending = True
            except Exception as e:  # noqa: BLE001 - e.g. a Python without Dynamo support
                self._compile_failed(e)

    def _compile_failed(self, e: BaseException) -> None:
        object.__setattr__(self, "_compiled_forward", None)
        text = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__
        warnings.warn(f"torch.compile of the training network failed ({reason}); training continues eagerly "
                      "(same numbers, slower). Set module.compile=false to skip the attempt.",
                      CompileFallbackWarning, stacklevel=2)

    def _probe_compile(self, x0: Tensor) -> None:
        """First step: run the compiled forward + backward once on this batch (RNG forked); fall back on failure."""
        self._compile_probe_pending = False
        fn = self._compiled_forward
        if fn is None:
            return
        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[x0.device] if x0.is_cuda else []):
                loss = self.diffusion_loss(x0, forward=fn)
                params = [p for p in self.eps_model.parameters() if p.requires_grad]
                torch.autograd.grad(loss, params, allow_unused=True)
            if x0.is_cuda:
                torch.cuda.synchronize(x0.device)
        except Exception as e:  # noqa: BLE001 - any compile/runtime failure of the compiled graph
            self._compile_failed(e)
            return
        self.compile_seconds = time.perf_counter() - start
        log.info("torch.compile: the first training step (compilation) took %.1f s", self.compile_seconds)

    def _grad_scaler(self):
        trainer = self._trainer
        plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
        return getattr(plugin, "scaler", None)

    def fused_optimizer_enabled(self) -> bool:
        """Whether AdamW runs fused (``"auto"``: on CUDA when no GradScaler runs)."""
        if self.fused_optimizer == "auto":
            return self.device.type == "cuda" and self._grad_scaler() is None
        return bool(self.fused_optimizer)

    def configure_optimizers(self):
        fused = self.fused_optimizer_enabled()
        if fused and self._grad_scaler() is not None:
            trainer = self._trainer
            if trainer is not None and trainer.gradient_clip_val:
                raise ValueError(
                    f"module.fused_optimizer=true cannot be combined with trainer.precision={trainer.precision} "
                    "(a GradScaler) and gradient clipping (trainer.gradient_clip_val): the fused AdamW unscales "
                    "inside its step, after clipping would have run. Use module.fused_optimizer=auto, "
                    "trainer.precision=bf16-mixed, or trainer.gradient_clip_val=null"
                )
        opt = torch.optim.AdamW(
            self.eps_model.parameters(), lr=self.lr, betas=self.adam_betas, eps=self.adam_eps,
            weight_decay=self.weight_decay, fused=True if fused else None,
        )  # fmt: skip
        if self.warmup_steps <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_factor(self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except for a fused optimizer without a GradScaler, which Lightning's mixed-precision
        plugin refuses although nothing is scaled: the gradients are clipped here with torch's own functions."""
        fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        if not fused or not gradient_clip_val or self._grad_scaler() is not None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        algorithm = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)  # Lightning: a str enum
        if str(algorithm or "norm").lower() == "value":
            torch.nn.utils.clip_grad_value_(params, float(gradient_clip_val))
        else:  # the same call as Lightning's clip_gradients (global 2-norm, no host sync)
            torch.nn.utils.clip_grad_norm_(params, float(gradient_clip_val))
        return None

    # ------------------------------------------------------------------ training
    def step_seed(self) -> int:
        """The seed of the current training step (depends on seed, rank and the batch number only)."""
        return mix_seed(self.seed, "train-step", self.global_rank, self.batches_trained)

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

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        if isinstance(batch, (list, tuple)):  # tolerate (x, label) batches
            batch = batch[0]
        torch.manual_seed(self.step_seed())  # host-side (CPU and CUDA generator seeds): no device sync
        x0 = to_model_space(batch)
        if self._compile_probe_pending:
            self._probe_compile(x0)
        loss = self.diffusion_loss(x0)
        self.batches_trained += 1
        self.images_trained += int(x0.shape[0])
        self._observe_loss(loss, self.batches_trained, data_finite=torch.isfinite(x0).all())
        return loss

    # ------------------------------------------------------------------ loss window and divergence
    def _observe_loss(self, loss: Tensor, step: int, data_finite: Tensor | None = None) -> None:
        """Add the step's loss to the window and remember the first diverged step, and the first step whose batch
        held NaN/inf data (``data_finite`` False: the data, not the network, is then the cause), on the device."""
        value = loss.detach().float()
        w = self._window
        if w is None:  # built by kernels, not copied from the host (a pageable copy would synchronise)
            w = torch.zeros(5, device=value.device)
            w[2] = -1.0
            w[4] = -1.0
        bad = ~torch.isfinite(value)
        if self.max_loss is not None:
            bad = bad | (value > self.max_loss)
        first = bad & (w[2] < 0)
        bad_data = (~data_finite.to(value.device)) if data_finite is not None else torch.zeros((), dtype=torch.bool,
                                                                                              device=value.device)
        first_data = bad_data & (w[4] < 0)
        self._window = torch.stack([w[0] + value, w[1] + 1.0, torch.where(first, float(step), w[2]),
                                    torch.where(first, value, w[3]), torch.where(first_data, float(step), w[4])])

    def _read_window(self, reset: bool = True) -> tuple[float, int] | None:
        """One host sync: (mean loss, steps) of the window, after raising if the run diverged."""
        w = self._window
        if w is None:
            return None
        total, count, bad_step, bad_loss, bad_data_step = w.tolist()
        if reset:
            self._window = None
        trainer = self._trainer
        if bad_data_step >= 0:
            raise TrainingDivergedError(
                f"the training data hold NaN or inf values (first in the batch of step {int(bad_data_step)}): the "
                "network is not the cause; check the dataset (data=... and its files or parameters). No checkpoint "
                "or Gamma was written from this network.")
        diverged = bad_step >= 0
        if trainer is not None and getattr(trainer, "world_size", 1) > 1:
            any_rank = bool(trainer.strategy.reduce_boolean_decision(diverged, all=False))
            if any_rank and not diverged:
                raise TrainingDivergedError(self._divergence_message(None, None))
        if diverged:
            raise TrainingDivergedError(self._divergence_message(int(bad_step), bad_loss))
        return (total / count if count else float("nan")), int(count)

    def _divergence_message(self, step: int | None, loss: float | None) -> str:
        trainer = self._trainer
        if step is None:
            what = "the training loss diverged on another process (rank)"
        else:
            kind = "is not finite" if loss is None or loss != loss or abs(loss) == float("inf") else (
                f"exceeds module.max_loss={self.max_loss:g}")
            what = f"training diverged at step {step}: the loss was {loss:.4g}, which {kind}"
        clip = getattr(trainer, "gradient_clip_val", None) if trainer is not None else None
        precision = str(getattr(trainer, "precision", "")) if trainer is not None else ""
        tips = [f"a lower learning rate (module.lr={self.lr:g})",
                "gradient clipping (trainer.gradient_clip_val=1.0)" if not clip else
                f"stronger gradient clipping (trainer.gradient_clip_val, now {clip:g})"]
        if "16" in precision:
            tips.append(f"fp32 instead of {precision} (trainer.precision=32-true)")
        else:
            tips.append("learning-rate warm-up (module.warmup_steps)")
        return (f"{what}; no checkpoint or Gamma was written from this network. Try {', '.join(tips[:-1])} or "
                f"{tips[-1]}, and resume from the last good checkpoint with ckpt_path=... or start over.")

    def check_divergence(self) -> None:
        """Raise :class:`TrainingDivergedError` if any step since the last check diverged (one host sync)."""
        self._read_window(reset=False)

    def _is_log_step(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return False
        every = int(getattr(trainer, "log_every_n_steps", 0) or 0)
        if every <= 0:
            return self.batches_trained % CHECK_EVERY_WITHOUT_LOGGING == 0
        flag = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", None)
        return flag if isinstance(flag, bool) else self.batches_trained % every == 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._is_log_step():
            return
        window = self._read_window()
        if window is not None and window[1] > 0:
            mean, count = window
            # a CPU tensor: the progress bar and loggers read it without touching the device
            self.log("train/loss", torch.tensor(mean), prog_bar=True, on_step=True, on_epoch=False,
                     batch_size=count)

    def on_train_epoch_end(self) -> None:
        self.check_divergence()

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
